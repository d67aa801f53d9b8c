"""``tropnnc sweep``: compress trained networks over a grid of methods, keeps and seeds."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from .common import UsageError, emit, experiment_function, read_config, results_text

SWEEP_GRID = ("networks", "methods", "keeps", "seeds", "dataset")

HELP = "compress trained networks over methods, keeps and seeds"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tropnnc sweep``."""
    p.add_argument("--config", help="JSON or TOML sweep configuration")
    add_grid_arguments(p)
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        help="local (default): rows one after the other here; ray: one Ray task "
        "per row (needs the extra tropnnc[ray])",
    )
    p.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    p.add_argument(
        "--device",
        help="where the rows run, e.g. cuda (default: cpu); with "
        "--executor ray each such row requests a GPU",
    )
    p.add_argument("-o", "--out", required=True, help="results directory")


def add_grid_arguments(p: argparse.ArgumentParser) -> None:
    """The grid of a sweep, one option per entry of :data:`SWEEP_GRID` (also used by
    ``python -m tropnnc.experiments.sweep``)."""
    p.add_argument("--networks", nargs="+")
    p.add_argument("--methods", nargs="+")
    p.add_argument("--keeps", nargs="+", type=float)
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--dataset", nargs="+")


def run(args: argparse.Namespace) -> int:
    """Run the sweep and print its table."""
    given = {k: getattr(args, k) for k in SWEEP_GRID if getattr(args, k) is not None}
    if args.config is None and not given:
        raise UsageError(
            "give --config FILE or the grid (--networks ... --methods ... "
            "--keeps ... --seeds ... --dataset D)"
        )
    config = read_config(args.config) if args.config else {}
    config.update(given)
    missing = [k for k in SWEEP_GRID if k not in config]
    if missing:
        raise UsageError(
            f"the sweep needs {', '.join('--' + k for k in missing)} (or those keys in --config)"
        )
    run_sweep = experiment_function("sweep", "run_sweep")
    valid = [
        p for p in inspect.signature(run_sweep).parameters if p not in (*SWEEP_GRID, "out_dir")
    ]
    extra = {k: v for k, v in config.items() if k not in SWEEP_GRID}
    extra.update(
        {
            k: getattr(args, k)
            for k in ("executor", "address", "device")
            if getattr(args, k) is not None
        }
    )
    unknown = sorted(set(extra) - set(valid))
    if unknown:
        raise UsageError(
            f"config file {args.config}: unknown sweep setting(s) "
            f"{', '.join(unknown)}; valid: {', '.join(SWEEP_GRID + tuple(valid))}"
        )
    extra.setdefault("progress", not args.quiet)
    csv_path = Path(run_sweep(*(config[k] for k in SWEEP_GRID), Path(args.out), **extra))
    emit(
        args,
        results_text(csv_path, csv_path.parent / "table.md"),
        {"out": str(args.out), "results": str(csv_path)},
    )
    return 0
