"""The ``tropnnc`` command line: compress, inspect, evaluate, export, train, sweep, demo.

Exit status: 0 on success, 2 on usage errors (argparse), 1 on any other failure with one line
``tropnnc: error: ...`` on stderr (the traceback too with ``--verbose``). ``--json`` prints one
JSON object on stdout instead of the human-readable text; ``--quiet`` prints nothing but errors.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import io, zoo
from .counting import layer_macs
from .io import ModelFileError

if TYPE_CHECKING:
    from .budget import Budget

log = logging.getLogger(__name__)

PROG = "tropnnc"

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


class CLIError(Exception):
    """A failure reported as one line with exit status 1."""


class UsageError(Exception):
    """A usage problem found after parsing (exit status 2)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: staged outputs are removed on the way out."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


#: compress settings that have their own flag: refused as --option KEY=VALUE
FLAG_OPTIONS = (
    "keep",
    "budget",
    "budget_unit",
    "allocator",
    "min_width",
    "round_to",
    "repair",
    "reconstruct",
    "seed",
    "strict",
    "radius",
    "calibration",
    "method",
)

#: settings that let a file run code: only the command line (or the API call) may give them
TRUST_SETTINGS = ("trust_pickle", "trust_code")


# --------------------------------------------------------------------------------------------
# argument types
# --------------------------------------------------------------------------------------------


def parse_keep(text: str) -> float | int | dict[str, float | int]:
    """``0.5`` (fraction), ``64`` (width) or ``layer=value,layer=value`` (per layer)."""
    text = str(text).strip()
    if "=" not in text:
        return _keep_number(text, "--keep")
    keep: dict[str, float | int] = {}
    for item in text.split(","):
        layer, sep, value = item.partition("=")
        if not sep or not layer.strip():
            raise argparse.ArgumentTypeError(f"bad --keep item {item!r}: expected layer=value")
        keep[layer.strip()] = _keep_number(value, f"--keep {layer.strip()}")
    return keep


def _keep_number(text: str, what: str) -> float | int:
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{what} expects a fraction like 0.5, a width like 64 or layer=value,...; got {text!r}"
        ) from None


