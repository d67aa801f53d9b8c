"""``tropnnc demo``: train a LeNet, compress it with every method, print the table."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import emit, experiment_function, results_text

HELP = "train, compress with every method, print a table, plot"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tropnnc demo``."""
    p.add_argument("-o", "--out", required=True, help="results directory")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its table."""
    run_demo = experiment_function("demo", "run_demo")
    table = Path(run_demo(Path(args.out), quick=args.quick, progress=not args.quiet))
    emit(args, results_text(table, table), {"out": str(args.out), "table": str(table)})
    return 0
