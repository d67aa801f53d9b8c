"""What one torch.fx node does: metadata reads, labels for messages, activations and gates,
channel-wise pass-through ops, flattens and spatial means, and the category of an
unsupported op (residual, concat, activation, attention, reshape, batchnorm)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._ops import (
    ACCEPTED_FUNCTIONS,
    ACCEPTED_MODULES,
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATIONS,
    ATTENTION_METHODS,
    ATTENTION_MODULES,
    ATTENTION_OPS,
    BATCHNORMS,
    CONCAT_OPS,
    GATE_FUNCTIONS,
    GATE_MODULES,
    METADATA_ATTRS,
    METADATA_METHODS,
    PASS_FUNCTIONS,
    PASS_METHODS,
    PASS_MODULES,
    PRE_RELU_FUNCTIONS,
    PRE_RELU_MODULES,
    RELU_FUNCTIONS,
    RESHAPE_FUNCTIONS,
    RESHAPE_METHODS,
    RESHAPE_MODULES,
    RESIDUAL_OPS,
    SPATIAL_DIMS,
)


def _is_metadata(node: fx.Node) -> bool:
    """A use that reads only the shape, dtype or device of its input."""
    if node.op == "call_method":
        return node.target in METADATA_METHODS
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) > 1
        and node.args[1] in METADATA_ATTRS
    )


def _label(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "output":
        return "the model output"
    return getattr(node.target, "__name__", str(node.target))


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """``name (Type)`` for a module call, ``name()`` for a function or method call."""
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f".{node.target}() (node {node.name})"
    return f"{_label(node)}() (node {node.name})"


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        mod = modules[node.target]
        return type(mod) is nn.ReLU or (type(mod) is nn.LeakyReLU and mod.negative_slope == 0)
    if node.op == "call_function":
        if node.target is F.leaky_relu:
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            return slope == 0
        return node.target in RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _activation(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The name of the accepted activation ``node`` applies, or None: "relu", "relu6",
    "gelu", "silu", "hardswish", or "leaky_relu:<slope>"."""
    if _is_relu(node, modules):
        return "relu"
    if node.op == "call_module":
        mod = modules[node.target]
        if type(mod) is nn.LeakyReLU:
            return f"leaky_relu:{mod.negative_slope:g}"
        return ACCEPTED_MODULES.get(type(mod))
    if node.op == "call_function":
        if node.target is F.leaky_relu:
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            return f"leaky_relu:{slope:g}" if isinstance(slope, (int, float)) else None
        return ACCEPTED_FUNCTIONS.get(node.target)
    return None


def _gate(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The name of the element-wise gate ``node`` applies (sigmoid), or None."""
    if node.op == "call_module":
        return GATE_MODULES.get(type(modules[node.target]))
    if node.op == "call_function":
        return GATE_FUNCTIONS.get(node.target)
    return "sigmoid" if node.op == "call_method" and node.target == "sigmoid" else None


def _is_pre_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Ops that may sit between the producer and its ReLU: they commute with it."""
    if node.op == "call_module":
        return isinstance(modules[node.target], PRE_RELU_MODULES)
    return node.op == "call_function" and node.target in PRE_RELU_FUNCTIONS


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Flatten)
    if node.op == "call_function":
        if node.target is torch.mean:
            return _spatial_mean(node) == "flatten"
        return node.target in (torch.flatten, torch.reshape)
    if node.op == "call_method" and node.target == "mean":
        return _spatial_mean(node) == "flatten"
    return node.op == "call_method" and node.target in ("flatten", "view", "reshape")


