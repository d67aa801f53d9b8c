"""``tropnnc compress``: the settings (flags over a --config file over the defaults), then
:func:`tropnnc.compress` and the new model directory."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import io
from .arguments import (
    FLAG_OPTIONS,
    parse_device,
    parse_keep,
    parse_numbers,
    parse_option,
    parse_positive_float,
    parse_positive_int,
    parse_range,
    parse_seed,
    parse_shape,
)
from .common import (
    CLIError,
    UsageError,
    add_model_arguments,
    emit,
    example_inputs,
    load_model,
    read_config,
)

if TYPE_CHECKING:
    from ..budget import Budget

log = logging.getLogger(__name__)


#: compress settings: name -> default (None: not passed on unless given)
COMPRESS_SETTINGS: dict[str, Any] = {
    "model": None,
    "weights": None,
    "zoo_config": None,
    "out": None,
    "keep": None,
    "method": None,
    "seed": 0,
    "strict": False,
    "attention": True,
    "radius": None,
    "input_range": None,
    "input_mean": None,
    "input_std": None,
    "options": None,
    "calibration": None,
    "dataset": None,
    "data_root": None,
    "budget": None,
    "budget_unit": None,
    "allocator": None,
    "min_width": None,
    "round_to": None,
    "repair": None,
    "reconstruct": None,
    "overwrite": False,
    "trust_pickle": False,
    "trust_code": False,
    "device": None,
}

#: settings that let a file run code: only the command line (or the API call) may give them
TRUST_SETTINGS = ("trust_pickle", "trust_code")

HELP = "compress a model into a new model directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tropnnc compress``."""
    add_model_arguments(p)
    p.add_argument("-o", "--out", help="output model directory (must not exist, see --overwrite)")
    p.add_argument(
        "--keep",
        type=parse_keep,
        help="fraction kept (0.5), width (64) or per layer (fc1=0.3,fc2=40)",
    )
    p.add_argument(
        "--method",
        help="compression method (default: the default pipeline, "
        "tropnnc with the least-squares reconstruction; "
        "'--method tropnnc' alone is the paper's algorithm)",
    )
    p.add_argument("--seed", type=parse_seed, help="seed for every random choice (default: 0)")
    p.add_argument(
        "--strict",
        action="store_true",
        default=None,
        help="fail on a block with an op the method cannot reason about",
    )
    p.add_argument(
        "--no-attention",
        dest="attention",
        action="store_false",
        default=None,
        help="leave attention heads as they are (default: narrow them by --keep too)",
    )
    p.add_argument(
        "--input-range",
        type=parse_range,
        metavar="LOW,HIGH",
        help="range of every raw input element the certificates cover "
        "(default: 0,1; --input-range=-1,1 for a negative LOW); each "
        "block's input bound is derived from it",
    )
    p.add_argument(
        "--input-mean",
        type=parse_numbers,
        metavar="M[,M...]",
        help="the model reads (x - mean) / std: mean, one value or one per channel",
    )
    p.add_argument(
        "--input-std",
        type=parse_numbers,
        metavar="S[,S...]",
        help="std of that normalisation (with --input-mean)",
    )
    p.add_argument(
        "--radius",
        type=parse_positive_float,
        help="instead: one norm bound for every block's input (a conv patch)",
    )
    p.add_argument(
        "--option",
        type=parse_option,
        action="append",
        metavar="KEY=VALUE",
        help="method option (repeatable), e.g. --option refine=5",
    )
    p.add_argument(
        "--calibration",
        type=parse_positive_int,
        metavar="N",
        help="use N training inputs of --dataset as calibration data",
    )
    p.add_argument("--dataset", help="dataset of --calibration")
    p.add_argument("--data-root", help="where to look for the dataset files")
    p.add_argument(
        "--budget",
        type=parse_positive_float,
        help="fraction of the compressible layers' parameters (or MACs) to keep; "
        "per-layer widths are chosen for you (instead of --keep)",
    )
    p.add_argument("--budget-unit", choices=("params", "macs"), help="unit of --budget")
    p.add_argument(
        "--allocator",
        choices=("tropnnc", "tropnnc-log", "tropnnc-sum", "method"),
        help="how --budget is split between layers (default: tropnnc curves)",
    )
    p.add_argument("--min-width", type=parse_positive_int, help="smallest width with --budget")
    p.add_argument(
        "--round-to",
        type=parse_positive_int,
        help="widths chosen by --budget are multiples of this (e.g. 8)",
    )
    p.add_argument(
        "--repair",
        choices=("bn", "bn-var"),
        help="data-free correction from BatchNorm statistics after each merge",
    )
    p.add_argument(
        "--reconstruct",
        choices=("ls", "none"),
        help="rebuild each consumer by least squares under a Gaussian model of the "
        "block's input (data-free; BatchNorm statistics when present); "
        "default: on for the default pipeline, off for a named --method",
    )
    p.add_argument("--config", help="JSON or TOML file with defaults for these options")
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace an existing output directory",
    )
    p.add_argument("--device", type=parse_device, help="run on this device (e.g. cuda)")
    p.add_argument(
        "--input-shape",
        type=parse_shape,
        help="one input's shape, e.g. 3,224,224, for MAC counts and "
        "--budget-unit macs (default: from the model when it says)",
    )


