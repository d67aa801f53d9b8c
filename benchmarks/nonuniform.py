"""Non-uniform (budgeted) vs uniform TropNNC at equal parameter budgets, on Fashion-MNIST.

For each network (zoo ``e2-cnn``: conv + FC blocks, experiment E2; zoo ``vgg-small``: 8 conv
blocks with BatchNorm + 1 FC block, experiment E4) and training seed:

1. train the network (Adam, :func:`tropnnc.experiments.train.train`, one thread; cached on disk);
2. for every uniform keep ratio, compress with ``tropnnc`` (uniform widths) and measure the
   parameter fraction p of the compressible layers it reaches;
3. compress with ``budget=p`` (non-uniform widths from the certificate curves, greedy
   allocation), and optionally the other allocations listed in ``--variants``;
4. report test accuracy (no fine-tuning) of each, at exactly comparable parameter counts.

Writes ``results.csv`` (one row per compressed model) and ``table.md`` to ``--out``; rows of
other (network, seed, keep, variant) combinations are kept from earlier runs, so seeds or
keep ratios can be run one at a time.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Subset

import tropnnc
from tropnnc import zoo
from tropnnc.experiments import datasets
from tropnnc.experiments.train import evaluate, train
from tropnnc.graph import discover

log = logging.getLogger("nonuniform")

NETWORKS = {
    # name: (epochs, training subset (None: all 60k, i.e. 54k train + 6k validation),
    #        test images used (the first ones of the 10k test set))
    "e2-cnn": (8, None, 10000),
    "vgg-small": (2, 20000, 5000),  # CPU-bound: a 20k subset, 2 epochs, 5k test images
}
KEEPS = (0.75, 0.5, 0.3, 0.2, 0.1)
FIELDS = [
    "network",
    "seed",
    "variant",
    "keep",
    "budget",
    "params",
    "params_fraction",
    "widths",
    "accuracy",
    "baseline_accuracy",
    "seconds",
]


def trained(name: str, seed: int, cache: Path) -> nn.Module:
    """The zoo network ``name`` trained on Fashion-MNIST with ``seed`` (cached weights)."""
    epochs, subset, _ = NETWORKS[name]
    path = cache / f"{name}-seed{seed}-e{epochs}-n{subset or 'all'}.safetensors"
    torch.manual_seed(seed)
    model = zoo.build(name)
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    ds = datasets.load_fashion_mnist("train")
    if subset is not None:
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
        ds = Subset(ds, order[:subset].tolist())
    report = train(model, ds, seed=seed, epochs=epochs, num_threads=1)
    log.info(
        "trained %s seed %d: %d epochs, val acc %.4f, %.0fs",
        name,
        seed,
        report.epochs_run,
        report.best_val_accuracy,
        report.seconds,
    )
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval()


def _table_only(out: Path) -> None:
    write(_read(out), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--keeps", nargs="+", type=float, default=list(KEEPS))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["uniform", "budget"],
        help="uniform, budget (tropnnc curves), budget-log (tropnnc-log), "
        "budget-r8 (round_to=8), "
        "cup-uniform, cup-threshold",
    )
    parser.add_argument("--cache", type=Path, default=Path("/tmp/tropnnc-nonuniform-cache"))
    parser.add_argument("--out", type=Path, default=Path("results/nonuniform"))
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument(
        "--table-only", action="store_true", help="rewrite table.md from results.csv"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("tropnnc").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    if args.table_only:
        _table_only(args.out)
        return
    if args.train_only:
        for name in args.networks:
            for seed in args.seeds:
                trained(name, seed, args.cache)
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    """Compress and evaluate every (network, seed, keep, variant); write CSV and table."""
    from tropnnc.budget import compressible_count

    test_all = datasets.load_fashion_mnist("test")
    rows = [
        r
        for r in _read(args.out)
        if not (
            r["network"] in args.networks
            and r["seed"] in args.seeds
            and r["keep"] in args.keeps
            and r["variant"] in args.variants
        )
    ]
    for name in args.networks:
        for seed in args.seeds:
            model = trained(name, seed, args.cache)
            test = Subset(test_all, range(min(NETWORKS[name][2], len(test_all))))
            base = evaluate(model, test)
            specs, _ = discover(model)
            full = compressible_count(model, specs, "params")
            log.info("%s seed %d: baseline %.4f, %d compressible params", name, seed, base, full)
            for keep in args.keeps:
                uniform = None
                for variant in args.variants:
                    start = time.perf_counter()
                    if variant == "uniform":
                        result = tropnnc.compress(model, keep, seed=seed)
                        uniform = result
                        budget = None
                    else:
                        if uniform is None:
                            uniform = tropnnc.compress(model, keep, seed=seed)
                        budget = compressible_count(uniform.model, specs, "params") / full
                        result = _variant(model, variant, keep, budget, seed)
                    seconds = time.perf_counter() - start
                    params = compressible_count(result.model, specs, "params")
                    acc = evaluate(result.model, test)
                    widths = "/".join(str(b.units_after) for b in result.blocks)
                    rows.append(
                        {
                            "network": name,
                            "seed": seed,
                            "variant": variant,
                            "keep": keep,
                            "budget": "" if budget is None else budget,
                            "params": params,
                            "params_fraction": params / full,
                            "widths": widths,
                            "accuracy": acc,
                            "baseline_accuracy": base,
                            "seconds": seconds,
                        }
                    )
                    log.info(
                        "%s seed %d keep %.2f %-14s params %.4f acc %.4f widths %s",
                        name,
                        seed,
                        keep,
                        variant,
                        params / full,
                        acc,
                        widths,
                    )
            write(rows, args.out)


def _variant(
    model: nn.Module, variant: str, keep: float, budget: float, seed: int
) -> tropnnc.CompressionResult:
    if variant == "budget":
        return tropnnc.compress(model, budget=budget, seed=seed)
    if variant == "budget-log":
        return tropnnc.compress(
            model, budget=tropnnc.Budget(budget, allocator="tropnnc-log"), seed=seed
        )
    if variant == "budget-r8":
        return tropnnc.compress(model, budget=tropnnc.Budget(budget, round_to=8), seed=seed)
    if variant == "cup-uniform":
        return tropnnc.compress(model, keep, "cup", seed=seed)
    if variant == "cup-threshold":
        return tropnnc.compress(model, budget=budget, method="cup", seed=seed)
    raise ValueError(f"unknown variant {variant!r}")


def _read(out: Path) -> list[dict[str, object]]:
    """Rows of earlier runs (the caller keeps those it does not recompute)."""
    path = out / "results.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        rows: list[dict[str, object]] = list(csv.DictReader(fh))
    for r in rows:
        for key in ("seed", "params"):
            r[key] = int(r[key])
        for key in ("keep", "params_fraction", "accuracy", "baseline_accuracy", "seconds"):
            r[key] = float(r[key])
    return rows


def write(rows: list[dict[str, object]], out: Path) -> None:
    """results.csv (all rows) and table.md (mean +- std over seeds)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "Test accuracy (%) on Fashion-MNIST, no fine-tuning, mean +- std over seeds "
        "(n = number of seeds). `params` = mean fraction of the parameters of the "
        "compressible layers that is kept.",
        "",
    ]
    for name in dict.fromkeys(str(r["network"]) for r in rows):
        sel = [r for r in rows if r["network"] == name]
        variants = list(dict.fromkeys(str(r["variant"]) for r in sel))
        bases = list({(r["seed"], r["baseline_accuracy"]) for r in sel})
        lines.append(f"### {name} (uncompressed: {_fmt([b for _, b in bases])})")
        lines.append("")
        head = "| keep (uniform) | " + " | ".join(f"{v}: params | {v}: acc" for v in variants)
        lines.append(head + " |")
        lines.append("|---" * (1 + 2 * len(variants)) + "|")
        for keep in sorted({float(r["keep"]) for r in sel}, reverse=True):
            cells = [f"{keep:g}"]
            for v in variants:
                cur = [r for r in sel if r["keep"] == keep and r["variant"] == v]
                if not cur:
                    cells += ["", ""]
                    continue
                frac = statistics.mean(float(r["params_fraction"]) for r in cur)
                cells += [f"{frac:.4f}", _fmt([float(r["accuracy"]) for r in cur])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    (out / "table.md").write_text("\n".join(lines))


def _fmt(accs: list[float]) -> str:
    pct = [100 * a for a in accs]
    sd = statistics.stdev(pct) if len(pct) > 1 else 0.0
    return f"{statistics.mean(pct):.2f} +- {sd:.2f} (n={len(pct)})"


if __name__ == "__main__":
    main()
