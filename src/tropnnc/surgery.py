"""Layer surgery: read a block's weights out of a model, and write a merge back into it.

``extract`` folds BatchNorm (eval statistics) into the producer and returns a
:class:`~tropnnc.block.Block`: float64 for ordinary blocks, the model's own dtype (at least
float32) for large ones (see :func:`block_dtype`), on the CPU or on the weights' device;
``apply`` replaces the producer and the consumer of a (copied) model by physically smaller
modules in the original dtype and device, and the folded BatchNorm by an Identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

from .block import Block, Member, Merge
from .graph import BlockSpec, Consumer, GroupSpec, layer_width

#: blocks with more weights than this (producer + consumer) are extracted in the model's dtype
FLOAT64_MAX_WEIGHTS = 1 << 21  # 2M: float32 from VGG-16's 512-channel convs on (-50 ms there)


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
    """The BatchNorm's eval statistics per unit, float64, on its own device."""
    n = bn.num_features
    f64 = {"dtype": torch.float64, "device": bn.running_mean.device}
    return {
        "weight": bn.weight.detach().to(**f64) if bn.affine else torch.ones(n, **f64),
        "bias": bn.bias.detach().to(**f64) if bn.affine else torch.zeros(n, **f64),
        "running_mean": bn.running_mean.detach().to(**f64),
        "running_var": bn.running_var.detach().to(**f64),
        "eps": torch.full((n,), float(bn.eps), **f64),
    }


def block_dtype(producer: nn.Module, consumer: nn.Module) -> torch.dtype:
    """float64 for blocks of at most :data:`FLOAT64_MAX_WEIGHTS` weights and for float64
    models; otherwise the model's floating dtype, at least float32 (float64 copies of large
    layers cost memory and time for no accuracy the float32 model has: a 25,088 x 4,096
    layer alone would take 822 MB)."""
    dtype = producer.weight.dtype
    if dtype == torch.float64 or (
        producer.weight.numel() + consumer.weight.numel() <= FLOAT64_MAX_WEIGHTS
    ):
        return torch.float64
    return torch.promote_types(dtype, torch.float32)


def extract(
    model: nn.Module,
    spec: BlockSpec | GroupSpec,
    radius: float = 1.0,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = "cpu",
) -> Block:
    """The block described by ``spec``, with its current weights.

    ``dtype``: None picks :func:`block_dtype` (float64 unless the block is large).
    ``device``: where the block's tensors live; None keeps the weights' device. Large
    blocks whose dtype and device match the consumer's weight keep ``out`` as a (read-only)
    view of it instead of a copy; never modify a block's tensors in place.
    With a BatchNorm, ``block.weight`` holds the folded rows and ``block.bn`` the BN's
    eval statistics per unit (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``eps``) plus ``raw``: the unfolded rows (n, d+1), for methods that reason about BN.
    A :class:`~tropnnc.graph.GroupSpec` is extracted by :func:`extract_group`.
    """
    if isinstance(spec, GroupSpec):
        return extract_group(model, spec, radius, dtype=dtype, device=device)
    producer = get_module(model, spec.producer)
    consumer = get_module(model, spec.consumer)
    dtype = block_dtype(producer, consumer) if dtype is None else dtype
    to = {"dtype": dtype, "device": producer.weight.device if device is None else device}
    w = producer.weight.detach().to(**to)  # (n, ...) incoming weights
    n = w.shape[0]
    b = producer.bias.detach().to(**to) if producer.bias is not None else torch.zeros(n, **to)
    bn = None
    if spec.bn is not None:
        bn_mod = get_module(model, spec.bn)
        raw = torch.cat([w.flatten(1), b[:, None]], dim=1)  # (n, d+1) unfolded rows
        bn = {key: v.to(**to) for key, v in _bn_stats(bn_mod).items()}
        bn["raw"] = raw
        w, b = fold_batchnorm(w, b, bn_mod)  # folded in float64
        w, b = w.to(**to), b.to(**to)
    weight = torch.cat([w.flatten(1), b[:, None]], dim=1)  # (n, d+1)
    wc = consumer.weight.detach().to(**to)
    m = wc.shape[0]
    if isinstance(consumer, nn.Linear):
        out = wc.view(m, n, -1).permute(1, 0, 2)  # (n, m, H*W) column block of each unit
    else:
        out = wc.permute(1, 0, 2, 3).reshape(n, m, -1)  # (n, m, kh*kw)
    if dtype == torch.float64 or wc.data_ptr() != consumer.weight.data_ptr():
        out = out.contiguous()  # small blocks (or converted copies): one contiguous tensor
    cb = consumer.bias.detach().to(**to) if consumer.bias is not None else None
    kind = "conv" if isinstance(producer, nn.Conv2d) else "linear"
    return Block(
        spec.producer,
        weight,
        out,
        cb,
        radius,
        kind,
        tuple(producer.weight.shape[1:]),
        bn,
        activation=spec.activation,
    )


