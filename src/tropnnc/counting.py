"""Exact parameter counts and analytic MAC counts (1 multiply-add = 1 MAC; FLOPs = 2 MACs)."""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of parameters (every tensor element in ``model.parameters()``)."""
    return sum(p.numel() for p in model.parameters())


def output_positions(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    """Output positions per unit (1 for Linear on flat inputs, H*W for Conv2d) of every
    Linear and Conv2d layer, by module name, for one sample.

    Runs ``model`` once in eval mode on zeros shaped like ``example_inputs`` (a batch of two:
    BatchNorm without running statistics rejects a batch of one), on the meta device (shapes
    without arithmetic: a VGG-16 forward at 224 px in milliseconds) unless that fails.
    """
    return _observe(model, example_inputs)[0]


def _observe(
    model: nn.Module, example_inputs: torch.Tensor
) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """:func:`output_positions`, and the (query, key) tokens per sample of every
    ``nn.MultiheadAttention`` (whose projections are not Linear modules it calls)."""
    found: dict[str, int] = {}
    tokens: dict[str, tuple[int, int]] = {}

    def hook(name: str):
        def record(
            module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> None:
            units = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            found[name] = found.get(name, 0) + output[0].numel() // units

        return record

    def attention_hook(name: str):
        def record(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output) -> None:
            query = args[0] if args else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            axis = 1 if module.batch_first and query.dim() == 3 else 0  # the token axis
            lq, lk = tokens.get(name, (0, 0))
            tokens[name] = (lq + query.shape[axis], lk + key.shape[axis])

        return record

    handles = [
        mod.register_forward_hook(hook(name))
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d))
    ]
    handles += [
        mod.register_forward_hook(attention_hook(name), with_kwargs=True)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.MultiheadAttention)
    ]
    param = next(model.parameters(), None)
    like = {"dtype": param.dtype, "device": param.device} if param is not None else {}
    sample = torch.zeros((2,) + tuple(example_inputs.shape[1:]), **like)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            try:  # shapes only: the forward on meta tensors does no arithmetic
                tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
                meta = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
                torch.func.functional_call(model, meta, (sample.to("meta"),))
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                found.clear()  # an op without a meta kernel, or data-dependent code
                tokens.clear()
                model(sample)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found, tokens


def layer_macs(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per Linear and Conv2d layer (by module name), for one sample:
    output elements times the inputs each one reads (bias adds and element-wise ops are
    not counted); an ``nn.MultiheadAttention`` counts its four projections (its attention
    products are not counted, as anywhere else)."""
    macs = {}
    modules = dict(model.named_modules())
    positions, tokens = _observe(model, example_inputs)
    for name, count in positions.items():
        mod = modules[name]
        if isinstance(mod, nn.Linear):
            macs[name] = count * mod.out_features * mod.in_features
        else:
            kh, kw = mod.kernel_size
            macs[name] = count * mod.out_channels * (mod.in_channels // mod.groups) * kh * kw
    for name, (lq, lk) in tokens.items():
        mod = modules[name]
        e = mod.embed_dim
        macs[name] = 2 * lq * e * e + lk * e * (mod.kdim + mod.vdim)
    return macs


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of all Linear and Conv2d layers (and attention projections) for
    one input sample."""
    return sum(layer_macs(model, example_inputs).values())


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
