"""Data-free input bounds for every block, from the network's input domain.

A block's certificate holds for producer inputs x with ||x|| <= radius (for a convolution:
every input patch of C_in*kh*kw values). Which radius covers the inputs the network really
sees follows from its input domain: every input element in an interval [lo, hi] (pixels in
[0, 1], or that range after a per-channel normalisation (x - mean) / std). This module
pushes that box through the layers in front of a block by interval arithmetic in
centre/radius form, in float64:

* affine layers (Linear, Conv, eval-mode BatchNorm) map the centre c affinely and the
  radius r by |W|: the image of the box is inside the box (W c + b, |W| r);
* monotone ops (ReLU and other non-decreasing activations, max/avg/adaptive pools, means,
  concatenations, residual additions) map the lower and upper ends;
* rearrangements (flatten, view, reshape, permute, indexing, dropout) move c and r alike;

and turns the box at the block's input into the norm bound: with a = max(|lo|, |hi|)
elementwise, ||a|| for a Linear producer (the largest over any leading positions) and the
largest patch norm of a, read with the producer's own kernel, stride, dilation and padding,
for a convolution. Every step over-approximates, so the radius covers every input of the
domain (for the model in eval mode); it is far from tight after many layers.

:class:`IntervalBounds` traces the model once and evaluates only the ancestors of the layer
asked for, caching node values; values downstream of a module that was replaced since (as
``compress`` does block after block) are recomputed, so each block's radius is read on the
compressed-so-far network.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from . import _memory
from .graph import TraceError, norm_radius, norm_readers, trace

log = logging.getLogger(__name__)

F64 = torch.float64
#: default input domain: every element in [0, 1] (images as tensors, as tropnnc's datasets)
UNIT_RANGE = (0.0, 1.0)

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: modules that are identities in eval mode, and modules that only rearrange elements
IDENTITY_MODULES = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
STRUCTURAL_MODULES = (nn.Flatten, nn.Unflatten)
#: elementwise non-decreasing activations and pools (applied to the lower and upper ends)
MONOTONE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.LogSigmoid,
    nn.Softsign,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
MONOTONE_FUNCTIONS = {
    F.relu,
    torch.relu,
    torch.relu_,
    F.relu6,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.elu,
    F.celu,
    F.selu,
    F.softplus,
    F.hardtanh,
    F.hardsigmoid,
    F.logsigmoid,
    F.softsign,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    torch.mean,
    torch.sum,
    torch.cat,
    torch.concat,
    torch.stack,
    torch.clamp,
    torch.clip,
    torch.maximum,
    torch.minimum,
    torch.amax,
    torch.amin,
    operator.add,
    operator.iadd,
    torch.add,
}
MONOTONE_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "mean",
    "sum",
    "clamp",
    "clamp_",
    "clamp_min",
    "clamp_min_",
    "clip",
    "amax",
    "amin",
    "add",
    "add_",
}
STRUCTURAL_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.chunk,
    torch.split,
    operator.getitem,
    torch.movedim,
    torch.swapaxes,
}
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
STRUCTURAL_METHODS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "chunk",
    "split",
    "movedim",
    "swapaxes",
    "expand",
    "repeat",
    "t",
}
#: conversions whose effect on the float64 bounds is none (the bounds keep their dtype)
KEEP_METHODS = {"float", "double", "to", "type_as", "clone", "detach", "cpu", "cuda"}
METADATA_METHODS = {"size", "dim", "numel", "get_device", "is_contiguous"}


class BoundsError(ValueError):
    """The input domain cannot be propagated to a layer (an op without an interval rule)."""


@dataclass(frozen=True)
class Interval:
    """Elementwise bounds ``centre - radius <= x <= centre + radius`` (float64 tensors)."""

    centre: Tensor
    radius: Tensor

    @classmethod
    def from_ends(cls, lo: Tensor, hi: Tensor) -> Interval:
        return cls((lo + hi) / 2, ((hi - lo) / 2).clamp_min(0.0))

    @property
    def lo(self) -> Tensor:
        return self.centre - self.radius

    @property
    def hi(self) -> Tensor:
        return self.centre + self.radius

    def magnitude(self) -> Tensor:
        """max(|lo|, |hi|) elementwise: the largest absolute value any element can take."""
        return self.centre.abs() + self.radius


def domain_std(
    input_range: tuple[Any, Any] | None = None, input_stats: tuple[Any, Any] | None = None
) -> float:
    """Half the mean width of the input domain in the units the network reads ((hi - lo) / 2,
    divided by the std of ``input_stats``; 0.5 for the default [0, 1]): the largest std an
    input element can have, the std of the isotropic input model of blocks that read the
    network input (docs/expected-error.md, "The first block's input model")."""
    lo, hi = UNIT_RANGE if input_range is None else input_range
    parts = [_as_f64(lo, "input_range low end"), _as_f64(hi, "input_range high end")]
    if input_stats is not None:
        parts.append(_as_f64(input_stats[1], "input_stats std"))
    try:
        width = parts[1] - parts[0]
        if input_stats is not None:
            width = width / parts[2]
    except RuntimeError:  # per-channel values against a tensor of the input's shape
        width = (parts[1].mean() - parts[0].mean()) / (parts[2].mean() if input_stats else 1.0)
    return 0.5 * float(width.mean())


def input_domain(
    shape: Sequence[int],
    input_range: tuple[Any, Any] | None = None,
    input_stats: tuple[Any, Any] | None = None,
) -> Interval:
    """The box of network inputs of one sample of ``shape``, batch dimension included.

    ``input_range=(lo, hi)``: the range of every raw input element (default [0, 1]);
    ``input_stats=(mean, std)``: the network reads (x - mean) / std of those raw inputs.
    Each end, mean and std is a number, a sequence with one value per channel (the first
    dimension of ``shape``), or a tensor that broadcasts to ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    lo, hi = UNIT_RANGE if input_range is None else input_range
    lo, hi = (
        _per_channel(lo, shape, "input_range low end"),
        _per_channel(hi, shape, "input_range high end"),
    )
    if bool((lo > hi).any()):
        raise ValueError(
            f"input_range: the low end must not exceed the high end, got {input_range!r}"
        )
    if input_stats is not None:
        mean = _per_channel(input_stats[0], shape, "input_stats mean")
        std = _per_channel(input_stats[1], shape, "input_stats std")
        if not bool((std > 0).all()):
            raise ValueError(f"input_stats: every std must be positive, got {input_stats[1]!r}")
        lo, hi = (lo - mean) / std, (hi - mean) / std
    if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        raise ValueError("input_range / input_stats: the input domain must be finite")
    return Interval.from_ends(lo.expand(shape)[None].clone(), hi.expand(shape)[None].clone())


