"""``tropnnc evaluate``: accuracy on a dataset and fidelity to a reference model."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import io, zoo
from ..io import ModelFileError
from .arguments import parse_device, parse_json_object, parse_positive_int, parse_seed, parse_shape
from .common import (
    CLIError,
    UsageError,
    add_model_arguments,
    emit,
    example_inputs,
    load_model,
    model_from_args,
    one_line,
)

HELP = "accuracy on a dataset and/or data-free fidelity to a reference model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tropnnc evaluate``."""
    add_model_arguments(p)
    p.add_argument("--dataset", help="measure accuracy on this dataset")
    p.add_argument("--split", default="test", choices=("train", "test", "val"))
    p.add_argument("--data-root", help="where to look for the dataset files")
    p.add_argument("--limit", type=parse_positive_int, help="use only the first N examples")
    p.add_argument("--reference", help="reference model (same forms as MODEL) for fidelity")
    p.add_argument("--reference-weights", help="weights of the reference model")
    p.add_argument("--reference-zoo-config", type=parse_json_object)
    p.add_argument("--inputs", help="fidelity inputs (.pt, .npy or .safetensors tensor)")
    p.add_argument(
        "--samples",
        type=parse_positive_int,
        default=1000,
        help="number of random fidelity inputs (default: 1000)",
    )
    p.add_argument(
        "--distribution",
        choices=("uniform", "normal"),
        default="uniform",
        help="random inputs: uniform in [0, 1) (default) or standard normal",
    )
    p.add_argument("--input-shape", type=parse_shape, help="one input's shape, e.g. 1,28,28")
    p.add_argument("--seed", type=parse_seed, default=0, help="seed of the random inputs")
    p.add_argument("--batch-size", type=parse_positive_int, default=1000)
    p.add_argument("--device", type=parse_device, help="run on this device (e.g. cuda)")


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
        raise CLIError(f"{file}: cannot read inputs ({one_line(exc)})") from None
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


def run(args: argparse.Namespace) -> int:
    """Measure accuracy and/or fidelity and print them."""
    if args.dataset is None and args.reference is None:
        raise UsageError(
            "nothing to evaluate: give --dataset (accuracy) and/or --reference (fidelity)"
        )
    if args.reference is not None:
        _check_reference_weights(args.reference, args.reference_weights)
    model = model_from_args(args)
    data: dict[str, Any] = {"model": args.model}
    lines = []
    if args.dataset is not None:
        from torch.utils.data import Subset

        from ..experiments.datasets import get_dataset
        from ..experiments.train import evaluate

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
        reference = load_model(
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
            example = example_inputs(reference, args.input_shape)
            if example is None:
                example = example_inputs(model, None)
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
                f"failed: {one_line(exc)}"
            ) from None
        data.update(reference=args.reference, inputs=source, fidelity=fid)
        lines.append(
            f"fidelity to {args.reference} on {source}: relative error "
            f"{fid['relative_error']:.4g}, max abs error {fid['max_abs_error']:.4g}, "
            f"top-1 agreement {fid['top1_agreement']:.4f}"
        )
    emit(args, "\n".join(lines), data)
    return 0
