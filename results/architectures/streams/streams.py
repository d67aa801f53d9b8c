"""Which part of a residual network collapses without data: its streams or the rest?

For resnet-mini and mobilenetv2-mini (the trained networks of ``benchmarks/
architectures_accuracy.py``, from its cache), compress with a keep mapping that names
``all`` blocks and groups, ``inner`` (plain blocks and groups that do not cross a residual
addition: the residual branches' hidden layers, MobileNetV2's expansions) or ``streams``
(only the groups that cross an addition), with the default pipeline, Model Folding and
the default with its groups merged by tropnnc instead of Model Folding, at each keep;
accuracy on the 2,000-image test subset of that script, 3 seeds.

    OMP_NUM_THREADS=1 .venv/bin/python results/architectures/streams/streams.py \
        --cache <dir> --out results/architectures/streams
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path
from unittest import mock

import torch

import tropnnc
from tropnnc.experiments.train import evaluate
from tropnnc.experiments.train_cache import load_split, trained_model
from tropnnc.graph import GroupSpec, discover
from tropnnc.methods import adaptive

PARTS = ("all", "inner", "streams")
#: the default pipeline with its groups merged by tropnnc instead of Model Folding (the
#: adaptive method's choice for all-BatchNorm ReLU groups), blocks as in the default
GROUPS_BY_TROPNNC = "default, groups by tropnnc"


def _plain_blocks_only(block) -> bool:
    """adaptive.has_batchnorm for blocks; False for channel groups."""
    return block.members is None and block.bn is not None


def part_of(spec) -> str:
    """``streams`` for a group crossing a residual addition, else ``inner``."""
    return "streams" if isinstance(spec, GroupSpec) and "add" in spec.between else "inner"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--nets", nargs="*", default=["resnet-mini", "mobilenetv2-mini"])
    parser.add_argument(
        "--methods", nargs="*", default=["default", "model-folding", GROUPS_BY_TROPNNC]
    )
    parser.add_argument("--keeps", nargs="*", type=float, default=[0.9, 0.75, 0.5])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--config", type=json.loads, default=None, help="zoo overrides (JSON)")
    args = parser.parse_args()
    test = load_split("fashion-mnist", "test")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    test = torch.utils.data.Subset(test, idx[:2000].tolist())
    rows = []
    for net in args.nets:
        for seed in args.seeds:
            model = trained_model(
                net, "fashion-mnist", seed, args.cache, config=args.config, epochs=4, batch_size=128
            )
            specs, _ = discover(model)
            base = evaluate(model, test)
            rows.append([net, "uncompressed", "-", 1.0, seed, base, 1.0])
            for method in args.methods:
                for part in PARTS:
                    names = [s.producer for s in specs if part in ("all", part_of(s))]
                    for keep in args.keeps:
                        chosen = None if method in ("default", GROUPS_BY_TROPNNC) else method
                        rule = _plain_blocks_only if method == GROUPS_BY_TROPNNC else None
                        with mock.patch.object(
                            adaptive, "has_batchnorm", rule or adaptive.has_batchnorm
                        ):
                            result = tropnnc.compress(
                                model, dict.fromkeys(names, keep), chosen, seed=seed
                            )
                        acc = evaluate(result.model, test)
                        macs = result.macs_after / result.macs_before
                        rows.append([net, method, part, keep, seed, acc, macs])
                        print(net, seed, method, part, keep, f"{acc:.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    header = ["net", "method", "part", "keep", "seed", "accuracy", "macs"]
    with open(args.out / "results.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    lines = ["| net | method | part | " + " | ".join(f"keep {k}" for k in args.keeps) + " |"]
    lines.append("| --- | --- | --- | " + " | ".join("---" for _ in args.keeps) + " |")
    for net in args.nets:
        base = [r[5] for r in rows if r[0] == net and r[1] == "uncompressed"]
        lines.append(f"| {net} | uncompressed | | {100 * statistics.mean(base):.1f} |")
        for method in args.methods:
            for part in PARTS:
                cells = []
                for keep in args.keeps:
                    runs = [r for r in rows if r[:4] == [net, method, part, keep]]
                    acc = [100 * r[5] for r in runs]
                    cells.append(
                        f"{statistics.mean(acc):.1f} +- {statistics.stdev(acc):.1f} "
                        f"({100 * runs[0][6]:.0f}% MACs)"
                    )
                lines.append(f"| {net} | {method} | {part} | " + " | ".join(cells) + " |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
