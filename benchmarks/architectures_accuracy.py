"""Accuracy of every data-free method on small trained networks of modern shapes.

Networks (zoo): ``resnet-mini`` (2 stages, projection shortcut: its residual streams are
channel groups), ``mobilenetv2-mini`` (inverted residuals: ReLU6, depthwise groups),
``vit-mini`` (GELU MLPs; attention left alone). Each is trained once on Fashion-MNIST
(seed 0, ``--epochs`` epochs on a seeded ``--train-size`` subset: CPU budget; cached under
``--cache``), then compressed with every data-free multi-output method at each keep ratio
and compression seed, no fine-tuning; accuracy on a seeded ``--test-size`` subset of the test
split. Writes results.csv (one row per run) and table.md (mean +- std over seeds) to --out.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/architectures_accuracy.py \
        --out results/architectures
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import tropnnc  # noqa: E402
from tropnnc.experiments.train import evaluate  # noqa: E402
from tropnnc.experiments.train_cache import load_split, trained_model  # noqa: E402

NETS = ["resnet-mini", "mobilenetv2-mini", "vit-mini"]
METHODS = [
    "tropnnc",
    "model-folding",
    "neuron-merging",
    "neural-path-kmeans",
    "cup",
    "l1",
    "random",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--nets", nargs="*", default=NETS)
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--keeps", nargs="*", type=float, default=[0.9, 0.75, 0.5])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--test-size", type=int, default=2000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    test = load_split("fashion-mnist", "test")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    test = torch.utils.data.Subset(test, idx[: args.test_size].tolist())
    rows = []
    for net in args.nets:
        model = trained_model(
            net, "fashion-mnist", 0, args.cache, epochs=args.epochs, train_size=args.train_size
        )
        base = evaluate(model, test)
        rows.append(
            {
                "net": net,
                "method": "uncompressed",
                "keep": 1.0,
                "seed": 0,
                "accuracy": base,
                "macs": None,
                "seconds": 0.0,
            }
        )
        print(f"{net}: {base:.4f}", flush=True)
        for method in args.methods:
            for keep in args.keeps:
                for seed in args.seeds:
                    start = time.perf_counter()
                    result = tropnnc.compress(model, keep, method, seed=seed)
                    seconds = time.perf_counter() - start
                    rows.append(
                        {
                            "net": net,
                            "method": method,
                            "keep": keep,
                            "seed": seed,
                            "accuracy": evaluate(result.model, test),
                            "macs": result.macs_after / result.macs_before,
                            "seconds": seconds,
                        }
                    )
                print(
                    f"  {method} keep {keep}: "
                    f"{statistics.mean(r['accuracy'] for r in rows[-len(args.seeds) :]):.4f}",
                    flush=True,
                )
    with open(args.out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| net | method | " + " | ".join(f"keep {k}" for k in args.keeps) + " |",
        "| --- | --- | " + " | ".join("---" for _ in args.keeps) + " |",
    ]
    for net in args.nets:
        base = next(r["accuracy"] for r in rows if r["net"] == net)
        lines.append(f"| {net} | uncompressed | {100 * base:.1f} |" + " |" * (len(args.keeps) - 1))
        for method in args.methods:
            cells = []
            for keep in args.keeps:
                acc = [
                    100 * r["accuracy"]
                    for r in rows
                    if (r["net"], r["method"], r["keep"]) == (net, method, keep)
                ]
                macs = next(
                    r["macs"]
                    for r in rows
                    if (r["net"], r["method"], r["keep"]) == (net, method, keep)
                )
                sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
                cells.append(f"{statistics.mean(acc):.1f} +- {sd:.1f} ({100 * macs:.0f}% MACs)")
            lines.append(f"| {net} | {method} | " + " | ".join(cells) + " |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
