"""Residual streams and expansions compressed with calibration data: the least-squares refit
of every group consumer, against the same merges without data.

For the trained networks of ``benchmarks/architectures_accuracy.py`` (from its cache: 3
seeds, 4 epochs on Fashion-MNIST), compress everything (blocks and groups, streams
included) with the default pipeline at each keep, without data and with
``calibration=`` 2,000 seeded training images; accuracy on that script's seeded
2,000-image test subset.

    OMP_NUM_THREADS=1 .venv/bin/python results/architectures/calibrated/calibrated.py \
        --cache <dir> --out results/architectures/calibrated/resnet-mini --nets resnet-mini
    # and --nets mobilenetv2-mini --out .../mobilenetv2-mini, and
    # --nets resnet-mini --config '{"widths": [24, 48]}' --out .../resnet-mini-24-48
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import tropnnc
from tropnnc.experiments.train import evaluate
from tropnnc.experiments.train_cache import load_split, trained_model

DATA = ("without", "calibration")


def subset(split: str, size: int) -> Subset:
    """The seeded ``size``-image subset of a Fashion-MNIST split."""
    data = load_split("fashion-mnist", split)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    return Subset(data, idx[:size].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--nets", nargs="*", default=["resnet-mini", "mobilenetv2-mini"])
    parser.add_argument("--keeps", nargs="*", type=float, default=[0.9, 0.75, 0.5])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--calibration", type=int, default=2000, help="training images")
    parser.add_argument("--config", type=json.loads, default=None, help="zoo overrides (JSON)")
    args = parser.parse_args()
    test = subset("test", 2000)
    calib = next(iter(DataLoader(subset("train", args.calibration), args.calibration)))[0]
    rows = []
    for net in args.nets:
        for seed in args.seeds:
            model = trained_model(
                net, "fashion-mnist", seed, args.cache, config=args.config, epochs=4, batch_size=128
            )
            rows.append([net, "uncompressed", 1.0, seed, evaluate(model, test), 1.0])
            for data in DATA:
                for keep in args.keeps:
                    result = tropnnc.compress(
                        model, keep, seed=seed, calibration=calib if data != "without" else None
                    )
                    assert [s.layer for s in result.skipped] == [result.skipped[0].layer]
                    acc = evaluate(result.model, test)
                    macs = result.macs_after / result.macs_before
                    rows.append([net, data, keep, seed, acc, macs])
                    print(net, seed, data, keep, f"{acc:.4f}", f"{macs:.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    header = ["net", "data", "keep", "seed", "accuracy", "macs"]
    with open(args.out / "results.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    lines = ["| net | default pipeline | " + " | ".join(f"keep {k}" for k in args.keeps) + " |"]
    lines.append("| --- | --- | " + " | ".join("---" for _ in args.keeps) + " |")
    for net in args.nets:
        base = [100 * r[4] for r in rows if r[0] == net and r[1] == "uncompressed"]
        mean, std = statistics.mean(base), statistics.stdev(base)
        lines.append(f"| {net} | uncompressed | {mean:.1f} +- {std:.1f} |")
        for data in DATA:
            cells = []
            for keep in args.keeps:
                runs = [r for r in rows if r[:3] == [net, data, keep]]
                acc = [100 * r[4] for r in runs]
                cells.append(
                    f"{statistics.mean(acc):.1f} +- {statistics.stdev(acc):.1f} "
                    f"({100 * runs[0][5]:.0f}% MACs)"
                )
            label = (
                "without data" if data == "without" else f"{args.calibration} calibration images"
            )
            lines.append(f"| {net} | {label} | " + " | ".join(cells) + " |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
