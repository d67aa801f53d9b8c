"""What the commands share: the errors, the output, config files and loading the model."""

from __future__ import annotations

import argparse
import importlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import io
from .arguments import parse_json_object

PROG = "tropnnc"


class CLIError(Exception):
    """A failure reported as one line with exit status 1."""


class UsageError(Exception):
    """A usage problem found after parsing (exit status 2)."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (its type too, unless the message says it)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (CLIError, ValueError, TypeError, OSError)):
        return text
    return f"{type(exc).__name__}: {text}"


def emit(args: argparse.Namespace, text: str, data: Mapping[str, Any]) -> None:
    """The command's output: JSON with --json, nothing with --quiet, else the text."""
    if args.json:
        print(json.dumps(io.jsonable(data), indent=1))
    elif not args.quiet:
        print(text)


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


def load_model(
    spec: str,
    weights: str | None,
    zoo_config: Mapping[str, Any] | None,
    trust_pickle: bool | None,
    trust_code: bool | None,
    device: torch.device | None = None,
    random_init: bool = False,
) -> nn.Module:
    """The model named by ``spec`` (see :func:`tropnnc.io.load_model`), on ``device``."""
    model = io.load_model(
        spec,
        weights=weights,
        zoo_config=zoo_config,
        trust_pickle=bool(trust_pickle),
        trust_code=bool(trust_code),
        random_init=random_init,
    )
    return model if device is None else model.to(device)


def model_from_args(args: argparse.Namespace, random_init: bool = False) -> nn.Module:
    """The model given as MODEL or --model, with the command's weights and trust flags."""
    if args.model_pos is not None and args.model is not None:
        raise UsageError("give the model once: as MODEL or as --model")
    spec = args.model_pos if args.model_pos is not None else args.model
    if spec is None:
        raise UsageError("no model given (MODEL or --model)")
    args.model = spec
    return load_model(
        spec,
        args.weights,
        args.zoo_config,
        args.trust_pickle,
        args.trust_code,
        getattr(args, "device", None),
        random_init,
    )


def example_inputs(model: nn.Module, shape: tuple[int, ...] | None) -> torch.Tensor | None:
    """A zero batch of one input of ``shape``, else of the shape the model records, else None."""
    from ..counting import infer_example_inputs

    if shape is not None:
        return torch.zeros((1,) + tuple(shape))
    return infer_example_inputs(model)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL and the options that say how to load it (weights, config, trust)."""
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
        type=parse_json_object,
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


def experiment_function(module: str, name: str) -> Callable[..., Any]:
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


def results_text(path: Path, table: Path) -> str:
    """The Markdown table at ``table`` (when written) and where the results are."""
    text = table.read_text().rstrip() + "\n" if table.is_file() else ""
    return f"{text}results in {path}"