def _is_pass(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if _is_relu(node, modules):
        return True
    if node.op == "call_module":
        mod = modules[node.target]
        if isinstance(mod, nn.Flatten):
            return mod.start_dim == 1 and mod.end_dim == -1
        if isinstance(mod, nn.AdaptiveMaxPool2d):
            return not mod.return_indices
        if isinstance(mod, nn.MaxPool2d):
            return not mod.return_indices
        return isinstance(mod, PASS_MODULES)
    if node.op == "call_function":
        if node.target is torch.flatten:
            return _flatten_args(node) == (1, -1)
        if node.target is torch.reshape:
            return _is_batch_flatten_view(node)
        if node.target is torch.mean:
            return _spatial_mean(node) is not None
        if node.target in (F.max_pool2d, F.adaptive_max_pool2d):
            return not node.kwargs.get("return_indices", False)
        return node.target in PASS_FUNCTIONS
    if node.op == "call_method":
        if node.target == "flatten":
            return _flatten_args(node) == (1, -1)
        if node.target in ("view", "reshape"):
            return _is_batch_flatten_view(node)
        if node.target == "mean":
            return _spatial_mean(node) is not None
        return node.target in PASS_METHODS
    return False


def _flatten_args(node: fx.Node) -> tuple[object, object]:
    args = list(node.args[1:]) + [None, None]
    start = node.kwargs.get("start_dim", args[0] if args[0] is not None else 0)
    end = node.kwargs.get("end_dim", args[1] if args[1] is not None else -1)
    return start, end


def _is_batch_flatten_view(node: fx.Node) -> bool:
    """A per-sample flatten: ``view(x.size(0), -1)``, ``view(B, -1)`` or ``view(-1, N)``.

    The batch slot must be a literal, -1, or ``x.size(0)``/``x.shape[0]`` (then the feature
    slot may be computed); otherwise the feature slot must be -1 or a literal.
    ``view(-1, N)`` is taken to be a per-sample flatten (N = C*H*W); the consumer's
    in_features are checked against the channels later.
    """
    shape = list(node.args[1:])
    if "size" in node.kwargs or "shape" in node.kwargs:
        shape = [node.kwargs.get("size", node.kwargs.get("shape"))]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = list(shape[0])
    if len(shape) != 2:
        return False
    batch, feat = shape
    if isinstance(batch, fx.Node):  # B rows: the features are necessarily C*H*W
        return _is_batch_size(batch) and (
            isinstance(feat, fx.Node) or feat == -1 or (isinstance(feat, int) and feat > 0)
        )
    return (
        isinstance(batch, int)
        and (batch == -1 or batch > 0)
        and isinstance(feat, int)
        and (feat == -1 or feat > 0)
    )


def _is_batch_size(node: fx.Node) -> bool:
    """``x.size(0)``, ``x.size()[0]`` or ``x.shape[0]``."""
    if node.op == "call_method" and node.target == "size":
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        return dim == 0
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]
        return isinstance(src, fx.Node) and (
            (src.op == "call_method" and src.target == "size" and len(src.args) == 1)
            or (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
        )
    return False


def _spatial_mean(node: fx.Node) -> str | None:
    """ "flatten" for a global average over H and W (``x.mean((2, 3))``), "pool" with
    keepdim=True, None for any other mean."""
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if not isinstance(dims, (tuple, list)) or set(dims) not in SPATIAL_DIMS or len(dims) != 2:
        return None
    return "pool" if keep else "flatten"


def _category(node: fx.Node, mod: nn.Module | None) -> str | None:
    """What kind of unsupported op ``node`` is, for the refusal message."""
    if isinstance(mod, nn.LeakyReLU) or isinstance(mod, ACTIVATIONS):
        return "activation"
    if isinstance(mod, ATTENTION_MODULES):
        return "attention"
    if isinstance(mod, RESHAPE_MODULES):
        return "reshape"
    if isinstance(mod, BATCHNORMS):
        return "batchnorm"
    if node.op == "call_function":
        target = node.target
        if target in RESIDUAL_OPS:
            return "residual"
        if target in CONCAT_OPS:
            return "concat"
        if target in ACTIVATION_FUNCTIONS:
            return "activation"
        if target in ATTENTION_OPS:
            return "attention"
        if target in RESHAPE_FUNCTIONS:
            return "reshape"
    if node.op == "call_method":
        if node.target in ("add", "add_", "sub", "sub_"):
            return "residual"
        if node.target in ACTIVATION_METHODS:
            return "activation"
        if node.target in ATTENTION_METHODS:
            return "attention"
        if node.target in RESHAPE_METHODS:
            return "reshape"
    return None
