"""``tropnnc export``: a model as a torch.export program (.pt2) or an ONNX file."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from .. import io
from .arguments import parse_shape
from .common import CLIError, UsageError, add_model_arguments, emit, example_inputs, model_from_args

HELP = "export a model with torch's exporters (pt2, onnx)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tropnnc export``."""
    add_model_arguments(p)
    p.add_argument("-o", "--out", required=True, help="output file")
    p.add_argument(
        "--format",
        choices=("pt2", "onnx"),
        help="pt2 (torch.export) or onnx; default: from the --out suffix",
    )
    p.add_argument("--input-shape", type=parse_shape, help="one input's shape, e.g. 1,28,28")
    p.add_argument(
        "--static-batch",
        action="store_true",
        help="export a fixed batch size instead of a dynamic one",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")


def run(args: argparse.Namespace) -> int:
    """Export the model to one file, written atomically."""
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
    model = model_from_args(args).eval()
    example = example_inputs(model, args.input_shape)
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
    emit(args, f"wrote {out} ({fmt})", data)
    return 0