def _as_f64(value: Any, what: str) -> Tensor:
    """``value`` (a number, a sequence of numbers or a tensor) as a float64 CPU tensor."""
    try:
        return torch.as_tensor(value, dtype=F64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{what} must be a number, a sequence of numbers or a tensor, got {value!r}"
        ) from None


def _per_channel(value: Any, shape: tuple[int, ...], what: str) -> Tensor:
    """``value`` as a float64 tensor broadcastable to ``shape``: numbers as they are,
    a 1-D sequence with one entry per channel (``shape[0]``) along the channel dimension."""
    t = _as_f64(value, what)
    if t.dim() == 1 and len(shape) > 1 and t.numel() == shape[0]:
        t = t.view(-1, *([1] * (len(shape) - 1)))
    try:
        torch.broadcast_shapes(t.shape, shape)
    except RuntimeError:
        raise ValueError(
            f"{what} of shape {tuple(t.shape)} does not fit inputs of shape "
            f"{shape} (give a number, one value per channel, or a tensor that "
            "broadcasts to the input shape)"
        ) from None
    return t


def norm_bound(module: nn.Module, box: Interval) -> float:
    """The largest norm of one input of ``module`` inside ``box``: one input patch for a
    convolution (with its padding, stride and dilation; per group), the last dimension for
    a Linear (the largest over any other dimensions)."""
    a = box.magnitude()
    if isinstance(module, nn.Linear):
        return float(torch.linalg.vector_norm(a, dim=-1).max())
    if isinstance(module, CONVS):
        g = module.groups
        ones = torch.ones(
            g, module.in_channels // g, *module.kernel_size, dtype=a.dtype, device=a.device
        )
        sq = a * a
        if module.padding_mode != "zeros":
            sq = F.pad(sq, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding: Any = 0
        else:
            padding = module.padding
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[a.dim() - 2]
        sums = conv(sq, ones, None, module.stride, padding, module.dilation, g)
        return math.sqrt(float(sums.max().clamp_min(0.0)))
    raise TypeError(f"norm_bound: {type(module).__name__} is not a Linear or convolution")


class IntervalBounds:
    """Interval bounds of ``model``'s activations for inputs in ``domain``.

    The model is traced once; :meth:`at_input` and :meth:`radius` read modules from
    ``model`` as it is at call time, so they may be called again after layers have been
    replaced (values downstream of a replaced module are recomputed).
    """

    def __init__(self, model: nn.Module, domain: Interval) -> None:
        self.model = model
        self.graph = trace(model).graph
        self.nodes = list(self.graph.nodes)
        self.order = {node: i for i, node in enumerate(self.nodes)}
        self.by_target = {node.target: node for node in self.nodes if node.op == "call_module"}
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.domain = Interval(
            domain.centre.to(device=device, dtype=F64), domain.radius.to(device=device, dtype=F64)
        )
        self.env: dict[fx.Node, Any] = {}
        self.used: dict[fx.Node, nn.Module] = {}  # the module each cached call_module read

    def at_input(self, layer: str) -> Interval:
        """The box holding the input of module ``layer`` (its first argument)."""
        node = self.by_target.get(layer)
        if node is None:
            raise BoundsError(
                f"{layer} is not a module called in {type(self.model).__name__}'s forward"
            )
        self._refresh()
        with torch.no_grad():
            value = self._evaluate(node.args[0])
        if not isinstance(value, Interval):
            raise BoundsError(f"the input of {layer} does not depend on the network input")
        return value

    def radius(self, layer: str) -> float:
        """The norm bound of one input of ``layer`` (a patch for a convolution)."""
        return norm_bound(self.model.get_submodule(layer), self.at_input(layer))

    def _refresh(self) -> None:
        """Forget cached values from the first module that was replaced since."""
        changed = [
            self.order[node]
            for node, mod in self.used.items()
            if self._module(node.target) is not mod
        ]
        if changed:
            first = min(changed)
            for node in [n for n in self.env if self.order[n] >= first]:
                del self.env[node]
                self.used.pop(node, None)

    def _module(self, target: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(target)
        except AttributeError:
            return None

    def _evaluate(self, root: Any) -> Any:
        """The value of ``root`` (a node, or a constant), computing missing ancestors in
        graph order."""
        if not isinstance(root, fx.Node):
            return root
        needed, stack = set(), [root]
        while stack:
            node = stack.pop()
            if node in needed or node in self.env:
                continue
            needed.add(node)
            stack.extend(node.all_input_nodes)
        for node in sorted(needed, key=self.order.__getitem__):
            self.env[node] = self._run(node)
        return self.env[root]

    def _run(self, node: fx.Node) -> Any:
        args = fx.node.map_arg(node.args, self.env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self.env.__getitem__)
        if node.op == "placeholder":
            if node is not self.nodes[0]:
                if node.args:  # a defaulted argument
                    return node.args[0]
                raise BoundsError(
                    f"input {node.target!r} of {type(self.model).__name__}: "
                    "only the first input gets a domain"
                )
            return self.domain
        if node.op == "get_attr":
            return _attr(self.model, node.target)
        if node.op == "output":
            return args[0]
        if not _has_interval((args, kwargs)):
            if node.op == "call_module":
                return self.model.get_submodule(node.target)(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            mod = self.model.get_submodule(node.target)
            self.used[node] = mod
            return _module_rule(node, mod, args, kwargs)
        if node.op == "call_method":
            return _method_rule(node, args, kwargs)
        return _function_rule(node, args, kwargs)


def _attr(model: nn.Module, target: str) -> Any:
    value: Any = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _has_interval(value: Any) -> bool:
    if isinstance(value, Interval):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_interval(v) for v in value)
    if isinstance(value, dict):
        return any(_has_interval(v) for v in value.values())
    return False


def _pick(value: Any, part: Callable[[Interval], Tensor]) -> Any:
    """``value`` with every Interval replaced by ``part(interval)`` (nested lists too)."""
    if isinstance(value, Interval):
        return part(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_pick(v, part) for v in value)
    if isinstance(value, dict):
        return {k: _pick(v, part) for k, v in value.items()}
    return value


def _zip(first: Any, second: Any, make: Callable[[Tensor, Tensor], Interval]) -> Any:
    """Pair two results of the same op (tensors, or tuples of them) into Intervals."""
    if isinstance(first, Tensor):
        return make(first, second)
    if isinstance(first, (list, tuple)):
        return type(first)(_zip(a, b, make) for a, b in zip(first, second, strict=True))
    return first


def _structural(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """An op that only moves elements: apply it to the centres and to the radii."""
    c = fn(*_pick(args, lambda v: v.centre), **_pick(kwargs, lambda v: v.centre))
    r = fn(*_pick(args, lambda v: v.radius), **_pick(kwargs, lambda v: v.radius))
    return _zip(c, r, Interval)


def _monotone(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """A non-decreasing op: apply it to the lower ends and to the upper ends (fresh tensors,
    so in-place ops touch no cached value)."""
    lo = fn(*_pick(args, lambda v: v.lo), **_pick(kwargs, lambda v: v.lo))
    hi = fn(*_pick(args, lambda v: v.hi), **_pick(kwargs, lambda v: v.hi))
    return _zip(lo, hi, Interval.from_ends)


def _affine(
    x: Interval,
    linear: Callable[[Tensor, Tensor | None], Tensor],
    weight: Tensor,
    bias: Tensor | None,
) -> Interval:
    w = weight.detach().to(F64)
    b = None if bias is None else bias.detach().to(F64)
    return Interval(linear(x.centre, w, b), linear(x.radius, w.abs(), None))


def _linear(x: Interval, mod: nn.Linear) -> Interval:
    """Linear in float64, a chunk of output rows at a time for large weights."""
    weight, bias = mod.weight, mod.bias
    step = _memory.rows_per_chunk(weight.shape[1] * 8, _memory.CHUNK_BYTES)  # float64 rows
    if weight.shape[0] <= step:
        return _affine(x, F.linear, weight, bias)
    parts = [
        _affine(x, F.linear, weight[s : s + step], None if bias is None else bias[s : s + step])
        for s in range(0, weight.shape[0], step)
    ]
    return Interval(
        torch.cat([p.centre for p in parts], -1), torch.cat([p.radius for p in parts], -1)
    )


def _batchnorm(x: Interval, mod: nn.Module) -> Interval:
    """Eval-mode BatchNorm: a per-channel affine map."""
    if mod.running_mean is None:
        raise BoundsError(
            f"{type(mod).__name__} without running statistics normalises by "
            "batch statistics: no interval rule"
        )
    scale = (mod.running_var.to(F64) + mod.eps).rsqrt()
    if mod.weight is not None:
        scale = scale * mod.weight.detach().to(F64)
    shift = -mod.running_mean.to(F64) * scale
    if mod.bias is not None:
        shift = shift + mod.bias.detach().to(F64)
    shape = (1, -1) + (1,) * (x.centre.dim() - 2)
    return Interval(
        x.centre * scale.view(shape) + shift.view(shape), x.radius * scale.abs().view(shape)
    )


def _module_rule(node: fx.Node, mod: nn.Module, args: tuple, kwargs: dict) -> Any:
    if isinstance(mod, nn.Linear):
        return _linear(args[0], mod)
    if isinstance(mod, CONVS):
        return _affine(args[0], mod._conv_forward, mod.weight, mod.bias)
    if isinstance(mod, BATCHNORMS):
        return _batchnorm(args[0], mod)
    if isinstance(mod, nn.LeakyReLU) and mod.negative_slope >= 0:
        return _monotone(mod, args, kwargs)
    if isinstance(mod, MONOTONE_MODULES) and not getattr(mod, "return_indices", False):
        return _monotone(mod, args, kwargs)
    if isinstance(mod, IDENTITY_MODULES):
        return args[0]  # identities in eval mode
    if isinstance(mod, STRUCTURAL_MODULES):
        return _structural(mod, args, kwargs)
    raise BoundsError(
        f"no interval rule for {node.target} ({type(mod).__name__}) on the "
        "path from the input; pass radius= to certify with a norm bound you "
        "know"
    )


def _method_rule(node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = node.target
    self_, rest = args[0], args[1:]
    if name in METADATA_METHODS:
        return getattr(self_.centre, name)(*rest, **kwargs)
    if name in KEEP_METHODS:
        return self_
    if name in ("sub", "sub_", "mul", "mul_", "div", "div_", "neg", "neg_"):
        return _arith(name.rstrip("_"), args, kwargs, node)
    if name in ("add", "add_") and "alpha" in kwargs:
        return _arith("add", args, kwargs, node)
    if name in MONOTONE_METHODS:
        return _monotone(lambda x, *a, **k: getattr(x, name)(*a, **k), args, kwargs)
    if name in STRUCTURAL_METHODS:
        return _structural(lambda x, *a, **k: getattr(x, name)(*a, **k), args, kwargs)
    return _unsupported(node)


def _function_rule(node: fx.Node, args: tuple, kwargs: dict) -> Any:
    fn = node.target
    if fn is getattr:
        return getattr(args[0].centre, args[1])  # shape, dtype, device
    if fn in DROPOUT_FUNCTIONS:
        return args[0]  # identities in eval mode
    if fn in (operator.sub, operator.isub, torch.sub):
        return _arith("sub", args, kwargs, node)
    if fn in (operator.mul, operator.imul, torch.mul):
        return _arith("mul", args, kwargs, node)
    if fn in (operator.truediv, operator.itruediv, torch.div):
        return _arith("div", args, kwargs, node)
    if fn in (operator.neg, torch.neg):
        return _arith("neg", args, kwargs, node)
    if fn is torch.add and "alpha" in kwargs:
        return _arith("add", args, kwargs, node)
    if fn is F.leaky_relu:
        slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
        if slope >= 0:
            return _monotone(fn, args, kwargs)
    if fn in (
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        F.adaptive_max_pool3d,
    ) and kwargs.get("return_indices"):
        return _unsupported(node)
    if fn in MONOTONE_FUNCTIONS:
        return _monotone(fn, args, kwargs)
    if fn in STRUCTURAL_FUNCTIONS:
        return _structural(fn, args, kwargs)
    return _unsupported(node)


def _arith(op: str, args: tuple, kwargs: dict, node: fx.Node) -> Any:
    """a - b, a * b, a / b, -a, a + alpha * b with Intervals or constants."""
    a = args[0]
    if op == "neg":
        return Interval(-a.centre, a.radius)
    b = kwargs.get("other", args[1] if len(args) > 1 else None)
    if op in ("add", "sub"):
        alpha = kwargs.get("alpha", 1)
        b = _scaled(b, -alpha if op == "sub" else alpha)
        if isinstance(a, Interval) and isinstance(b, Interval):
            return Interval(a.centre + b.centre, a.radius + b.radius)
        if isinstance(a, Interval):
            return Interval(a.centre + b, a.radius)
        return Interval(a + b.centre, b.radius)
    if op == "mul":
        if isinstance(a, Interval) and isinstance(b, Interval):
            ends = torch.stack([a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi])
            return Interval.from_ends(ends.amin(0), ends.amax(0))
        box, k = (a, b) if isinstance(a, Interval) else (b, a)
        return _scaled(box, k)
    if isinstance(b, Interval):  # division by an interval
        return _unsupported(node)
    return _scaled(a, 1.0 / b if not isinstance(b, Tensor) else b.to(F64).reciprocal())


def _scaled(value: Any, k: Any) -> Any:
    """k * value for a constant k (a number or a tensor)."""
    if isinstance(k, Tensor):
        k = k.detach().to(F64)
    if isinstance(value, Interval):
        mag = k.abs() if isinstance(k, Tensor) else abs(k)
        return Interval(value.centre * k, value.radius * mag)
    return value * k


def _unsupported(node: fx.Node) -> Any:
    label = (
        node.target
        if isinstance(node.target, str)
        else getattr(node.target, "__name__", str(node.target))
    )
    raise BoundsError(
        f"no interval rule for {label} (node {node.name}) on the path from the "
        "input; pass radius= to certify with a norm bound you know"
    )


def block_radii(
    model: nn.Module,
    example_inputs: Tensor | None,
    input_range: tuple[Any, Any] | None = None,
    input_stats: tuple[Any, Any] | None = None,
) -> Callable[[str], float]:
    """``radius(layer)``: the norm bound of ``layer``'s inputs over the input domain, read
    on ``model`` as it is at each call (so on a network being compressed block by block).
    A Linear layer reading a LayerNorm/RMSNorm output gets that norm's bound instead, which
    holds for any input (:func:`tropnnc.graph.norm_radius`).

    NaN, with a warning saying why, where the domain cannot be propagated: no known input
    shape (``example_inputs`` None), an untraceable model, or an op without an interval
    rule in front of the layer. The domain's own errors (bad ranges) raise.
    """
    bounds: IntervalBounds | None = None
    why = (
        "the input shape is unknown (pass example_inputs=, or radius= to certify with a "
        "norm bound you know)"
    )
    if example_inputs is not None:
        domain = input_domain(tuple(example_inputs.shape[1:]), input_range, input_stats)
        try:
            bounds = IntervalBounds(model, domain)
        except TraceError as exc:
            why = str(exc)

    readers = norm_readers(model)  # layers reading a LayerNorm/RMSNorm: bounded by it

    def radius(layer: str) -> float:
        if layer in readers:
            return norm_radius(model.get_submodule(readers[layer]))
        if bounds is not None:
            try:
                return bounds.radius(layer)
            except BoundsError as exc:
                reason = str(exc)
        else:
            reason = why
        log.warning("%s: no certificate for the input domain: %s", layer, reason)
        return math.nan

    return radius
