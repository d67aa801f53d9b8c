"""Budget allocators compared by test accuracy on trained networks (results/allocators).

Networks from :func:`tropnnc.experiments.train_cache.trained_model` on Fashion-MNIST:
``lenet-300-100`` and ``e2-cnn`` with the default training (10 epochs, early stopping),
``vgg-small`` with 2 epochs on a seeded 12,000-image subset (CPU budget, as
benchmarks/repair.py). For every seed, budget and unit, tropnnc (default options) compresses
all blocks with the widths of each allocation; no fine-tuning; accuracy on a seeded subset of
the test split. Variants:

* ``uniform``: one keep ratio for every block, the largest (step 0.005) that meets the budget;
* ``sum``: ``allocator='tropnnc-sum'``, the plain greedy on the sum of the certificate curves
  (the allocator before the cap; it can empty a layer);
* ``log-nofloor``: ``allocator='tropnnc-log'`` without floors (the old ``tropnnc-log``);
* ``floor<f>``: ``allocator='tropnnc'`` with FLOOR_FRACTION = f: no block narrower than f
  times its width under ``uniform`` (``floor0.5`` is the default);
* ``log-floor0.5``: ``allocator='tropnnc-log'`` with the default floors.

Writes results.csv (reruns skip done rows) and table.md (mean +- std over seeds, and the
smallest width fraction any block gets). Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/allocators.py --seeds 0 1
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from repair import test_subset  # noqa: E402  (the same seeded test subset)

import tropnnc  # noqa: E402
from tropnnc import budget as budget_mod  # noqa: E402
from tropnnc.experiments.train import evaluate  # noqa: E402
from tropnnc.experiments.train_cache import trained_model  # noqa: E402
from tropnnc.graph import discover  # noqa: E402
from tropnnc.surgery import get_module  # noqa: E402

#: network -> (cache dir or None for the default, training options)
NETS = {"lenet-300-100": {}, "e2-cnn": {}, "vgg-small": {"epochs": 2, "train_size": 12000}}
VARIANTS = ["uniform", "sum", "log-nofloor", "floor0.25", "floor0.5", "log-floor0.5"]
FIELDS = [
    "network",
    "unit",
    "budget",
    "variant",
    "seed",
    "accuracy",
    "baseline_accuracy",
    "achieved",
    "min_fraction",
    "widths",
    "seconds",
]


def uniform_keep(model, unit: str, budget: float) -> float:
    """The largest keep ratio (step 0.005) whose uniform widths meet the budget."""
    specs, _ = discover(model)
    inputs = budget_mod._inputs_for(model, unit, None)
    layout = budget_mod._layout(model, specs, unit, inputs)
    full = np.array([budget_mod._units(get_module(model, s.producer)) for s in specs])
    total = layout.count(full)
    for keep in np.arange(1.0, 0.0, -0.005):
        widths = np.maximum(1, np.round(keep * full)).astype(np.int64)
        if layout.count(widths) <= budget * total:
            return float(keep)
    return 0.005


def run_variant(model, variant: str, unit: str, budget: float, seed: int):
    if variant == "uniform":
        return tropnnc.compress(model, uniform_keep(model, unit, budget), seed=seed)
    saved = budget_mod.FLOOR_FRACTION
    allocator, fraction = {
        "sum": ("tropnnc-sum", saved),
        "log-nofloor": ("tropnnc-log", 0.0),
        "log-floor0.5": ("tropnnc-log", 0.5),
    }.get(variant, ("tropnnc", None))
    if fraction is None:
        fraction = float(variant.removeprefix("floor"))
    budget_mod.FLOOR_FRACTION = fraction
    try:
        return tropnnc.compress(
            model, budget=tropnnc.Budget(budget, unit=unit, allocator=allocator), seed=seed
        )
    finally:
        budget_mod.FLOOR_FRACTION = saved


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--networks", nargs="+", default=list(NETS))
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--units", nargs="+", default=["params", "macs"])
    p.add_argument("--variants", nargs="+", default=VARIANTS)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--cache-dir", default=None, help="trained models (default: data/models)")
    p.add_argument("--out", default="results/allocators")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows = list(csv.DictReader(csv_path.open())) if csv_path.exists() else []
    done = {
        (r["network"], r["unit"], float(r["budget"]), r["variant"], int(r["seed"])) for r in rows
    }
    test = test_subset(args.test_size)
    for net in args.networks:
        for seed in args.seeds:
            model = trained_model(net, "fashion-mnist", seed, args.cache_dir, **NETS[net])
            base = evaluate(model, test)
            units = [u for u in args.units if u == "params" or net != "lenet-300-100"]
            for unit in units:
                for budget in args.budgets:
                    for variant in args.variants:
                        if (net, unit, budget, variant, seed) in done:
                            continue
                        start = time.perf_counter()
                        result = run_variant(model, variant, unit, budget, seed)
                        seconds = time.perf_counter() - start
                        acc = evaluate(result.model, test)
                        frac = min(b.units_after / b.units_before for b in result.blocks)
                        achieved = (
                            result.allocation.achieved / result.allocation.total
                            if result.allocation
                            else float("nan")
                        )
                        row = {
                            "network": net,
                            "unit": unit,
                            "budget": budget,
                            "variant": variant,
                            "seed": seed,
                            "accuracy": acc,
                            "baseline_accuracy": base,
                            "achieved": achieved,
                            "min_fraction": frac,
                            "seconds": seconds,
                            "widths": "/".join(str(b.units_after) for b in result.blocks),
                        }
                        rows.append(row)
                        new = not csv_path.exists()
                        with csv_path.open("a", newline="") as f:
                            w = csv.DictWriter(f, FIELDS)
                            if new:
                                w.writeheader()
                            w.writerow(row)
                        print(
                            f"{net} seed {seed} {unit} {budget:g} {variant:11s} "
                            f"acc {acc:.4f} min width {frac:.3f} widths {row['widths']}",
                            flush=True,
                        )
    write_table(rows, out / "table.md")


def write_table(rows: list[dict], path: Path) -> None:
    """Mean +- std accuracy (%) per (network, unit, budget) and variant."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = [
        "Test accuracy (%) on 2,000 Fashion-MNIST test images, tropnnc, no fine-tuning, "
        "mean +- std over seeds; in brackets: the smallest width / full width of any "
        "block (mean over seeds).",
        "",
        "| network | unit | budget | " + " | ".join(variants) + " |",
        "|---" * (3 + len(variants)) + "|",
    ]
    keys = list(dict.fromkeys((r["network"], r["unit"], float(r["budget"])) for r in rows))
    for net, unit, budget in keys:
        cells = []
        for v in variants:
            sel = [
                r
                for r in rows
                if (r["network"], r["unit"], float(r["budget"]), r["variant"])
                == (net, unit, budget, v)
            ]
            if not sel:
                cells.append("")
                continue
            acc = [100 * float(r["accuracy"]) for r in sel]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            frac = statistics.mean(float(r["min_fraction"]) for r in sel)
            cells.append(f"{statistics.mean(acc):.1f} +- {sd:.1f} ({frac:.2f})")
        lines.append(f"| {net} | {unit} | {budget:g} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
