"""How tight is the certificate? Derived radius, certificate and worst errors per block.

For each network and keep ratio, ``tropnnc.compress(model, keep, "tropnnc")`` runs with its
default input domain (pixels in [0, 1]): every block's radius is derived from that domain
on the network compressed so far. For block i the script compares the network just before
block i was compressed (blocks < i compressed, same seed: compress is deterministic per
layer) with the one just after; the layers in front of the block are the same in both, so
their consumer outputs on the same image differ only by block i's merge: the quantity the
certificate bounds. Reported per block:

* radius: the derived bound on the block's input norm (a patch for a conv producer), and the
  largest input norm seen on the test images;
* certificate: max over outputs of the bound on |y_j - y~_j| (with that radius);
* test: the worst |y_j - y~_j| over the test images (all outputs and positions);
* ascent: the worst found by gradient ascent on the input (Adam, inputs clipped into
  [0, 1] after every step; ``--restarts`` starts: half from the test images with the
  largest error, half uniform at random; ``--steps`` steps);
* ratio: certificate / max(test, ascent);
* radius 1: the certificate the old default (radius 1 for every block) reported, the same
  bound scaled by sqrt(2) / sqrt(radius^2 + 1): not a bound for these inputs.

Networks: LeNet-300-100 (the demo network) from the experiments cache and zoo ``e2-cnn``
(two 5x5 convs), both trained on Fashion-MNIST with seed 0 by
:func:`tropnnc.experiments.train_cache.trained_model`. Run from the repository root::

    .venv/bin/python benchmarks/certificate_tightness.py --out results/certificate-tightness
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import tropnnc  # noqa: E402
from tropnnc.experiments.train_cache import load_split, trained_model  # noqa: E402
from tropnnc.graph import discover  # noqa: E402


def consumer_outputs(
    model: nn.Module, consumer: str, producer: str, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The consumer's output and the producer's input, per sample, for inputs ``x``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(consumer).register_forward_hook(
            lambda m, a, out: seen.__setitem__("y", out)
        ),
        model.get_submodule(producer).register_forward_pre_hook(
            lambda m, a: seen.__setitem__("x", a[0])
        ),
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen["y"], seen["x"]


def block_error(
    before: nn.Module, after: nn.Module, consumer: str, producer: str, x: torch.Tensor
) -> torch.Tensor:
    """max_j |y_j - y~_j| per sample (over outputs and positions)."""
    y, _ = consumer_outputs(before, consumer, producer, x)
    y2, _ = consumer_outputs(after, consumer, producer, x)
    return (y - y2).abs().flatten(1).amax(dim=1)


def input_norm(module: nn.Module, x: torch.Tensor) -> float:
    """The largest norm of one input of ``module`` (a patch for a conv)."""
    if isinstance(module, nn.Linear):
        return float(x.norm(dim=-1).max())
    patches = nn.functional.unfold(
        x, module.kernel_size, module.dilation, module.padding, module.stride
    )
    return float(patches.norm(dim=1).max())


def ascent(
    before: nn.Module,
    after: nn.Module,
    consumer: str,
    producer: str,
    starts: torch.Tensor,
    steps: int,
    lr: float,
) -> float:
    """Largest block error found by Adam on the inputs, kept in [0, 1]."""
    x = starts.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    best = 0.0
    for _ in range(steps):
        err = block_error(before, after, consumer, producer, x)
        best = max(best, float(err.detach().max()))
        opt.zero_grad()
        (-err.sum()).backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    with torch.no_grad():
        best = max(best, float(block_error(before, after, consumer, producer, x).max()))
    return best


def measure(name: str, model: nn.Module, images: torch.Tensor, keep: float, args) -> list[dict]:
    specs = discover(model)[0]
    names = [s.producer for s in specs]
    rows = []
    before = model
    for i, spec in enumerate(specs):
        result = tropnnc.compress(
            model, {n: keep for n in names[: i + 1]}, "tropnnc", seed=args.seed
        )
        after, report = result.model, result.blocks[i]
        for p in after.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            errs = torch.cat(
                [
                    block_error(before, after, spec.consumer, spec.producer, b)
                    for b in images.split(1000)
                ]
            )
            _, xin = consumer_outputs(after, spec.consumer, spec.producer, images[:2000])
        real_norm = input_norm(after.get_submodule(spec.producer), xin)
        g = torch.Generator().manual_seed(args.seed)
        half = args.restarts // 2
        starts = torch.cat(
            [
                images[errs.topk(half).indices],
                torch.rand((args.restarts - half,) + images.shape[1:], generator=g),
            ]
        )
        t = time.perf_counter()
        worst_ascent = ascent(
            before, after, spec.consumer, spec.producer, starts, args.steps, args.lr
        )
        worst_test = float(errs.max())
        rows.append(
            {
                "network": name,
                "keep": keep,
                "block": f"{spec.producer} -> {spec.consumer}",
                "units": f"{report.units_before} -> {report.units_after}",
                "radius": report.radius,
                "input_norm_test": real_norm,
                "certificate": report.certificate,
                "test": worst_test,
                "ascent": worst_ascent,
                "ratio": report.certificate / max(worst_test, worst_ascent),
                "certificate_radius_1": report.certificate * math.sqrt(2 / (report.radius**2 + 1)),
                "ascent_seconds": time.perf_counter() - t,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        before = after
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["lenet-300-100", "e2-cnn"])
    parser.add_argument("--keeps", nargs="+", type=float, default=[0.5, 0.1])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--cache-dir", help="trained-model cache (default: the experiments')")
    parser.add_argument("--out", type=Path, help="folder for results.json and table.md")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    test = load_split("fashion-mnist", "test")
    images = test.tensors[0][: args.test_size]
    rows = []
    for name in args.networks:
        model = trained_model(name, "fashion-mnist", 0, args.cache_dir).float().eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for keep in args.keeps:
            rows += measure(name, model, images, keep, args)
    lines = [
        "| network | keep | block | units | radius | input norm (test) | certificate "
        "| worst test | worst ascent | certificate / worst | radius-1 certificate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['network']} | {r['keep']} | {r['block']} | {r['units']} | "
            f"{r['radius']:.1f} | {r['input_norm_test']:.1f} | "
            f"{r['certificate']:.4g} | {r['test']:.4g} | {r['ascent']:.4g} | "
            f"{r['ratio']:.0f} | {r['certificate_radius_1']:.4g} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
        (args.out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
