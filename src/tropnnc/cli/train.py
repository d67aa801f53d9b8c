"""``tropnnc train``: a zoo network trained on a dataset (cached), written as a model directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import io
from .arguments import parse_json_object, parse_positive_int, parse_seed
from .common import emit, experiment_function

HELP = "train a zoo network and write it as a model directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tropnnc train``."""
    p.add_argument("network", help="zoo network name")
    p.add_argument("--dataset", required=True)
    p.add_argument("--seed", type=parse_seed, default=0)
    p.add_argument("-o", "--out", required=True, help="output model directory")
    p.add_argument("--epochs", type=parse_positive_int)
    p.add_argument(
        "--zoo-config",
        type=parse_json_object,
        help="zoo constructor arguments as JSON (inline or a file)",
    )
    p.add_argument("--cache-dir", help="training cache (default: the experiments cache)")
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Train (or take from the cache) and write the model directory."""
    trained_model = experiment_function("train_cache", "trained_model")
    out = Path(args.out)
    io.check_output(out, overwrite=args.overwrite)
    train_kw: dict[str, Any] = {} if args.epochs is None else {"epochs": args.epochs}
    if args.zoo_config is not None:
        train_kw["config"] = args.zoo_config
    model = trained_model(
        args.network, args.dataset, args.seed, cache_dir=args.cache_dir, **train_kw
    )
    meta = getattr(model, "train_meta", None)
    io.save(
        model, out, overwrite=args.overwrite, extra={"training": meta} if meta is not None else None
    )
    data = {
        "out": str(out),
        "network": args.network,
        "dataset": args.dataset,
        "seed": args.seed,
        "test_accuracy": (meta or {}).get("test_accuracy"),
    }
    acc = data["test_accuracy"]
    emit(args, f"wrote {out}" + ("" if acc is None else f" (test accuracy {acc:.4f})"), data)
    return 0