def compress_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The compress settings: command-line flags over the --config file over the defaults."""
    config: dict[str, Any] = {}
    if args.config:
        config = read_config(args.config)
        if isinstance(config.get("compress"), dict):
            config = {str(k).replace("-", "_"): v for k, v in config["compress"].items()}
        trusted = [k for k in TRUST_SETTINGS if k in config]
        if trusted:
            raise UsageError(
                f"config file {args.config}: {trusted[0]} can only be given on "
                f"the command line (--{trusted[0].replace('_', '-')}): a config "
                "file alone must not be able to run code"
            )
        valid = [k for k in COMPRESS_SETTINGS if k not in TRUST_SETTINGS]
        unknown = sorted(set(config) - set(valid))
        if unknown:
            raise UsageError(
                f"config file {args.config}: unknown setting(s) "
                f"{', '.join(unknown)}; valid: {', '.join(valid)}"
            )
        model = config.get("model")
        if (
            args.model_pos is None
            and args.model is None
            and isinstance(model, str)
            and io.names_code(model)
            and not args.trust_code
        ):
            raise UsageError(
                f"config file {args.config}: model {model!r} is a "
                "package.module:factory path, which imports and runs code: "
                "give it on the command line, or pass --trust-code"
            )
    if args.model_pos is not None and args.model is not None:
        raise UsageError("give the model once: as MODEL or as --model")
    if args.model_pos is not None:
        args.model = args.model_pos
    settings = {}
    for key, default in COMPRESS_SETTINGS.items():
        value = getattr(args, key, None)
        if value is None and key != "options":
            value = config.get(key, default)
        settings[key] = value
    options = config.get("options") or {}
    if not isinstance(options, dict):
        raise UsageError(f"config file {args.config}: options must be a table of key = value")
    flags = [k for k in options if str(k).replace("-", "_") in FLAG_OPTIONS]
    if flags:
        raise UsageError(
            f"config file {args.config}: {flags[0]} is not a method option: set "
            f"it at the top level (or with --{flags[0].replace('_', '-')})"
        )
    settings["options"] = {**options, **dict(args.option or [])}
    _check_config_types(settings, args.config)
    return settings


def _check_config_types(s: dict[str, Any], config: str | None) -> None:
    where = f"config file {config}: " if config else ""
    if isinstance(s["keep"], str):
        try:
            s["keep"] = parse_keep(s["keep"])
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"{where}{exc}") from None
    numbers = {"seed": int, "radius": (int, float), "calibration": int, "budget": (int, float)}
    for key, kind in numbers.items():
        if s[key] is not None and (isinstance(s[key], bool) or not isinstance(s[key], kind)):
            raise UsageError(f"{where}{key} must be a number, got {s[key]!r}")
    for key in ("strict", "attention", "overwrite", "trust_pickle", "trust_code"):
        if not isinstance(s[key], bool):
            raise UsageError(f"{where}{key} must be true or false, got {s[key]!r}")
    if isinstance(s["device"], str):
        s["device"] = torch.device(s["device"])
    if s["budget"] is not None and not (math.isfinite(s["budget"]) and s["budget"] > 0):
        raise UsageError(f"{where}budget must be a positive number, got {s['budget']!r}")
    if s["radius"] is not None and not (math.isfinite(s["radius"]) and s["radius"] > 0):
        raise UsageError(f"{where}radius must be a positive number, got {s['radius']!r}")
    if s["calibration"] is not None and s["calibration"] < 1:
        raise UsageError(f"{where}calibration must be a positive number of inputs")
    for key, parse in (
        ("input_range", parse_range),
        ("input_mean", parse_numbers),
        ("input_std", parse_numbers),
    ):
        value = s[key]
        if value is not None:
            if not isinstance(value, str):  # a number or a list (argparse or a config file)
                value = ",".join(
                    str(v) for v in (value if isinstance(value, (list, tuple)) else [value])
                )
            try:
                s[key] = parse(value)
            except (argparse.ArgumentTypeError, TypeError) as exc:
                raise UsageError(f"{where}{key}: {exc}") from None
    if (s["input_mean"] is None) != (s["input_std"] is None):
        raise UsageError(
            f"{where}input_mean and input_std go together (the normalisation "
            "(x - mean) / std the model was trained with)"
        )
    if s["radius"] is not None and any(s[k] is not None for k in ("input_range", "input_mean")):
        raise UsageError(f"{where}give either radius or input_range/input_mean/input_std, not both")


def run(args: argparse.Namespace) -> int:
    """Compress the model and write the new model directory."""
    from ..api import compress

    s = compress_settings(args)
    if s["model"] is None:
        raise UsageError("no model given (MODEL, --model or 'model' in --config)")
    if s["out"] is None:
        raise UsageError("no output directory given (--out or 'out' in --config)")
    if s["calibration"] is not None and s["dataset"] is None:
        raise UsageError("--calibration N needs --dataset (the training set to draw from)")
    if s["calibration"] is None and _data_driven(s["method"]):
        raise UsageError(
            f"method {s['method']!r} is data-driven: pass --calibration N "
            "--dataset D (N training inputs to read)"
        )
    if s["dataset"] is not None and s["calibration"] is None:
        log.warning("--dataset is only used with --calibration N; ignoring it")
    out = Path(s["out"])
    io.check_not_input(
        out,
        {
            "model": s["model"],
            "weights": s["weights"],
            "config file": args.config,
            "data root": s["data_root"],
        },
    )
    io.clean_stale(out)
    io.check_output(out, overwrite=s["overwrite"])

    model = load_model(
        s["model"], s["weights"], s["zoo_config"], s["trust_pickle"], s["trust_code"], s["device"]
    )
    kwargs: dict[str, Any] = {
        "method": s["method"],
        "seed": s["seed"],
        "strict": s["strict"],
        "attention": s["attention"],
    }
    if s["radius"] is not None:
        kwargs["radius"] = s["radius"]
    if s["input_range"] is not None:
        kwargs["input_range"] = tuple(s["input_range"])
    if s["input_mean"] is not None:
        kwargs["input_stats"] = (s["input_mean"], s["input_std"])
    if s["keep"] is not None:
        kwargs["keep"] = s["keep"]
    for key in ("repair", "reconstruct"):
        if s[key] is not None:
            kwargs[key] = None if s[key] == "none" else s[key]
    kwargs["budget"] = _budget(s)
    if (
        s["budget_unit"] == "macs"
        and args.input_shape is None
        and example_inputs(model, None) is None
    ):
        raise UsageError(
            f"--budget-unit macs needs the input shape of {s['model']}, which the "
            "model does not say: give --input-shape (one sample, e.g. 3,224,224)"
        )
    if args.input_shape is not None:
        kwargs["example_inputs"] = torch.zeros((1,) + args.input_shape)
        if getattr(model, "input_shape", None) is None:  # recorded in the manifest too
            model.input_shape = args.input_shape
    if s["calibration"] is not None:
        kwargs["calibration"] = _calibration_inputs(
            s["dataset"], s["calibration"], s["seed"], s["data_root"]
        )
    result = compress(model, **kwargs, **s["options"])
    settings = {
        "keep": s["keep"],
        "strict": s["strict"],
        "attention": s["attention"],
        "radius": s["radius"],
        "input_range": s["input_range"],
        "input_mean": s["input_mean"],
        "input_std": s["input_std"],
        "budget": s["budget"],
        "budget_unit": s["budget_unit"],
        "allocator": s["allocator"],
        "min_width": s["min_width"],
        "round_to": s["round_to"],
        "repair": s["repair"],
        "reconstruct": s["reconstruct"],
        "calibration": None
        if s["calibration"] is None
        else {"dataset": s["dataset"], "split": "train", "inputs": s["calibration"]},
        "source": {"model": s["model"], "weights": s["weights"], "zoo_config": s["zoo_config"]},
    }
    io.save(result, out, overwrite=s["overwrite"], settings=settings)
    report = result.to_dict()
    for block in report["blocks"]:
        block.pop("assignment", None)
        block.pop("shares", None)
    emit(args, f"{result.table()}\nwrote {out}", {"out": str(out), **report})
    return 0


def _budget(s: dict[str, Any]) -> Budget | None:
    """The :class:`~tropnnc.budget.Budget` the settings ask for (None: no --budget)."""
    from ..budget import Budget

    fields = {
        "unit": s["budget_unit"],
        "allocator": s["allocator"],
        "min_width": s["min_width"],
        "round_to": s["round_to"],
    }
    given = {k: v for k, v in fields.items() if v not in (None, "none")}
    if s["budget"] is None:
        if given:
            raise ValueError(
                "--budget-unit, --allocator, --min-width and --round-to apply to a "
                "budget only; pass --budget"
            )
        return None
    return Budget(s["budget"], **given)


def _data_driven(method: str) -> bool:
    from ..methods import method_class

    try:
        return bool(method_class(method).data_driven)
    except ValueError:  # an unknown method: compress() reports it with the valid names
        return False


def _calibration_inputs(dataset: str, n: int, seed: int, root: str | None) -> torch.Tensor:
    """``n`` training inputs of ``dataset``, drawn without replacement with ``seed``."""
    from ..experiments.datasets import get_dataset

    train = get_dataset(dataset, "train", root)
    if n > len(train):
        raise CLIError(
            f"--calibration {n}: the {dataset} training set has only {len(train)} examples"
        )
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    tensors = getattr(train, "tensors", None)
    if tensors is not None:
        return tensors[0][index]
    return torch.stack([train[int(i)][0] for i in index])
