"""Argument types of the command line: each turns one string into a value or raises
:class:`argparse.ArgumentTypeError` with the message argparse prints."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

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
    "attention",
    "radius",
    "calibration",
    "method",
)


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


def parse_json_object(text: str) -> dict[str, Any]:
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


def _positive(text: str, convert: type[int] | type[float], what: str) -> Any:
    """``convert(text)`` when it is a finite number above zero, else the usage error."""
    try:
        value = convert(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}")
    return value


def parse_positive_int(text: str) -> int:
    """An integer >= 1 (a count, a width)."""
    return _positive(text, int, "integer")


def parse_positive_float(text: str) -> float:
    """A finite number > 0 (a radius, a budget)."""
    return _positive(text, float, "number")


def parse_numbers(text: str) -> list[float]:
    """``0.5`` or ``0.485,0.456,0.406``: one number or one per channel."""
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
    return values


def parse_range(text: str) -> list[float]:
    values = parse_numbers(text)
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with LOW <= HIGH, got {text!r}")
    return values


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected a shape like 1,28,28, got {text!r}")
    return shape


def parse_seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 1 << 32:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to {(1 << 32) - 1}, got {text!r}")
    return value


def parse_device(text: str) -> torch.device:
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
