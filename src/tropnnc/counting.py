"""Exact parameter counts and analytic MAC counts (1 multiply-add = 1 MAC; FLOPs = 2 MACs)."""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of parameters (every tensor element in ``model.parameters()``)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of Linear and Conv2d layers for one input sample.

    Runs ``model`` once on a zero tensor shaped like one sample of ``example_inputs`` and
    counts, per layer, output elements times the inputs each one reads (bias adds and
    element-wise ops are not counted).
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output[0].numel() * module.in_features
        else:
            kh, kw = module.kernel_size
            total += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    handles = [mod.register_forward_hook(hook) for mod in model.modules()
               if isinstance(mod, (nn.Linear, nn.Conv2d))]
    param = next(model.parameters(), None)
    like = {"dtype": param.dtype, "device": param.device} if param is not None else {}
    # a batch of two: layers such as BatchNorm without running statistics reject batch one
    sample = torch.zeros((2,) + tuple(example_inputs.shape[1:]), **like)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def infer_example_inputs(model: nn.Module) -> torch.Tensor | None:
    """A one-sample input for ``model``: from its ``input_shape`` attribute, or from a
    first Linear layer's ``in_features``; None when neither tells the shape."""
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return torch.zeros((1,) + tuple(shape))
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if isinstance(first, nn.Linear):
        return torch.zeros(1, first.in_features)
    return None
