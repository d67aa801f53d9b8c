"""Data-free BN repair vs Model Folding on BatchNorm CNNs (results/repair).

Networks: zoo ``vgg-small`` (E4) and zoo ``resnet20`` (in_channels=1, input_size=28), trained on
Fashion-MNIST by :func:`tropnnc.experiments.train_cache.trained_model` (2 epochs on a seeded
12,000-image subset: CPU budget; cached under data/models). All conv blocks (every block
whose producer is a Conv2d) compressed to the same keep ratio; no fine-tuning; accuracy on a
seeded subset of the test split. Writes results.csv (one row per run; reruns skip done
rows), table.md (mean +- std over seeds) and README.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/repair.py --seeds 0 1 2
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

import torch  # noqa: E402
from torch import nn  # noqa: E402

import tropnnc  # noqa: E402
from tropnnc.experiments.train import evaluate  # noqa: E402
from tropnnc.experiments.train_cache import load_split, trained_model  # noqa: E402
from tropnnc.graph import discover  # noqa: E402
from tropnnc.surgery import get_module  # noqa: E402

NETS = {"vgg-small": None, "resnet20": {"in_channels": 1, "input_size": 28}}
TRAIN = {"epochs": 2, "train_size": 12000}
#: label -> (method, options, repair)
METHODS = {
    "tropnnc": ("tropnnc", {}, None),
    "tropnnc+repair": ("tropnnc", {}, "bn"),
    "tropnnc+repair-var": ("tropnnc", {}, "bn-var"),
    "model-folding": ("model-folding", {}, None),
    "model-folding+repair": ("model-folding", {}, "bn"),
    "model-folding-noAR": ("model-folding", {"approx_repair": False}, None),
    "neuron-merging": ("neuron-merging", {"bn_aware": True}, None),
    "neuron-merging+repair": ("neuron-merging", {"bn_aware": True}, "bn"),
}
FIELDS = [
    "network",
    "method",
    "keep",
    "seed",
    "accuracy",
    "baseline_accuracy",
    "parameters",
    "params_before",
    "certificate",
    "repaired_blocks",
    "blocks",
    "seconds",
]


def test_subset(size: int):
    test = load_split("fashion-mnist", "test")
    if size >= len(test):
        return test
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(20_011))[:size]
    return torch.utils.data.Subset(test, idx.tolist())


def conv_keep(model: nn.Module, keep: float) -> dict[str, float]:
    specs, _ = discover(model)
    return {s.producer: keep for s in specs if isinstance(get_module(model, s.producer), nn.Conv2d)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--keeps", type=float, nargs="+", default=[0.9, 0.75, 0.5, 0.25])
    p.add_argument("--networks", nargs="+", default=list(NETS))
    p.add_argument(
        "--methods", nargs="+", default=[m for m in METHODS if m != "model-folding-noAR"]
    )
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--out", default="results/repair")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows = list(csv.DictReader(csv_path.open())) if csv_path.exists() else []
    done = {(r["network"], r["method"], float(r["keep"]), int(r["seed"])) for r in rows}
    test = test_subset(args.test_size)
    new_file = not csv_path.exists()
    with csv_path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        if new_file:
            writer.writeheader()
        for seed in args.seeds:
            for net in args.networks:
                model = trained_model(net, "fashion-mnist", seed, config=NETS[net], **TRAIN)
                base = None
                for label in args.methods:
                    method, opts, repair = METHODS[label]
                    for keep in args.keeps:
                        if (net, label, keep, seed) in done:
                            continue
                        if base is None:
                            base = evaluate(model, test)
                        t0 = time.perf_counter()
                        res = tropnnc.compress(
                            model, conv_keep(model, keep), method, seed=seed, repair=repair, **opts
                        )
                        secs = time.perf_counter() - t0
                        acc = evaluate(res.model, test)
                        row = {
                            "network": net,
                            "method": label,
                            "keep": keep,
                            "seed": seed,
                            "accuracy": acc,
                            "baseline_accuracy": base,
                            "parameters": res.params_after,
                            "params_before": res.params_before,
                            "certificate": max(b.certificate for b in res.blocks),
                            "repaired_blocks": sum(b.repaired for b in res.blocks),
                            "blocks": len(res.blocks),
                            "seconds": round(secs, 2),
                        }
                        writer.writerow(row)
                        fh.flush()
                        rows.append({k: str(v) for k, v in row.items()})
                        print(
                            f"{net} seed {seed} {label:<22} keep {keep}: {acc:.4f} "
                            f"(base {base:.4f}, {secs:.1f}s)",
                            flush=True,
                        )
    write_table(rows, out / "table.md")


def write_table(rows: list[dict[str, str]], path: Path) -> None:
    """Mean +- std accuracy (%) per network, method and keep."""
    lines = []
    for net in dict.fromkeys(r["network"] for r in rows):
        sub = [r for r in rows if r["network"] == net]
        keeps = sorted({float(r["keep"]) for r in sub}, reverse=True)
        seeds = sorted({int(r["seed"]) for r in sub})
        base = [
            float(r["baseline_accuracy"])
            for r in sub
            if r["method"] == sub[0]["method"] and float(r["keep"]) == keeps[0]
        ]
        lines += [
            f"### {net} (seeds {', '.join(map(str, seeds))}; uncompressed "
            f"{_fmt([100 * b for b in base])})",
            "",
            "| method | " + " | ".join(f"keep {k:g}" for k in keeps) + " |",
            "|---|" + "---|" * len(keeps),
        ]
        for label in dict.fromkeys(r["method"] for r in sub):
            cells = []
            for k in keeps:
                acc = [
                    100 * float(r["accuracy"])
                    for r in sub
                    if r["method"] == label and float(r["keep"]) == k
                ]
                cells.append(_fmt(acc))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    path.write_text("\n".join(lines))


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


if __name__ == "__main__":
    main(sys.argv[1:])