def apply(model: nn.Module, spec: BlockSpec | GroupSpec, merge: Merge) -> None:
    """Rewrite ``model`` in place: producer with ``merge.k`` units, consumer reading them
    (every member of a group: :func:`apply_group`)."""
    if isinstance(spec, GroupSpec):
        apply_group(model, spec, merge)
        return
    producer = get_module(model, spec.producer)
    consumer = get_module(model, spec.consumer)
    k = merge.k
    rows = merge.rows
    needs_bias = producer.bias is not None or spec.bn is not None or bool(rows[:, -1].any())
    new_p = _resized(producer, _in_width(producer), k, needs_bias)
    _write(new_p, producer, rows)
    _keep_requires_grad(new_p, producer)
    set_module(model, spec.producer, new_p)
    if spec.bn is not None:
        set_module(model, spec.bn, nn.Identity())

    like = {"dtype": consumer.weight.dtype, "device": consumer.weight.device}
    m = merge.out.shape[1]
    has_bias = consumer.bias is not None or merge.consumer_bias is not None
    reads = merge.out.shape[2] if isinstance(consumer, nn.Linear) else 1
    new_c = _resized(consumer, k * reads, m, has_bias)
    with torch.no_grad():
        slices = merge.out.permute(1, 0, 2)  # (m, k, reads)
        if (
            slices.is_contiguous()
            and slices.dtype == like["dtype"]
            and slices.device == new_c.weight.device
        ):  # built in the consumer's layout
            new_c.weight = nn.Parameter(slices.view(new_c.weight.shape))  # (no copy)
        else:  # (m, k, reads) view of the new weight: no reshaped copy of out
            new_c.weight.view(m, k, -1).copy_(slices)
        if merge.consumer_bias is not None:  # a data-free repair's corrected bias
            new_c.bias.copy_(merge.consumer_bias)
        elif has_bias:
            new_c.bias.copy_(consumer.bias)
    new_c.train(consumer.training)
    _keep_requires_grad(new_c, consumer)
    set_module(model, spec.consumer, new_c)


def _in_width(mod: nn.Module) -> int:
    """Input features of a Linear, input channels of a Conv2d."""
    return mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels


def _resized(
    mod: nn.Module, in_width: int, out_width: int, bias: bool, groups: int = 1
) -> nn.Module:
    """An uninitialised Linear or Conv2d like ``mod`` (kernel, stride, padding, dtype,
    device) with other widths (skip_init: no random init of weights that are overwritten)."""
    like = {"dtype": mod.weight.dtype, "device": mod.weight.device}
    if isinstance(mod, nn.Linear):
        return skip_init(nn.Linear, in_width, out_width, bias=bias, **like)
    return skip_init(
        nn.Conv2d,
        in_width,
        out_width,
        mod.kernel_size,
        mod.stride,
        mod.padding,
        mod.dilation,
        groups=groups,
        bias=bias,
        padding_mode=mod.padding_mode,
        **like,
    )


def _keep_requires_grad(new: nn.Module, old: nn.Module) -> None:
    """A replacement layer is frozen (or trainable) like the layer it replaces."""
    for name, param in new.named_parameters(recurse=False):
        before = getattr(old, name, None)
        if isinstance(before, nn.Parameter):
            param.requires_grad_(before.requires_grad)


