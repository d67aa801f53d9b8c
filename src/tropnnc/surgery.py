"""Layer surgery: read a block's weights out of a model, and write a merge back into it.

``extract`` folds BatchNorm (eval statistics) into the producer and returns a float64
:class:`~tropnnc.block.Block`; ``apply`` replaces the producer and the consumer of a (copied)
model by physically smaller modules in the original dtype and device, and the folded
BatchNorm by an Identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .block import Block, Merge
from .graph import BlockSpec


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path``."""
    return model.get_submodule(path)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path``."""
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def fold_batchnorm(weight: Tensor, bias: Tensor, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Fold eval-mode BatchNorm into (weight (n, ...), bias (n,)), in float64."""
    s = _bn_stats(bn)
    scale = s["weight"] / (s["running_var"] + s["eps"]).sqrt()  # (n,)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * scale.view(shape), scale * (bias - s["running_mean"]) + s["bias"]


def _bn_stats(bn: nn.Module) -> dict[str, Tensor]:
    n = bn.num_features
    f64 = {"dtype": torch.float64}
    return {
        "weight": bn.weight.detach().to(**f64).cpu() if bn.affine else torch.ones(n, **f64),
        "bias": bn.bias.detach().to(**f64).cpu() if bn.affine else torch.zeros(n, **f64),
        "running_mean": bn.running_mean.detach().to(**f64).cpu(),
        "running_var": bn.running_var.detach().to(**f64).cpu(),
        "eps": torch.full((n,), float(bn.eps), **f64),
    }


def extract(model: nn.Module, spec: BlockSpec, radius: float = 1.0) -> Block:
    """The block described by ``spec``, with its current weights, as float64 tensors.

    With a BatchNorm, ``block.weight`` holds the folded rows and ``block.bn`` the BN's
    eval statistics per unit (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``eps``) plus ``raw``: the unfolded rows (n, d+1), for methods that reason about BN.
    """
    producer = get_module(model, spec.producer)
    consumer = get_module(model, spec.consumer)
    w = producer.weight.detach().to(torch.float64).cpu()  # (n, ...) incoming weights
    n = w.shape[0]
    b = (producer.bias.detach().to(torch.float64).cpu() if producer.bias is not None
         else torch.zeros(n, dtype=torch.float64))
    bn = None
    if spec.bn is not None:
        bn_mod = get_module(model, spec.bn)
        bn = _bn_stats(bn_mod)
        bn["raw"] = torch.cat([w.flatten(1), b[:, None]], dim=1)  # (n, d+1) unfolded rows
        w, b = fold_batchnorm(w, b, bn_mod)
    weight = torch.cat([w.flatten(1), b[:, None]], dim=1)  # (n, d+1)
    wc = consumer.weight.detach().to(torch.float64).cpu()
    m = wc.shape[0]
    if isinstance(consumer, nn.Linear):
        out = wc.view(m, n, -1).permute(1, 0, 2)  # (n, m, H*W) column block of each unit
    else:
        out = wc.permute(1, 0, 2, 3).reshape(n, m, -1)  # (n, m, kh*kw)
    cb = consumer.bias.detach().to(torch.float64).cpu() if consumer.bias is not None else None
    kind = "conv" if isinstance(producer, nn.Conv2d) else "linear"
    return Block(spec.producer, weight, out.contiguous(), cb, radius, kind,
                 tuple(producer.weight.shape[1:]), bn)


def apply(model: nn.Module, spec: BlockSpec, merge: Merge) -> None:
    """Rewrite ``model`` in place: producer with ``merge.k`` units, consumer reading them."""
    producer = get_module(model, spec.producer)
    consumer = get_module(model, spec.consumer)
    like = {"dtype": producer.weight.dtype, "device": producer.weight.device}
    k = merge.k
    rows = merge.rows
    needs_bias = producer.bias is not None or spec.bn is not None or bool(rows[:, -1].any())
    if isinstance(producer, nn.Linear):
        new_p: nn.Module = nn.Linear(producer.in_features, k, bias=needs_bias, **like)
    else:
        new_p = nn.Conv2d(producer.in_channels, k, producer.kernel_size, producer.stride,
                          producer.padding, producer.dilation, bias=needs_bias,
                          padding_mode=producer.padding_mode, **like)
    with torch.no_grad():
        new_p.weight.copy_(rows[:, :-1].reshape((k,) + tuple(producer.weight.shape[1:])))
        if needs_bias:
            new_p.bias.copy_(rows[:, -1])
    new_p.train(producer.training)
    set_module(model, spec.producer, new_p)
    if spec.bn is not None:
        set_module(model, spec.bn, nn.Identity())

    like = {"dtype": consumer.weight.dtype, "device": consumer.weight.device}
    m = merge.out.shape[1]
    has_bias = consumer.bias is not None
    if isinstance(consumer, nn.Linear):
        reads = merge.out.shape[2]
        new_c: nn.Module = nn.Linear(k * reads, m, bias=has_bias, **like)
        weight = merge.out.permute(1, 0, 2).reshape(m, k * reads)
    else:
        new_c = nn.Conv2d(k, m, consumer.kernel_size, consumer.stride, consumer.padding,
                          consumer.dilation, bias=has_bias, padding_mode=consumer.padding_mode,
                          **like)
        weight = merge.out.permute(1, 0, 2).reshape((m, k) + tuple(consumer.kernel_size))
    with torch.no_grad():
        new_c.weight.copy_(weight)
        if has_bias:
            new_c.bias.copy_(consumer.bias)
    new_c.train(consumer.training)
    set_module(model, spec.consumer, new_c)
