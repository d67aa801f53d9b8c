"""Accuracy of every data-free method on small trained networks of modern shapes.

Networks (zoo): ``resnet-mini`` (2 stages, projection shortcut: its residual streams are
channel groups), ``mobilenetv2-mini`` (inverted residuals: ReLU6, depthwise groups),
``vit-mini`` (GELU MLPs; attention left alone). One network per seed is trained on
Fashion-MNIST (``--epochs`` epochs on the full train split, or a seeded ``--train-size``
subset; cached under ``--cache``; convolutions train in channels-last memory format, which
only halves the CPU time of the depthwise convolutions), then compressed with the default
pipeline (``method=None``) and every data-free multi-output method at each keep ratio with
the same seed, no fine-tuning; accuracy on a seeded ``--test-size`` subset of the test split.
Writes results.csv (one row per run) and table.md (mean +- std over seeds) to --out.
``--train-only`` trains (and caches) the networks and stops; ``--merge a.csv b.csv`` joins
the results.csv of separate runs (one process per network or seed) into one table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/architectures_accuracy.py \
        --out results/architectures --cache <dir>
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import tropnnc  # noqa: E402
from tropnnc.experiments import train_cache  # noqa: E402
from tropnnc.experiments.train import evaluate, train  # noqa: E402
from tropnnc.experiments.train_cache import load_split, trained_model  # noqa: E402

NETS = ["resnet-mini", "mobilenetv2-mini", "vit-mini"]
METHODS = [
    "default",
    "tropnnc",
    "model-folding",
    "neuron-merging",
    "neural-path-kmeans",
    "cup",
    "l1",
    "random",
]


def _train_channels_last(model: torch.nn.Module, train_set, **kw):
    """:func:`tropnnc.train.train` in channels-last memory format (same math, faster
    depthwise convolutions on CPU); the model is returned to the default format."""
    model.to(memory_format=torch.channels_last)
    try:
        return train(model, train_set, **kw)
    finally:
        model.to(memory_format=torch.contiguous_format)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--nets", nargs="*", default=NETS)
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--keeps", nargs="*", type=float, default=[0.9, 0.75, 0.5])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist or mnist-subset")
    parser.add_argument(
        "--config",
        type=json.loads,
        default=None,
        help="zoo overrides, e.g. '{\"widths\": [24, 48]}'",
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument(
        "--attention",
        choices=["on", "off", "both"],
        default="on",
        help="narrow attention heads (compress's default), leave them, or both (methods "
        "then also appear as '<method>, heads kept')",
    )
    parser.add_argument(
        "--merge", nargs="+", type=Path, help="only merge these results.csv files into --out"
    )
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    train_cache.train = _train_channels_last
    args.out.mkdir(parents=True, exist_ok=True)
    test = load_split(args.dataset, "test")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    test = torch.utils.data.Subset(test, idx[: args.test_size].tolist())
    rows = []
    for net in args.nets:
        models = {
            seed: trained_model(
                net,
                args.dataset,
                seed,
                args.cache,
                config=args.config,
                epochs=args.epochs,
                batch_size=args.batch_size,
                train_size=args.train_size,
            )
            for seed in args.seeds
        }
        if args.train_only:
            continue
        for seed, model in models.items():
            base = evaluate(model, test)
            rows.append(
                {
                    "net": net,
                    "method": "uncompressed",
                    "keep": 1.0,
                    "seed": seed,
                    "accuracy": base,
                    "macs": None,
                    "seconds": 0.0,
                }
            )
            print(f"{net} seed {seed}: {base:.4f}", flush=True)
        heads = {"on": [True], "off": [False], "both": [True, False]}[args.attention]
        for method, attention in ((m, a) for m in args.methods for a in heads):
            label = method if attention else f"{method}, heads kept"
            for keep in args.keeps:
                for seed, model in models.items():
                    start = time.perf_counter()
                    chosen = None if method == "default" else method
                    result = tropnnc.compress(model, keep, chosen, seed=seed, attention=attention)
                    seconds = time.perf_counter() - start
                    rows.append(
                        {
                            "net": net,
                            "method": label,
                            "keep": keep,
                            "seed": seed,
                            "accuracy": evaluate(result.model, test),
                            "macs": result.macs_after / result.macs_before,
                            "seconds": seconds,
                        }
                    )
                print(
                    f"  {label} keep {keep}: "
                    f"{statistics.mean(r['accuracy'] for r in rows[-len(args.seeds) :]):.4f}",
                    flush=True,
                )
    if args.train_only:
        return
    write(rows, args.out)


def write(rows: list[dict], out: Path) -> None:
    """results.csv (one row per run) and table.md (mean +- std over seeds) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    keeps = sorted({r["keep"] for r in rows if r["method"] != "uncompressed"}, reverse=True)
    lines = [
        "| net | method | " + " | ".join(f"keep {k}" for k in keeps) + " |",
        "| --- | --- | " + " | ".join("---" for _ in keeps) + " |",
    ]
    for net in dict.fromkeys(r["net"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["net"] == net):
            cells = []
            for keep in [1.0] if method == "uncompressed" else keeps:
                runs = [
                    r for r in rows if (r["net"], r["method"], r["keep"]) == (net, method, keep)
                ]
                if not runs:  # a keep this network was not run at
                    cells.append("")
                    continue
                acc = [100 * r["accuracy"] for r in runs]
                sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
                macs = "" if method == "uncompressed" else f" ({100 * runs[0]['macs']:.0f}% MACs)"
                cells.append(f"{statistics.mean(acc):.1f} +- {sd:.1f}{macs}")
            cells += [""] * (len(keeps) - len(cells))
            lines.append(f"| {net} | {method} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def merge(paths: list[Path], out: Path) -> None:
    """One results.csv and table.md from the results.csv of several runs (e.g. one process
    per network or seed), rows ordered by network, method, keep and seed as one run."""
    rows = []
    for path in paths:
        with open(path, newline="") as fh:
            for r in csv.DictReader(fh):
                r["keep"], r["seed"] = float(r["keep"]), int(r["seed"])
                r["accuracy"], r["seconds"] = float(r["accuracy"]), float(r["seconds"])
                r["macs"] = float(r["macs"]) if r["macs"] else None
                rows.append(r)
    order = {"uncompressed": -1, **{m: i for i, m in enumerate(METHODS)}}
    nets = {n: i for i, n in enumerate(dict.fromkeys(r["net"] for r in rows))}
    rows.sort(
        key=lambda r: (
            nets[r["net"]],
            order.get(r["method"].split(",")[0], 99),
            "heads kept" in r["method"],
            -r["keep"],
            r["seed"],
        )
    )
    write(rows, out)


if __name__ == "__main__":
    main()
