"""VGG-16 (ImageNet layout) compression speed: TropNNC vs scikit-learn KMeans vs Gram products.

Builds zoo ``vgg16`` (138M parameters, 224x224 layout: 13 convs, fc6 25088 -> 4096, fc7
4096 -> 4096, fc8 -> 1000) in code with *trained-like* weights (no download; see
:func:`trained_like_`), then reports, side by side in one run:

(a) ``tropnnc.compress(model, keep=0.5)`` on all 15 blocks (13 convs, fc6, fc7), wall time
    and per block, without MAC counting (timed separately: it runs a 224x224 forward of the
    original and of the compressed model);
(b) scikit-learn ``KMeans(n_clusters=k)`` with its defaults on the same fc6 vectors (the
    25,088 + 1-dim unit directions, sample weights = TropNNC's masses), its clusters merged
    with the P5 shares and certified by :func:`tropnnc.block.certificate`, next to
    TropNNC's merge of the same block;
(c) the Gram products alone, for the exact row shapes (a) clusters (float32): plain
    ``X @ X.T`` and :func:`tropnnc.cluster.gram_matrix` (what (a) runs: only the row strips on
    and above the diagonal);
(d) peak resident memory of (a): VmHWM from /proc/self/status, reset before the phase by
    writing 5 to /proc/self/clear_refs, minus the resident size just before the phase (the
    model, the interpreter and torch are resident already), and the absolute peak.

Every timed phase runs ``--repeats`` times (medians reported; (b) runs ``--sklearn-repeats``
times). Run from the repository root::

    .venv/bin/python benchmarks/vgg16_speed.py --repeats 5

``--budget-mode`` instead measures budget mode against plain compress, side by side in one
run (each configuration once per repeat, in turn): ``compress(model, keep)`` and
``compress(model, budget=keep)`` (params) without MAC counting, then both with the model's
input shape (MAC counts in the report; the budget in MACs), with wall time, the peak
resident memory above the loaded model, the absolute peak, and the ratios budget / plain.
After each budget run, ``compress`` with the widths it chose (a keep mapping, no allocator)
separates what the allocation costs from what compressing to those widths costs::

    .venv/bin/python benchmarks/vgg16_speed.py --budget-mode --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import tropnnc
from tropnnc import zoo
from tropnnc.api import compress_block
from tropnnc.block import Merge, certificate, merge_by_shares
from tropnnc.cluster import gram_matrix
from tropnnc.counting import count_macs, infer_example_inputs
from tropnnc.graph import discover
from tropnnc.methods import get_method
from tropnnc.surgery import extract

MB = 1e6  # reports use decimal megabytes (VGG-16: 138.4M float32 = 553 MB)
CHUNK = 16 << 20  # bytes of one generator chunk


# ------------------------------------------------------------------------------------------
# trained-like weights
# ------------------------------------------------------------------------------------------


def _clustered_rows(n: int, d: int, g: torch.Generator, out: torch.Tensor) -> None:
    """Fill ``out`` (n, d) with n rows drawn like a trained layer's units.

    * n // 4 prototype directions p_c = normalize(e_c + s_c), e_c ~ N(0, I/d) private and
      s_c = (0.5 / sqrt(16)) z_c B a draw from a 16-dim subspace B shared by the whole
      layer, so prototypes are correlated (trained filters share low-frequency structure);
    * unit i picks prototype c(i) with probability ~ 1 / (c + 1)^0.8 (a few large families,
      many small ones, some prototypes unused) and gets direction
      normalize(p_c(i) + sigma_i eps_i), eps_i ~ N(0, I/d), sigma_i ~ U(0.2, 1.0): 11 to 45
      degrees from its prototype (near-copies to loose relatives);
    * norm sqrt(2) * exp(0.3 N(0, 1)) (He scale, log-normal spread across units).
    Rows are generated in chunks of at most 16 MB.
    """
    n_proto, rank = max(1, n // 4), 16
    basis = torch.randn(rank, d, generator=g)
    basis /= basis.norm(dim=1, keepdim=True)
    step = max(1, CHUNK // (4 * d))
    proto = torch.empty(n_proto, d)
    for s in range(0, n_proto, step):
        c = min(step, n_proto - s)
        p = torch.randn(c, d, generator=g) / math.sqrt(d)
        p += (0.5 / math.sqrt(rank)) * (torch.randn(c, rank, generator=g) @ basis)
        proto[s : s + c] = p / p.norm(dim=1, keepdim=True)
    prob = 1.0 / torch.arange(1, n_proto + 1, dtype=torch.float64) ** 0.8
    family = torch.multinomial(prob, n, replacement=True, generator=g)
    sigma = torch.rand(n, generator=g) * 0.8 + 0.2
    gain = math.sqrt(2.0) * torch.exp(0.3 * torch.randn(n, generator=g))
    for s in range(0, n, step):
        c = min(step, n - s)
        r = torch.randn(c, d, generator=g) / math.sqrt(d)
        r.mul_(sigma[s : s + c, None]).add_(proto[family[s : s + c]])
        r.mul_((gain[s : s + c] / r.norm(dim=1))[:, None])
        out[s : s + c] = r


def trained_like_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every Linear/Conv2d of ``model`` with clustered, correlated unit directions
    (:func:`_clustered_rows`, one seeded generator, layers in module order) and biases
    N(0, 0.05^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                w = mod.weight.view(mod.weight.shape[0], -1)
                _clustered_rows(w.shape[0], w.shape[1], g, w)
                if mod.bias is not None:
                    mod.bias.copy_(0.05 * torch.randn(mod.bias.shape, generator=g))
    return model


def build_vgg16(seed: int = 0) -> nn.Module:
    """zoo ``vgg16`` with trained-like weights, built on the meta device first (no wasted
    random init of 138M parameters), eval mode."""
    with torch.device("meta"):
        model = zoo.build("vgg16")
    model = model.to_empty(device="cpu")
    return trained_like_(model, seed).eval()


# ------------------------------------------------------------------------------------------
# measurement helpers
# ------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    """A memory field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Peak:
    """Peak resident memory of a phase: (VmHWM after - VmRSS before, VmHWM after)."""

    def __enter__(self) -> Peak:
        self.ok = _reset_peak()
        self.before = _status("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = _status("VmHWM")
        self.delta = self.peak - self.before if self.ok else float("nan")


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def without_input_shape(model: nn.Module):
    """Context: hide ``model.input_shape`` so compress skips MAC counting (its forward is
    timed separately)."""

    class _Ctx:
        def __enter__(self):
            self.shape = model.__dict__.pop("input_shape", None)

        def __exit__(self, *exc):
            if self.shape is not None:
                model.input_shape = self.shape

    return _Ctx()


# ------------------------------------------------------------------------------------------
# the phases
# ------------------------------------------------------------------------------------------


def run_compress(model: nn.Module, keep: float, seed: int) -> dict[str, object]:
    """(a): compress every block, MAC counting off; time, per-block times, memory."""
    with without_input_shape(model), Peak() as peak:
        seconds, result = timed(
            lambda: tropnnc.compress(model, keep, "tropnnc", seed=seed, radius=1.0)
        )  # no input shape here
    rows = [
        {
            "layer": b.layer,
            "units": f"{b.units_before}->{b.units_after}",
            "seconds": b.seconds,
            "certificate": b.certificate,
        }
        for b in result.blocks
    ]
    shapes = [(b.units_before, _row_dim(result, b)) for b in result.blocks]
    out = {
        "seconds": seconds,
        "blocks": rows,
        "shapes": shapes,
        "peak_delta": peak.delta,
        "peak": peak.peak,
        "params_after": result.params_after,
        "params_before": result.params_before,
    }
    del result
    return out


def run_budget_mode(model: nn.Module, keep: float, seed: int) -> dict[str, dict]:
    """Plain compress vs budget mode (keep = budget), without and with MAC counting."""
    runs = {
        "plain": (False, lambda: tropnnc.compress(model, keep, "tropnnc", seed=seed)),
        "budget-params": (False, lambda: tropnnc.compress(model, budget=keep, seed=seed)),
        "plain+macs": (True, lambda: tropnnc.compress(model, keep, "tropnnc", seed=seed)),
        "budget-macs": (
            True,
            lambda: tropnnc.compress(model, budget=tropnnc.Budget(keep, unit="macs"), seed=seed),
        ),
    }
    out = {}
    for label, (with_shape, fn) in runs.items():
        ctx = contextlib.nullcontext() if with_shape else without_input_shape(model)
        with ctx, Peak() as peak:
            seconds, result = timed(fn)
        widths = [b.units_after / b.units_before for b in result.blocks]
        out[label] = {
            "seconds": seconds,
            "peak_delta": peak.delta,
            "peak": peak.peak,
            "min_width": min(widths),
            "params_after": result.params_after,
        }
        if result.allocation is not None:  # the same widths without the allocator
            chosen = result.allocation.widths
            del result
            with ctx, Peak() as peak:
                seconds, result = timed(lambda w=chosen: tropnnc.compress(model, w, seed=seed))
            out[label + " widths"] = {
                "seconds": seconds,
                "peak_delta": peak.delta,
                "peak": peak.peak,
                "min_width": out[label]["min_width"],
                "params_after": result.params_after,
            }
        del result
    return out


def budget_mode(model: nn.Module, args: argparse.Namespace, model_mb: float) -> None:
    """Print plain vs budget time and memory, medians over the repeats, with ratios."""
    raw = []
    for rep in range(args.repeats):
        raw.append(run_budget_mode(model, args.keep, args.seed))
        print(
            f"repeat {rep + 1}: "
            + ", ".join(
                f"{k} {v['seconds']:.2f} s +{v['peak_delta'] / MB:.0f} MB"
                for k, v in raw[-1].items()
            )
            + f", load {loadavg()}"
        )
    med_of = {
        k: {f: med([r[k][f] for r in raw]) for f in ("seconds", "peak_delta", "peak")}
        for k in raw[0]
    }
    print()
    print("| run | seconds (median) | peak above model | absolute peak | narrowest block |")
    print("|---|---|---|---|---|")
    for k, v in med_of.items():
        print(
            f"| {k} | {v['seconds']:.2f} | {v['peak_delta'] / MB:.0f} MB | "
            f"{v['peak'] / MB:.0f} MB | {raw[0][k]['min_width']:.3f} |"
        )
    print()
    print("| ratio budget / plain | time | peak above model | absolute peak |")
    print("|---|---|---|---|")
    for b, p in (
        ("budget-params", "plain"),
        ("budget-macs", "plain+macs"),
        ("budget-params", "budget-params widths"),
        ("budget-macs", "budget-macs widths"),
    ):
        times = sorted(r[b]["seconds"] / r[p]["seconds"] for r in raw)
        print(
            f"| {b} / {p} | {med_of[b]['seconds'] / med_of[p]['seconds']:.2f} "
            f"(per repeat {times[0]:.2f} to {times[-1]:.2f}) | "
            f"{med_of[b]['peak_delta'] / med_of[p]['peak_delta']:.2f} | "
            f"{med_of[b]['peak'] / med_of[p]['peak']:.2f} |"
        )
    print(f"\nmodel {model_mb:.0f} MB; load average at end: {loadavg()}")
    if args.json is not None:
        args.json.write_text(json.dumps(raw, indent=1, default=str))


def _row_dim(result, report) -> int:
    """Length d+1 of the rows block ``report`` clustered: producer fan-in (as compressed by
    earlier blocks) plus the bias."""
    mod = result.model.get_submodule(report.layer)
    return mod.weight[0].numel() + 1


def run_grams(shapes: list[tuple[int, int]], seed: int) -> dict[str, float]:
    """(c): the Gram products of the row shapes (n, d+1) that (a) clusters, in float32."""
    g = torch.Generator().manual_seed(seed)
    plain = strips = 0.0
    for n, d in shapes:
        x = torch.randn(n, d, generator=g)
        x @ x[: min(n, 64)].T  # warm the BLAS path for this shape
        plain += timed(lambda x=x: x @ x.T)[0]
        strips += timed(lambda x=x: gram_matrix(x, torch.float32))[0]
        del x
    return {"plain": plain, "strips": strips}


def run_macs(model: nn.Module, keep: float, seed: int) -> dict[str, float]:
    """What MAC counting adds to compress: one forward of the original and of the result."""
    inputs = infer_example_inputs(model)
    with without_input_shape(model):
        small = tropnnc.compress(model, keep, "tropnnc", seed=seed).model
    before = timed(lambda: count_macs(model, inputs))[0]
    after = timed(lambda: count_macs(small, inputs))[0]
    return {"macs_original": before, "macs_compressed": after}


def run_deepcopy(model: nn.Module, keep: float, seed: int) -> dict[str, float]:
    """Cost of the whole-model deep copy compress used to make: alone, and (a) with it in
    place of the working copy that shares the layers compression replaces."""
    with Peak() as peak:
        seconds, dup = timed(lambda: copy.deepcopy(model))
    del dup
    saved = tropnnc.api._working_copy
    tropnnc.api._working_copy = lambda m, specs, widths: copy.deepcopy(m)
    try:
        with without_input_shape(model), Peak() as peak_a:
            seconds_a, result = timed(lambda: tropnnc.compress(model, keep, "tropnnc", seed=seed))
    finally:
        tropnnc.api._working_copy = saved
    del result
    return {
        "seconds": seconds,
        "peak_delta": peak.delta,
        "compress_seconds": seconds_a,
        "compress_peak_delta": peak_a.delta,
    }


def fc6_block(model: nn.Module):
    spec = next(s for s in discover(model)[0] if s.producer == "classifier.0")
    return extract(model, spec)


def run_tropnnc_fc6(model: nn.Module, keep: float, seed: int) -> dict[str, float]:
    """TropNNC on fc6 alone (25,089-dim rows), the block (b) clusters."""
    block = fc6_block(model)
    k = max(1, round(keep * block.n))
    gen = torch.Generator().manual_seed(seed)
    seconds, merge = timed(lambda: compress_block(get_method("tropnnc"), block, k, gen))
    bound = certificate(block, merge)
    return {
        "seconds": seconds,
        "certificate": float(bound.max()),
        "certificate_sum": float(bound.sum()),
        "dim": block.weight.shape[1],
    }


def run_sklearn_fc6(model: nn.Module, keep: float, seed: int) -> dict[str, float]:
    """(b): scikit-learn KMeans (defaults) on fc6's unit directions weighted by the masses,
    merged with the P5 shares, certified like TropNNC's merge."""
    from sklearn.cluster import KMeans

    block = fc6_block(model)
    k = max(1, round(keep * block.n))
    norms = block.weight.norm(dim=1)
    mass = norms * block.out.flatten(1).norm(dim=1)
    directions = (block.weight / norms[:, None]).numpy()
    km = KMeans(n_clusters=k, random_state=seed)
    seconds, _ = timed(lambda: km.fit(directions, sample_weight=mass.numpy()))
    assignment = torch.as_tensor(km.labels_, dtype=torch.long)
    rows = torch.as_tensor(km.cluster_centers_, dtype=block.weight.dtype)
    rows = rows / rows.norm(dim=1, keepdim=True)
    shares = (block.weight.double() * rows[assignment].double()).sum(1).clamp(min=0)
    merge: Merge = merge_by_shares(block, assignment, shares.to(block.weight.dtype), rows)
    bound = certificate(block, merge)
    return {
        "seconds": seconds,
        "certificate": float(bound.max()),
        "certificate_sum": float(bound.sum()),
        "iterations": int(km.n_iter_),
    }


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--sklearn-repeats", type=int, default=1, help="runs of (b); 0 skips scikit-learn"
    )
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write raw numbers here")
    parser.add_argument(
        "--budget-mode", action="store_true", help="only plain vs budget mode, side by side"
    )
    args = parser.parse_args()

    print(
        f"# VGG-16 compression speed ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__})"
    )
    print(f"load average at start: {loadavg()}")
    t_build, model = timed(lambda: build_vgg16(args.seed))
    params = sum(p.numel() for p in model.parameters())
    model_mb = params * 4 / MB
    print(
        f"built vgg16 with trained-like weights in {t_build:.1f} s: {params / 1e6:.1f}M "
        f"params, {model_mb:.0f} MB float32"
    )
    if args.budget_mode:
        budget_mode(model, args, model_mb)
        return

    raw: dict[str, list] = {
        "compress": [],
        "grams": [],
        "fc6_tropnnc": [],
        "fc6_sklearn": [],
        "macs": [],
        "deepcopy": [],
        "load": [],
    }
    for rep in range(args.repeats):
        a = run_compress(model, args.keep, args.seed)
        c = run_grams(a["shapes"], args.seed + rep)
        f = run_tropnnc_fc6(model, args.keep, args.seed)
        raw["compress"].append(a)
        raw["grams"].append(c)
        raw["fc6_tropnnc"].append(f)
        raw["load"].append(loadavg())
        print(
            f"repeat {rep + 1}: (a) {a['seconds']:.2f} s, (c) {c['strips']:.2f} s "
            f"((a)/(c) {a['seconds'] / c['strips']:.2f}) "
            f"strips / {c['plain']:.2f} s plain, fc6 alone {f['seconds']:.2f} s, "
            f"peak +{a['peak_delta'] / MB:.0f} MB, load {raw['load'][-1]}"
        )
    for _ in range(args.sklearn_repeats):
        raw["fc6_sklearn"].append(run_sklearn_fc6(model, args.keep, args.seed))
        print(f"(b) sklearn fc6: {raw['fc6_sklearn'][-1]['seconds']:.1f} s, load {loadavg()}")
    raw["macs"].append(run_macs(model, args.keep, args.seed))
    raw["deepcopy"].append(run_deepcopy(model, args.keep, args.seed))

    a_s = med([r["seconds"] for r in raw["compress"]])
    c_strips = med([r["strips"] for r in raw["grams"]])
    c_plain = med([r["plain"] for r in raw["grams"]])
    f_s = med([r["seconds"] for r in raw["fc6_tropnnc"]])
    peak = med([r["peak_delta"] for r in raw["compress"]])
    peak_abs = med([r["peak"] for r in raw["compress"]])
    first = raw["compress"][0]
    print()
    print("| block | units | seconds (median) | certificate |")
    print("|---|---|---|---|")
    for i, b in enumerate(first["blocks"]):
        s = med([r["blocks"][i]["seconds"] for r in raw["compress"]])
        print(f"| {b['layer']} | {b['units']} | {s:.3f} | {b['certificate']:.4g} |")
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| (a) compress, all 15 blocks, keep {args.keep} (no MAC count) | {a_s:.2f} s |")
    print(f"| (c) Gram products, all blocks, gram_matrix (strips) | {c_strips:.2f} s |")
    print(f"| (c') Gram products, all blocks, plain X @ X.T | {c_plain:.2f} s |")
    ratios = sorted(
        r["seconds"] / g["strips"] for r, g in zip(raw["compress"], raw["grams"], strict=True)
    )
    print(
        f"| (a)/(c) | {a_s / c_strips:.2f} (vs plain: {a_s / c_plain:.2f}); per repeat "
        f"{ratios[0]:.2f} to {ratios[-1]:.2f} |"
    )
    print(
        f"| (d) peak memory of (a) above the loaded model (VmHWM delta) | "
        f"{peak / MB:.0f} MB = {peak / MB / model_mb:.2f} x model |"
    )
    print(
        f"| (d) absolute peak RSS during (a) | {peak_abs / MB:.0f} MB = "
        f"{peak_abs / MB / model_mb:.2f} x model |"
    )
    fc6 = raw["fc6_tropnnc"][0]
    print(
        f"| fc6 alone ({fc6['dim']}-dim rows), tropnnc | {f_s:.2f} s, certificate "
        f"{fc6['certificate']:.6g} (sum {fc6['certificate_sum']:.6g}) |"
    )
    if raw["fc6_sklearn"]:
        b_s = med([r["seconds"] for r in raw["fc6_sklearn"]])
        sk = raw["fc6_sklearn"][0]
        print(
            f"| (b) fc6, sklearn KMeans defaults ({sk['iterations']} iterations) | "
            f"{b_s:.1f} s, certificate {sk['certificate']:.6g} "
            f"(sum {sk['certificate_sum']:.6g}) |"
        )
        print(f"| (b)/(a) on fc6 | {b_s / f_s:.0f} |")
    m = raw["macs"][0]
    print(
        f"| MAC counting (224x224 forward, original + compressed), not in (a) | "
        f"{m['macs_original']:.2f} + {m['macs_compressed']:.2f} s |"
    )
    dc = raw["deepcopy"][0]
    print(
        f"| copy.deepcopy of the model (not in (a)) | {dc['seconds']:.2f} s, "
        f"+{dc['peak_delta'] / MB:.0f} MB |"
    )
    print(
        f"| (a) with a full copy.deepcopy instead of the working copy (1 run) | "
        f"{dc['compress_seconds']:.2f} s, peak +{dc['compress_peak_delta'] / MB:.0f} MB = "
        f"{dc['compress_peak_delta'] / MB / model_mb:.2f} x model |"
    )
    print(f"| load average per repeat | {'; '.join(raw['load'])} |")
    print(f"\nload average at end: {loadavg()}")
    if args.json is not None:
        args.json.write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