def _rows(model: nn.Module, layer: str, bn: str | None, to: dict) -> Tensor:
    """A layer's output rows (n, d+1), incoming weights then bias, BatchNorm folded."""
    mod = get_module(model, layer)
    w = mod.weight.detach().to(**to)
    b = mod.bias.detach().to(**to) if mod.bias is not None else torch.zeros(w.shape[0], **to)
    if bn is not None:
        w, b = fold_batchnorm(w, b, get_module(model, bn))
        w, b = w.to(**to), b.to(**to)
    return torch.cat([w.flatten(1), b[:, None]], dim=1)


def read_range(model: nn.Module, consumer: Consumer) -> tuple[int, int, int]:
    """(first channel, channels, reads per channel) of the group in ``consumer``'s input,
    from the widths the model has now (earlier groups of a concatenation may have shrunk)."""
    mod = get_module(model, consumer.layer)
    widths = [
        layer_width(get_module(model, name)) if name is not None else width
        for name, width in consumer.segments
    ]
    if isinstance(mod, nn.Linear):
        reads = 1
        if consumer.flatten:  # every width is known here (checked by discovery)
            reads = mod.in_features // sum(widths)
        total = mod.in_features // reads
    else:
        reads, total = math.prod(mod.kernel_size), mod.in_channels
    if None in widths:  # channels of no layer: whatever the input holds besides the others
        widths[widths.index(None)] = total - sum(w for w in widths if w is not None)
    return sum(widths[: consumer.index]), widths[consumer.index], reads


def group_radius(radius: float, producers: int) -> float:
    """The radius of a group's concatenated input: P producers whose inputs each satisfy
    ||(x_p, 1)|| <= rho give ||(x_1, 1, ..., x_P, 1)|| <= sqrt(P) rho."""
    return math.sqrt(producers * (radius**2 + 1.0) - 1.0)


def extract_group(
    model: nn.Module,
    spec: GroupSpec,
    radius: float = 1.0,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = "cpu",
) -> Block:
    """A channel group as one block: each channel's rows are the concatenation of its rows
    in every producer (BatchNorm folded) and in every depthwise member; its slices are the
    concatenation of every consumer's slices over outputs, each padded with zero reads to
    the most reads of any consumer (zeros change no norm and no bound). ``radius`` bounds
    each producer's input; the block's radius covers the concatenated input
    (:func:`group_radius`). The consumer biases are concatenated (zeros where none)."""
    first = get_module(model, spec.producer)
    if dtype is None:
        size = sum(get_module(model, name).weight.numel() for name in spec.layers)
        dtype = (
            torch.float64
            if first.weight.dtype == torch.float64 or size <= FLOAT64_MAX_WEIGHTS
            else torch.promote_types(first.weight.dtype, torch.float32)
        )
    to = {"dtype": dtype, "device": first.weight.device if device is None else device}
    rows = [_rows(model, p.layer, p.bn, to) for p in spec.producers + spec.channelwise]
    members, col = [], 0
    for i, (p, part) in enumerate(zip(spec.producers + spec.channelwise, rows, strict=True)):
        stats = None
        if p.bn is not None:
            stats = {key: v.to(**to) for key, v in _bn_stats(get_module(model, p.bn)).items()}
        members.append(Member(col, col + part.shape[1], stats, i >= len(spec.producers)))
        col += part.shape[1]
    n = rows[0].shape[0]
    slices, biases = [], []
    for consumer in spec.consumers:
        mod = get_module(model, consumer.layer)
        start, width, reads = read_range(model, consumer)
        wc = mod.weight.detach().to(**to)
        m = wc.shape[0]
        if isinstance(mod, nn.Linear):
            part = wc[:, start * reads : (start + width) * reads].reshape(m, width, reads)
        else:
            part = wc[:, start : start + width].reshape(m, width, reads)
        slices.append(part.permute(1, 0, 2))  # (n, m, reads)
        biases.append(mod.bias.detach().to(**to) if mod.bias is not None else torch.zeros(m, **to))
    most = max(s.shape[2] for s in slices)
    out = torch.cat([F.pad(s, (0, most - s.shape[2])) for s in slices], dim=1).contiguous()
    has_bias = any(get_module(model, c.layer).bias is not None for c in spec.consumers)
    kind = "conv" if isinstance(first, nn.Conv2d) else "linear"
    weight = torch.cat(rows, dim=1)
    assert weight.shape[0] == n == out.shape[0]
    return Block(
        spec.producer,
        weight,
        out,
        torch.cat(biases) if has_bias else None,
        group_radius(radius, len(spec.producers)),
        kind,
        (weight.shape[1] - 1,),
        activation=spec.activation,
        members=tuple(members),
    )