def parse_value(text: str) -> Any:
    """A method option value: None, a bool, an int, a float, or else the string itself."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if re.fullmatch(r"[+-]?\d+", low):
        return int(low)
    try:
        return float(low)
    except ValueError:
        return text


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` for ``--option``; dashes in the key become underscores."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--option expects key=value, got {text!r}")
    key = key.strip().replace("-", "_")
    if key in FLAG_OPTIONS:
        raise argparse.ArgumentTypeError(
            f"{key} is not a method option: use --{key.replace('_', '-')} {value.strip()}"
        )
    parsed = parse_value(value)
    if (
        isinstance(parsed, int)
        and not isinstance(parsed, bool)
        and not -(1 << 63) <= parsed < 1 << 63
    ):
        raise argparse.ArgumentTypeError(
            f"--option {key}={value.strip()}: the number is too large (at most 9223372036854775807)"
        )
    return key, parsed


def _json_object(text: str) -> dict[str, Any]:
    """A JSON object given inline or as the path of a .json file."""
    source = text
    if not text.lstrip().startswith("{") and Path(text).is_file():
        source = Path(text).read_text()
    try:
        value = json.loads(source)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not a JSON object: {text[:80]!r} ({exc})") from None
    except RecursionError:
        raise argparse.ArgumentTypeError(f"JSON nested too deeply: {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _floats(text: str) -> list[float]:
    """``0.5`` or ``0.485,0.456,0.406``: one number or one per channel."""
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
    return values


def _range(text: str) -> list[float]:
    values = _floats(text)
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with LOW <= HIGH, got {text!r}")
    return values


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected a shape like 1,28,28, got {text!r}")
    return shape


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 1 << 32:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to {(1 << 32) - 1}, got {text!r}")
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError(
            "'meta' tensors hold no values, so nothing can be "
            "compressed or evaluated on them: use cpu or cuda"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this torch ({torch.__version__}) sees no CUDA device: use cpu"
        )
    return device


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tropnnc`` command."""
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    _add_global(common, suppress=True)
    parser = argparse.ArgumentParser(
        prog=PROG, description="Data-free structured compression of trained ReLU networks."
    )
    _add_global(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, handler: Callable[[argparse.Namespace], int | None], help_text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(handler=handler, parser=p)
        return p

    p = command("compress", _cmd_compress, "compress a model into a new model directory")
    _add_model_args(p)
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
    p.add_argument("--seed", type=_seed, help="seed for every random choice (default: 0)")
    p.add_argument(
        "--strict",
        action="store_true",
        default=None,
        help="fail on a block with an op the method cannot reason about",
    )
    p.add_argument(
        "--input-range",
        type=_range,
        metavar="LOW,HIGH",
        help="range of every raw input element the certificates cover "
        "(default: 0,1; --input-range=-1,1 for a negative LOW); each "
        "block's input bound is derived from it",
    )
    p.add_argument(
        "--input-mean",
        type=_floats,
        metavar="M[,M...]",
        help="the model reads (x - mean) / std: mean, one value or one per channel",
    )
    p.add_argument(
        "--input-std",
        type=_floats,
        metavar="S[,S...]",
        help="std of that normalisation (with --input-mean)",
    )
    p.add_argument(
        "--radius",
        type=_positive_float,
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
        type=_positive_int,
        metavar="N",
        help="use N training inputs of --dataset as calibration data",
    )
    p.add_argument("--dataset", help="dataset of --calibration")
    p.add_argument("--data-root", help="where to look for the dataset files")
    p.add_argument(
        "--budget",
        type=_positive_float,
        help="fraction of the compressible layers' parameters (or MACs) to keep; "
        "per-layer widths are chosen for you (instead of --keep)",
    )
    p.add_argument("--budget-unit", choices=("params", "macs"), help="unit of --budget")
    p.add_argument(
        "--allocator",
        choices=("tropnnc", "tropnnc-log", "tropnnc-sum", "method"),
        help="how --budget is split between layers (default: tropnnc curves)",
    )
    p.add_argument("--min-width", type=_positive_int, help="smallest width with --budget")
    p.add_argument(
        "--round-to",
        type=_positive_int,
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
    p.add_argument("--device", type=_device, help="run on this device (e.g. cuda)")
    p.add_argument(
        "--input-shape",
        type=_shape,
        help="one input's shape, e.g. 3,224,224, for MAC counts and "
        "--budget-unit macs (default: from the model when it says)",
    )

    p = command("info", _cmd_info, "per-layer widths, parameters, MACs and compressible blocks")
    _add_model_args(p)
    p.add_argument("--input-shape", type=_shape, help="one input's shape, e.g. 1,28,28")

    p = command(
        "evaluate",
        _cmd_evaluate,
        "accuracy on a dataset and/or data-free fidelity to a reference model",
    )
    _add_model_args(p)
    p.add_argument("--dataset", help="measure accuracy on this dataset")
    p.add_argument("--split", default="test", choices=("train", "test", "val"))
    p.add_argument("--data-root", help="where to look for the dataset files")
    p.add_argument("--limit", type=_positive_int, help="use only the first N examples")
    p.add_argument("--reference", help="reference model (same forms as MODEL) for fidelity")
    p.add_argument("--reference-weights", help="weights of the reference model")
    p.add_argument("--reference-zoo-config", type=_json_object)
    p.add_argument("--inputs", help="fidelity inputs (.pt, .npy or .safetensors tensor)")
    p.add_argument(
        "--samples",
        type=_positive_int,
        default=1000,
        help="number of random fidelity inputs (default: 1000)",
    )
    p.add_argument(
        "--distribution",
        choices=("uniform", "normal"),
        default="uniform",
        help="random inputs: uniform in [0, 1) (default) or standard normal",
    )
    p.add_argument("--input-shape", type=_shape, help="one input's shape, e.g. 1,28,28")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random inputs")
    p.add_argument("--batch-size", type=_positive_int, default=1000)
    p.add_argument("--device", type=_device, help="run on this device (e.g. cuda)")

    p = command("export", _cmd_export, "export a model with torch's exporters (pt2, onnx)")
    _add_model_args(p)
    p.add_argument("-o", "--out", required=True, help="output file")
    p.add_argument(
        "--format",
        choices=("pt2", "onnx"),
        help="pt2 (torch.export) or onnx; default: from the --out suffix",
    )
    p.add_argument("--input-shape", type=_shape, help="one input's shape, e.g. 1,28,28")
    p.add_argument(
        "--static-batch",
        action="store_true",
        help="export a fixed batch size instead of a dynamic one",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")

    p = command("train", _cmd_train, "train a zoo network and write it as a model directory")
    p.add_argument("network", help="zoo network name")
    p.add_argument("--dataset", required=True)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("-o", "--out", required=True, help="output model directory")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument(
        "--zoo-config",
        type=_json_object,
        help="zoo constructor arguments as JSON (inline or a file)",
    )
    p.add_argument("--cache-dir", help="training cache (default: the experiments cache)")
    p.add_argument("--overwrite", action="store_true")

    p = command("sweep", _cmd_sweep, "compress trained networks over methods, keeps and seeds")
    p.add_argument("--config", help="JSON or TOML sweep configuration")
    p.add_argument("--networks", nargs="+")
    p.add_argument("--methods", nargs="+")
    p.add_argument("--keeps", nargs="+", type=float)
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--dataset", nargs="+")
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

    p = command("demo", _cmd_demo, "train, compress with every method, print a table, plot")
    p.add_argument("-o", "--out", required=True, help="results directory")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")
    return parser


def _add_global(p: argparse.ArgumentParser, suppress: bool) -> None:
    """--json/--quiet/--verbose, accepted before and after the subcommand (the subcommand's
    copies default to SUPPRESS so they do not reset what was given before it)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    p.add_argument(
        "--json", action="store_true", default=default(False), help="print machine-readable JSON"
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default(False),
        help="print nothing but errors",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="more logging (-vv: debug); tracebacks on errors",
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model_pos",
        nargs="?",
        metavar="MODEL",
        help="model directory, zoo network name, package.module:factory, or a pickled module file",
    )
    p.add_argument("--model", dest="model", help="the same as MODEL")
    p.add_argument(
        "--weights", help="state_dict file (.safetensors or .pt) for a zoo network or factory"
    )
    p.add_argument(
        "--zoo-config",
        type=_json_object,
        help="zoo/factory constructor arguments as JSON (inline or a file)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        default=None,
        help="allow unpickling Python objects: only for files you trust",
    )
    p.add_argument(
        "--trust-code",
        action="store_true",
        default=None,
        help="allow a model directory to import and call the factory it names",
    )


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # usage errors (2), --help and --version (0)
        return _exit_code(exc)
    restore = _configure_logging(args)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:  # found after parsing: reported like argparse's own errors
        args.parser.print_usage(sys.stderr)
        print(f"{args.parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        return _exit_code(exc)
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"{PROG}: error: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        restore()


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (CLIError, ValueError, TypeError, OSError)):
        return text
    return f"{type(exc).__name__}: {text}"


def _configure_logging(args: argparse.Namespace) -> Callable[[], None]:
    """Send the ``tropnnc`` loggers to stderr at the requested level; return an undo."""
    if args.quiet:
        level = logging.ERROR
    else:
        level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logger = logging.getLogger("tropnnc")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate

    return restore


def _emit(args: argparse.Namespace, text: str, data: Mapping[str, Any]) -> None:
    """The command's output: JSON with --json, nothing with --quiet, else the text."""
    if args.json:
        print(json.dumps(io.jsonable(data), indent=1))
    elif not args.quiet:
        print(text)


# --------------------------------------------------------------------------------------------
# compress
# --------------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Settings from a JSON or TOML file (top level or a ``[compress]`` table)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file {file} does not exist")
    try:
        if file.suffix.lower() == ".toml":
            data = _toml().loads(file.read_text())
        else:
            data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSON and TOML decode errors
        raise UsageError(
            f"config file {file} is not valid {file.suffix[1:] or 'JSON'}: {exc}"
        ) from None
    except RecursionError:
        raise UsageError(f"config file {file} is nested too deeply") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {file} must hold a table/object of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _toml() -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise UsageError(
                "TOML config files need Python 3.11 or the tomli package; use JSON instead"
            ) from None
    return tomllib


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
    for key in ("strict", "overwrite", "trust_pickle", "trust_code"):
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
    for key, parse in (("input_range", _range), ("input_mean", _floats), ("input_std", _floats)):
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


def _cmd_compress(args: argparse.Namespace) -> int:
    from .api import compress

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

    model = _load(
        s["model"], s["weights"], s["zoo_config"], s["trust_pickle"], s["trust_code"], s["device"]
    )
    kwargs: dict[str, Any] = {"method": s["method"], "seed": s["seed"], "strict": s["strict"]}
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
        and _example_inputs(model, None) is None
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
    _emit(args, f"{result.table()}\nwrote {out}", {"out": str(out), **report})
    return 0


def _budget(s: dict[str, Any]) -> Budget | None:
    """The :class:`~tropnnc.budget.Budget` the settings ask for (None: no --budget)."""
    from .budget import Budget

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
    from .methods import method_class

    try:
        return bool(method_class(method).data_driven)
    except ValueError:  # an unknown method: compress() reports it with the valid names
        return False


def _calibration_inputs(dataset: str, n: int, seed: int, root: str | None) -> torch.Tensor:
    """``n`` training inputs of ``dataset``, drawn without replacement with ``seed``."""
    from .data import get_dataset

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


def _load(
    spec: str,
    weights: str | None,
    zoo_config: Mapping[str, Any] | None,
    trust_pickle: bool | None,
    trust_code: bool | None,
    device: torch.device | None = None,
    random_init: bool = False,
) -> nn.Module:
    model = io.load_model(
        spec,
        weights=weights,
        zoo_config=zoo_config,
        trust_pickle=bool(trust_pickle),
        trust_code=bool(trust_code),
        random_init=random_init,
    )
    return model if device is None else model.to(device)


def _model_from_args(args: argparse.Namespace, random_init: bool = False) -> nn.Module:
    if args.model_pos is not None and args.model is not None:
        raise UsageError("give the model once: as MODEL or as --model")
    spec = args.model_pos if args.model_pos is not None else args.model
    if spec is None:
        raise UsageError("no model given (MODEL or --model)")
    args.model = spec
    return _load(
        spec,
        args.weights,
        args.zoo_config,
        args.trust_pickle,
        args.trust_code,
        getattr(args, "device", None),
        random_init,
    )


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def _example_inputs(model: nn.Module, shape: tuple[int, ...] | None) -> torch.Tensor | None:
    from .counting import infer_example_inputs

    if shape is not None:
        return torch.zeros((1,) + tuple(shape))
    return infer_example_inputs(model)


def _cmd_info(args: argparse.Namespace) -> int:
    from .counting import count_params
    from .graph import TraceError, discover

    model = _model_from_args(args, random_init=True)
    try:
        specs, skipped = discover(model)
        untraced = None
    except TraceError as exc:
        specs, skipped, untraced = [], [], str(exc)
    members = {
        p.layer: (s, p)
        for s in specs  # every producer and depthwise member
        for p in (*s.producers, *getattr(s, "channelwise", ()))
    }
    blocks = {name: s for name, (s, _) in members.items()}
    reasons = {s.layer: s.reason for s in skipped}
    example = _example_inputs(model, args.input_shape)
    macs: dict[str, int] = {}
    if example is not None:
        try:
            macs = layer_macs(model, example)
        except Exception as exc:  # a wrong --input-shape, a model needing other inputs
            raise CLIError(
                f"cannot run {args.model} on an input of shape "
                f"{tuple(example.shape[1:])} to count MACs: {_one_line(exc)} "
                "(use --input-shape)"
            ) from None
    rows = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        linear = isinstance(mod, nn.Linear)
        spec = blocks.get(name)
        if spec is not None:
            status = (
                f"compressible -> {spec.consumer}"
                if not hasattr(spec, "channelwise")
                else f"compressible in channel group {spec.producer} ({len(spec.layers)} layers)"
            )
            bn = members[name][1].bn
            status += f" (folds {bn})" if bn else ""
        else:
            status = f"no: {reasons.get(name) or untraced or 'not reached by the forward pass'}"
        rows.append(
            {
                "layer": name,
                "type": type(mod).__name__,
                "in": mod.in_features if linear else mod.in_channels,
                "out": mod.out_features if linear else mod.out_channels,
                "kernel": None if linear else list(mod.kernel_size),
                "params": sum(p.numel() for p in mod.parameters(recurse=False)),
                "macs": macs.get(name),
                "compressible": spec is not None,
                "consumer": None if spec is None else spec.consumer,
                "batchnorm": None if spec is None else members[name][1].bn,
                "status": status,
            }
        )
    total_params = count_params(model)
    total_macs = sum(macs.values()) if macs else None
    data = {
        "model": args.model,
        "class": type(model).__name__,
        "input_shape": None if example is None else list(example.shape[1:]),
        "dtype": _dtype(model),
        "params": total_params,
        "macs": total_macs,
        "layers": rows,
        "compressible_blocks": len(specs),
    }
    if args.weights is None and not Path(args.model).exists():
        data["weights"] = "random initialization (no --weights)"
    if Path(args.model).is_dir():
        plan = io.read_manifest(args.model).get("compression") or {}
        data["compression"] = {k: plan.get(k) for k in ("method", "seed", "keep", "widths")}
    _emit(args, _info_text(data), data)
    return 0


def _dtype(model: nn.Module) -> str | None:
    param = next(model.parameters(), None)
    return None if param is None else str(param.dtype)


def _info_text(data: Mapping[str, Any]) -> str:
    head = f"{'layer':<24}{'type':<8}{'in':>7}{'out':>7}{'kernel':>8}{'params':>11}{'MACs':>12}"
    lines = [
        f"{data['model']} ({data['class']}, {data['dtype']}, input {data['input_shape']})",
        head,
    ]
    for r in data["layers"]:
        kernel = "x".join(map(str, r["kernel"])) if r["kernel"] else "-"
        macs = "-" if r["macs"] is None else str(r["macs"])
        lines.append(
            f"{r['layer']:<24}{r['type']:<8}{r['in']:>7}{r['out']:>7}{kernel:>8}"
            f"{r['params']:>11}{macs:>12}  {r['status']}"
        )
    macs = "-" if data["macs"] is None else data["macs"]
    lines.append(
        f"total: {data['params']} parameters, {macs} MACs, "
        f"{data['compressible_blocks']} compressible blocks"
    )
    if "weights" in data:
        lines.append(f"weights: {data['weights']}")
    if "compression" in data and data["compression"].get("method"):
        c = data["compression"]
        lines.append(f"compressed with {c['method']} (seed {c['seed']}), widths {c['widths']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def fidelity(
    model: nn.Module, reference: nn.Module, inputs: torch.Tensor, batch_size: int = 1000
) -> dict[str, float | int]:
    """How closely ``model`` reproduces ``reference`` on ``inputs`` (both in eval mode).

    ``relative_error`` = ||f(X) - g(X)||_F / ||g(X)||_F over all outputs, ``max_abs_error``
    the largest output difference, ``top1_agreement`` the fraction of inputs where both pick
    the same class (the same sign of the logit for single-output models). Computed in float64.
    """
    modes = [(m, m.training) for m in (model, reference)]
    outs: list[list[torch.Tensor]] = [[], []]
    try:
        for m, _ in modes:
            m.eval()
        for start in range(0, inputs.shape[0], batch_size):
            batch = inputs[start : start + batch_size]
            for i, m in enumerate((model, reference)):
                param = next(m.parameters(), None)
                like = {} if param is None else {"dtype": param.dtype, "device": param.device}
                outs[i].append(m(batch.to(**like)).to(torch.float64).cpu().flatten(1))
    finally:
        for m, mode in modes:
            m.train(mode)
    f, g = torch.cat(outs[0]), torch.cat(outs[1])
    if f.shape != g.shape:
        raise CLIError(
            f"the models' outputs differ in shape: {tuple(f.shape[1:])} vs {tuple(g.shape[1:])}"
        )
    diff = f - g
    if f.shape[1] == 1:
        agree = ((f[:, 0] > 0) == (g[:, 0] > 0)).double().mean()
    else:
        agree = (f.argmax(1) == g.argmax(1)).double().mean()
    ref_norm = float(g.norm())
    return {
        "samples": int(f.shape[0]),
        "relative_error": float(diff.norm()) / ref_norm if ref_norm > 0 else math.inf,
        "max_abs_error": float(diff.abs().max()) if diff.numel() else 0.0,
        "top1_agreement": float(agree),
    }


def read_inputs(path: str | os.PathLike[str]) -> torch.Tensor:
    """One tensor of inputs from a .npy, .safetensors or torch.save file (no pickle)."""
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise CLIError(f"inputs file {file} does not exist")
    try:
        if file.suffix == ".npy":
            return torch.from_numpy(np.load(file, allow_pickle=False))
        if file.suffix == ".safetensors":
            tensors: Any = io.read_state_dict(file)
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except ModelFileError:
        raise
    except Exception as exc:
        raise CLIError(f"{file}: cannot read inputs ({_one_line(exc)})") from None
    if isinstance(tensors, torch.Tensor):
        return tensors
    if isinstance(tensors, Mapping):
        for key in ("inputs", "x"):
            if isinstance(tensors.get(key), torch.Tensor):
                return tensors[key]
        values = list(tensors.values())
        if len(values) == 1 and isinstance(values[0], torch.Tensor):
            return values[0]
    raise CLIError(f"{file}: expected one tensor (or a mapping with an 'inputs' tensor)")


def _check_reference_weights(reference: str, weights: str | None) -> None:
    """The reference's own weights flag is --reference-weights (io's messages say --weights)."""
    path = Path(reference)
    if (
        weights is None
        and not path.exists()
        and (reference in zoo.names() or io.names_code(reference))
    ):
        raise UsageError(
            f"--reference {reference} gives only the architecture: pass its "
            "weights with --reference-weights FILE (a .safetensors or .pt "
            "state_dict)"
        )
    if weights is not None and path.exists():
        raise UsageError(f"--reference {reference} holds its own weights: drop --reference-weights")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.dataset is None and args.reference is None:
        raise UsageError(
            "nothing to evaluate: give --dataset (accuracy) and/or --reference (fidelity)"
        )
    if args.reference is not None:
        _check_reference_weights(args.reference, args.reference_weights)
    model = _model_from_args(args)
    data: dict[str, Any] = {"model": args.model}
    lines = []
    if args.dataset is not None:
        from torch.utils.data import Subset

        from .data import get_dataset
        from .train import evaluate

        dataset = get_dataset(args.dataset, args.split, args.data_root)
        if args.limit is not None and args.limit < len(dataset):
            dataset = Subset(dataset, range(args.limit))
        accuracy = evaluate(model, dataset, args.batch_size)
        data.update(
            dataset=args.dataset, split=args.split, examples=len(dataset), accuracy=accuracy
        )
        lines.append(
            f"accuracy on {args.dataset} {args.split} ({len(dataset)} examples): {accuracy:.4f}"
        )
    if args.reference is not None:
        reference = _load(
            args.reference,
            args.reference_weights,
            args.reference_zoo_config,
            args.trust_pickle,
            args.trust_code,
            args.device,
        )
        if args.inputs is not None:
            inputs, source = read_inputs(args.inputs), str(args.inputs)
        else:
            example = _example_inputs(reference, args.input_shape)
            if example is None:
                example = _example_inputs(model, None)
            if example is None:
                raise UsageError("cannot tell the input shape: give --input-shape or --inputs")
            gen = torch.Generator().manual_seed(args.seed)
            shape = (args.samples,) + tuple(example.shape[1:])
            inputs = (
                torch.rand(shape, generator=gen)
                if args.distribution == "uniform"
                else torch.randn(shape, generator=gen)
            )
            source = f"{args.samples} random {args.distribution} inputs (seed {args.seed})"
        try:
            fid = fidelity(model, reference, inputs, args.batch_size)
        except RuntimeError as exc:
            raise CLIError(
                f"running the models on inputs of shape {tuple(inputs.shape)} "
                f"failed: {_one_line(exc)}"
            ) from None
        data.update(reference=args.reference, inputs=source, fidelity=fid)
        lines.append(
            f"fidelity to {args.reference} on {source}: relative error "
            f"{fid['relative_error']:.4g}, max abs error {fid['max_abs_error']:.4g}, "
            f"top-1 agreement {fid['top1_agreement']:.4f}"
        )
    _emit(args, "\n".join(lines), data)
    return 0


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def _cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    fmt = args.format or {".pt2": "pt2", ".onnx": "onnx"}.get(out.suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot tell the format from {out.name!r}: give --format pt2|onnx")
    if fmt == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise CLIError(
                f"export --format onnx needs the optional package(s) "
                f"{', '.join(missing)}: pip install {' '.join(missing)}"
            )
    spec = args.model_pos if args.model_pos is not None else args.model
    io.check_not_input(out, {"model": spec, "weights": args.weights})
    io.clean_stale(out)
    io.check_output(out, overwrite=args.overwrite, directory=False)
    model = _model_from_args(args).eval()
    example = _example_inputs(model, args.input_shape)
    if example is None:
        raise UsageError("cannot tell the input shape: give --input-shape")
    param = next(model.parameters(), None)
    like = {} if param is None else {"dtype": param.dtype, "device": param.device}
    x = torch.rand((1 if args.static_batch else 2,) + tuple(example.shape[1:]), **like)
    dynamic = None if args.static_batch else ({0: torch.export.Dim("batch")},)
    with io.staged(out, overwrite=args.overwrite, directory=False) as tmp:
        if fmt == "pt2":
            program = torch.export.export(model, (x,), dynamic_shapes=dynamic)
            torch.export.save(program, tmp)
        else:
            torch.onnx.export(
                model, (x,), str(tmp), dynamo=True, dynamic_shapes=dynamic, external_data=False
            )
    data = {
        "out": str(out),
        "format": fmt,
        "input_shape": list(x.shape[1:]),
        "dynamic_batch": not args.static_batch,
    }
    _emit(args, f"wrote {out} ({fmt})", data)
    return 0


# --------------------------------------------------------------------------------------------
# train, sweep, demo (tropnnc.experiments)
# --------------------------------------------------------------------------------------------


def _experiment(module: str, name: str) -> Callable[..., Any]:
    """``tropnnc.experiments.<module>.<name>``, imported only when its command runs."""
    full = f"tropnnc.experiments.{module}"
    try:
        mod = importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name and (full == exc.name or full.startswith(exc.name + ".")):
            raise CLIError(
                f"this command needs {full}, which this installation of tropnnc does not have"
            ) from None
        raise CLIError(f"{full} needs the missing package {exc.name!r}") from None
    fn = getattr(mod, name, None)
    if fn is None:
        raise CLIError(f"{full} has no {name}(): this installation of tropnnc is incomplete")
    return fn


def _cmd_train(args: argparse.Namespace) -> int:
    trained_model = _experiment("train_cache", "trained_model")
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
    _emit(args, f"wrote {out}" + ("" if acc is None else f" (test accuracy {acc:.4f})"), data)
    return 0


SWEEP_GRID = ("networks", "methods", "keeps", "seeds", "dataset")


def _cmd_sweep(args: argparse.Namespace) -> int:
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
    run_sweep = _experiment("sweep", "run_sweep")
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
    _emit(
        args,
        _results_text(csv_path, csv_path.parent / "table.md"),
        {"out": str(args.out), "results": str(csv_path)},
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo = _experiment("demo", "run_demo")
    table = Path(run_demo(Path(args.out), quick=args.quick, progress=not args.quiet))
    _emit(args, _results_text(table, table), {"out": str(args.out), "table": str(table)})
    return 0


def _results_text(path: Path, table: Path) -> str:
    text = table.read_text().rstrip() + "\n" if table.is_file() else ""
    return f"{text}results in {path}"
