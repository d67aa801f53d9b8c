"""Every data-free method, and budget mode, on VGG-16 and ResNet-50: time and peak memory.

Builds zoo ``vgg16`` and ``resnet50`` (ImageNet layouts, 224x224) in code with trained-like
weights (clustered, correlated unit directions: :func:`vgg16_speed.trained_like_`), then, in
one process and side by side:

* ``tropnnc.compress(model, keep, method)`` for every data-free method (thinet needs
  calibration data and zonotope-kmeans single-output blocks: both are left out), MAC
  counting off (it is two forwards, the same for every method);
* budget mode, ``compress(model, budget=Budget(keep, unit="macs"))`` (tropnnc; it counts
  MACs, which the allocator needs);
* the Gram products alone: :func:`tropnnc.cluster.gram_matrix` (float32) of exactly the row
  shapes (n, d+1) that tropnnc clusters in that network.

Each phase runs ``--repeats`` times, the phases of one repeat interleaved (so slow and fast
phases of a shared machine hit every method alike); medians are reported with the ratios to
tropnnc's time and to the Gram products. Peak memory: VmHWM from /proc/self/status, reset
before the phase by writing 5 to /proc/self/clear_refs, minus the resident size just before
(the model is already resident). ``--limit S`` stops a method's run after S seconds (reported
as "> S"; later repeats of it are skipped). Run from the repository root::

    .venv/bin/python benchmarks/methods_speed.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vgg16_speed import (  # noqa: E402
    MB,
    Peak,
    build_vgg16,
    loadavg,
    trained_like_,
    without_input_shape,
)

import tropnnc  # noqa: E402
from tropnnc import zoo  # noqa: E402
from tropnnc.cluster import gram_matrix  # noqa: E402

METHODS = [
    "tropnnc",
    "l1",
    "random",
    "neuron-merging",
    "neural-path-kmeans",
    "model-folding",
    "cup",
    "srinivas-babu",
]
BUDGET = "budget (tropnnc, macs)"


class TimeLimit(Exception):
    """A phase ran past ``--limit``."""


def _alarm(signum: int, frame: object) -> None:
    raise TimeLimit


def build(name: str, seed: int) -> nn.Module:
    """A zoo network with trained-like weights, eval mode."""
    if name == "vgg16":
        return build_vgg16(seed)
    with torch.device("meta"):
        model = zoo.build(name)
    model = model.to_empty(device="cpu")
    for mod in model.modules():  # BatchNorm at its initial statistics (identity)
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_parameters()
    return trained_like_(model, seed).eval()


def run_phase(
    model: nn.Module, phase: str, keep: float, seed: int, limit: int
) -> dict[str, object]:
    """One compress (a method, or budget mode): seconds (None past the limit), peak memory
    above the resident size, and tropnnc's row shapes (for the Gram products)."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        with Peak() as peak:
            start = time.perf_counter()
            if phase == BUDGET:
                result = tropnnc.compress(
                    model, method="tropnnc", seed=seed, budget=tropnnc.Budget(keep, unit="macs")
                )
            else:
                with without_input_shape(model):
                    result = tropnnc.compress(model, keep, phase, seed=seed)
            seconds = time.perf_counter() - start
    except TimeLimit:
        return {"seconds": None, "peak": float("nan")}
    finally:
        signal.alarm(0)
    shapes = [
        (b.units_before, result.model.get_submodule(b.layer).weight[0].numel() + 1)
        for b in result.blocks
    ]
    out = {
        "seconds": seconds,
        "peak": peak.delta,
        "shapes": shapes,
        "certificate_sum": sum(b.certificate_sum for b in result.blocks),
    }
    del result
    return out


def run_grams(shapes: list[tuple[int, int]], seed: int) -> float:
    """Seconds of the float32 Gram products of the row shapes (n, d+1)."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for n, d in shapes:
        x = torch.randn(n, d, generator=g)
        x @ x[: min(n, 64)].T  # warm the BLAS path for this shape
        start = time.perf_counter()
        gram_matrix(x, torch.float32)
        total += time.perf_counter() - start
        del x
    return total


def fmt_seconds(values: list[float | None], limit: int) -> str:
    done = [v for v in values if v is not None]
    if not done:
        return f"> {limit}"
    return f"{statistics.median(done):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--no-budget", action="store_true", help="skip budget mode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--limit", type=int, default=300, help="seconds after which one run of a method is stopped"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write raw numbers here")
    args = parser.parse_args()

    print(
        f"# compression speed of every method ({platform.processor() or platform.machine()},"
        f" {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"tropnnc from {Path(tropnnc.__file__).parent})"
    )
    print(f"load average at start: {loadavg()}")
    phases = list(args.methods) + ([] if args.no_budget else [BUDGET])
    raw: dict[str, dict[str, object]] = {}
    for net in args.networks:
        model = build(net, args.seed)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"\n{net}: {params / 1e6:.1f}M params ({params * 4 / MB:.0f} MB float32), "
            f"keep {args.keep}",
            flush=True,
        )
        runs: dict[str, list[dict[str, object]]] = {p: [] for p in phases}
        grams: list[float] = []
        for rep in range(args.repeats):
            for phase in phases:
                if runs[phase] and runs[phase][-1]["seconds"] is None:
                    continue  # past the limit once: not again
                runs[phase].append(run_phase(model, phase, args.keep, args.seed, args.limit))
                r = runs[phase][-1]
                took = "stopped" if r["seconds"] is None else f"{r['seconds']:.2f} s"
                print(
                    f"  repeat {rep + 1} {phase}: {took}, peak +{r['peak'] / MB:.0f} MB, "
                    f"load {loadavg()}",
                    flush=True,
                )
            shapes = (
                next(r["shapes"] for r in runs["tropnnc"] if "shapes" in r)
                if "tropnnc" in runs and runs["tropnnc"]
                else []
            )
            if shapes:
                grams.append(run_grams(shapes, args.seed + rep))
        raw[net] = {"runs": runs, "grams": grams, "params": params}
        gram_s = statistics.median(grams) if grams else float("nan")
        done = [r["seconds"] for r in runs.get("tropnnc", []) if r["seconds"] is not None]
        base = statistics.median(done) if done else float("nan")
        model_mb = params * 4 / MB
        print(
            f"\n| {net}, keep {args.keep} | seconds (median of {args.repeats}) | "
            f"/ tropnnc | / Gram products | peak memory above the model |"
        )
        print("|---|---|---|---|---|")
        for phase in phases:
            secs = [r["seconds"] for r in runs[phase]]
            done = [s for s in secs if s is not None]
            med = statistics.median(done) if done else None
            peaks = [r["peak"] for r in runs[phase] if r["seconds"] is not None]
            peak = statistics.median(peaks) if peaks else float("nan")
            ratio_t = f"{med / base:.2f}" if med is not None else "-"
            ratio_g = f"{med / gram_s:.2f}" if med is not None else "-"
            print(
                f"| {phase} | {fmt_seconds(secs, args.limit)} | {ratio_t} | {ratio_g} | "
                f"{peak / MB:.0f} MB = {peak / MB / model_mb:.2f} x model |"
            )
        print(
            f"| Gram products of tropnnc's row shapes (float32) | {gram_s:.2f} | "
            f"{gram_s / base:.2f} | 1.00 | |",
            flush=True,
        )
        del model
    print(f"\nload average at end: {loadavg()}")
    if args.json is not None:
        args.json.write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