def apply_group(model: nn.Module, spec: GroupSpec, merge: Merge) -> None:
    """Rewrite every member of a channel group in place for the ``merge.k`` merged channels:
    producers (their BatchNorm becomes an Identity) and depthwise members get the merged
    rows, consumers the merged slices in the group's input range."""
    k = merge.k
    ranges = [read_range(model, c) for c in spec.consumers]  # before the widths change
    col = 0
    members = [(p, False) for p in spec.producers] + [(p, True) for p in spec.channelwise]
    for p, depthwise in members:  # each member's columns of the joined rows, in order
        mod = get_module(model, p.layer)
        width = mod.weight[0].numel() + 1
        part = merge.rows[:, col : col + width]
        col += width
        # a member without bias stays without one unless BN folding or the merge needs it
        bias = mod.bias is not None or p.bn is not None or bool(part[:, -1].any())
        if depthwise:
            new = _resized(mod, k, k, bias, groups=k)
        else:
            new = _resized(mod, _in_width(mod), k, bias)
        _write(new, mod, part)
        set_module(model, p.layer, new)
        if p.bn is not None:
            set_module(model, p.bn, nn.Identity())
    row = 0
    for consumer, channels in zip(spec.consumers, ranges, strict=True):
        m = get_module(model, consumer.layer).weight.shape[0]
        bias = None if merge.consumer_bias is None else merge.consumer_bias[row : row + m]
        _rewrite_consumer(model, consumer.layer, channels, merge.out[:, row : row + m], bias)
        row += m


def apply_consumer_slices(model: nn.Module, consumer: Consumer, slices: Tensor) -> None:
    """Rewrite, in place, only the columns through which ``consumer`` reads an already
    merged group: ``slices`` (k, m, r) (a calibration refit); the group's producers and
    depthwise members, the consumer's bias and its other input columns stay as they are."""
    _rewrite_consumer(model, consumer.layer, read_range(model, consumer), slices, None)


def _rewrite_consumer(
    model: nn.Module,
    layer: str,
    channels: tuple[int, int, int],
    out: Tensor,
    bias: Tensor | None,
) -> None:
    """Replace ``layer`` by a copy whose input channels ``channels`` = (start, width, reads
    per channel) become the k channels of slices ``out`` (k, m, >= reads: zero padding past
    the reads is dropped); ``bias`` (m,) replaces its bias (None: kept)."""
    start, width, reads = channels
    mod = get_module(model, layer)
    m = mod.weight.shape[0]
    k = out.shape[0]
    like = {"dtype": mod.weight.dtype, "device": mod.weight.device}
    merged = out[:, :, :reads].permute(1, 0, 2).to(**like)  # (m, k, r)
    has_bias = mod.bias is not None or bias is not None
    old = mod.weight.detach()
    if isinstance(mod, nn.Linear):
        w = torch.cat(
            [
                old[:, : start * reads],
                merged.reshape(m, k * reads),
                old[:, (start + width) * reads :],
            ],
            dim=1,
        )
    else:
        w = torch.cat(
            [old[:, :start], merged.reshape(m, k, *mod.kernel_size), old[:, start + width :]],
            dim=1,
        )
    new = _resized(mod, w.shape[1], m, has_bias)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
        elif has_bias:
            new.bias.copy_(mod.bias)
    new.train(mod.training)
    set_module(model, layer, new)


def _write(new: nn.Module, old: nn.Module, rows: Tensor) -> None:
    """Copy merged rows (k, d+1) into ``new`` (weights, then bias: zero when ``new`` has
    none) and the train mode."""
    with torch.no_grad():
        new.weight.view(rows.shape[0], -1).copy_(rows[:, :-1])
        if new.bias is not None:
            new.bias.copy_(rows[:, -1])
    new.train(old.training)
