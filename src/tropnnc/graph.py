"""Block discovery: find producer -> ReLU -> [pass-through ops] -> consumer chains with torch.fx.

Works on any module torch.fx can trace. A chain qualifies when every tensor on it has
exactly one user (so no unit also feeds a residual addition or a concatenation), the
producer and consumer are ungrouped Linear/Conv2d layers each called once, and every op in
between is channel-wise and positively homogeneous. Everything else is reported as a
:class:`Skip` with the reason; ``refused`` marks the cases strict mode turns into errors.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

PRODUCERS = (nn.Linear, nn.Conv2d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
#: channel-wise, positively homogeneous modules allowed between ReLU and the consumer
PASS_MODULES = (nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity,
                nn.Flatten, nn.ReLU)
PASS_FUNCTIONS = {F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.relu,
                  torch.relu, torch.flatten}
PASS_METHODS = {"relu", "flatten", "contiguous"}
RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
ACTIVATIONS = (nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.LeakyReLU, nn.PReLU, nn.SELU,
               nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Mish, nn.ReLU6, nn.CELU, nn.GLU)
ACTIVATION_FUNCTIONS = {F.gelu, F.silu, torch.tanh, torch.sigmoid, F.elu, F.leaky_relu,
                        F.softplus, F.hardswish, F.mish, F.relu6, F.selu, F.glu}
MERGING_OPS = {operator.add, operator.iadd, torch.add, torch.cat, torch.concat,
               operator.mul, torch.mul}


@dataclass(frozen=True)
class BlockSpec:
    """Where one compressible block lives in a model (module paths, by qualified name)."""

    producer: str
    consumer: str
    bn: str | None  # BatchNorm folded into the producer
    between: tuple[str, ...]  # the ops between ReLU and the consumer, for reports
    flatten: bool  # conv producer read by a Linear through Flatten


@dataclass(frozen=True)
class Skip:
    """A producer layer that is not compressed, and why."""

    layer: str
    reason: str
    refused: bool = False  # an op on the path the method cannot reason about


class TraceError(TypeError):
    """The model cannot be traced by torch.fx."""


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; TraceError naming the model on failure."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for untraceable control flow
        raise TraceError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); blocks are discovered from "
            "the traced graph, so data-dependent control flow in forward() is not "
            "supported") from exc


def discover(model: nn.Module) -> tuple[list[BlockSpec], list[Skip]]:
    """All compressible blocks of ``model`` in forward order, and the skipped producers."""
    graph = trace(model).graph
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    blocks: list[BlockSpec] = []
    skips: list[Skip] = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], PRODUCERS):
            found = _follow(node, modules, calls)
            (blocks if isinstance(found, BlockSpec) else skips).append(found)
    return blocks, skips


def _follow(node: fx.Node, modules: dict[str, nn.Module],
            calls: dict[str, int]) -> BlockSpec | Skip:
    """Walk from a producer node to its consumer, or say why the walk stops."""
    name = node.target
    producer = modules[name]
    if calls[name] > 1:
        return Skip(name, f"{name} is called {calls[name]} times (shared weights)")
    if getattr(producer, "groups", 1) != 1:
        return Skip(name, f"{name} is a grouped or depthwise convolution "
                          f"(groups={producer.groups})", refused=True)
    bn = None
    cur = node
    users = _single_user(cur)
    if isinstance(users, Skip):
        return Skip(name, users.reason.format(name=name))
    if users.op == "call_module" and isinstance(modules[users.target], BATCHNORMS):
        bn_mod = modules[users.target]
        if not bn_mod.track_running_stats or bn_mod.running_mean is None:
            return Skip(name, f"BatchNorm {users.target} after {name} has no running "
                              "statistics to fold", refused=True)
        bn = users.target
        cur = users
        users = _single_user(cur)
        if isinstance(users, Skip):
            return Skip(name, users.reason.format(name=bn))
    if not _is_relu(users, modules):
        return _stop(name, users, modules, "activation")
    cur = users
    between: list[str] = []
    flatten = False
    while True:
        nxt = _single_user(cur)
        if isinstance(nxt, Skip):
            return Skip(name, nxt.reason.format(name=_label(cur)))
        if nxt.op == "call_module" and isinstance(modules[nxt.target], PRODUCERS):
            consumer = modules[nxt.target]
            if calls[nxt.target] > 1:
                return Skip(name, f"consumer {nxt.target} is called {calls[nxt.target]} "
                                  "times (shared weights)")
            if getattr(consumer, "groups", 1) != 1:
                return Skip(name, f"consumer {nxt.target} is a grouped or depthwise "
                                  f"convolution (groups={consumer.groups})", refused=True)
            if isinstance(producer, nn.Linear) and isinstance(consumer, nn.Conv2d):
                return Skip(name, f"{name} (Linear) is reshaped into {nxt.target} (Conv2d)",
                            refused=True)
            is_flat = isinstance(producer, nn.Conv2d) and isinstance(consumer, nn.Linear)
            if is_flat and not flatten:
                return Skip(name, f"no flatten between {name} and {nxt.target}", refused=True)
            if is_flat and consumer.in_features % producer.out_channels:
                return Skip(name, f"{nxt.target} reads {consumer.in_features} features, not a "
                                  f"multiple of the {producer.out_channels} channels of {name}",
                            refused=True)
            return BlockSpec(name, nxt.target, bn, tuple(between), is_flat)
        if not _is_pass(nxt, modules):
            return _stop(name, nxt, modules, "op")
        if _is_flatten(nxt, modules):
            flatten = True
        between.append(_label(nxt))
        cur = nxt


def _single_user(node: fx.Node) -> fx.Node | Skip:
    users = list(node.users)
    if len(users) == 1:
        return users[0]
    if not users:
        return Skip("", "output of {name} is unused")
    kinds = ", ".join(sorted({_label(u) for u in users}))
    return Skip("", f"output of {{name}} has {len(users)} users ({kinds}): it feeds a "
                    "residual/branching connection")


def _label(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "output":
        return "the model output"
    return getattr(node.target, "__name__", str(node.target))


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Flatten)
    if node.op == "call_function":
        return node.target is torch.flatten
    return node.op == "call_method" and node.target in ("flatten", "view", "reshape")


def _is_pass(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        mod = modules[node.target]
        if isinstance(mod, nn.Flatten):
            return mod.start_dim == 1 and mod.end_dim == -1
        return isinstance(mod, PASS_MODULES)
    if node.op == "call_function":
        if node.target is torch.flatten:
            return _flatten_args(node) == (1, -1)
        return node.target in PASS_FUNCTIONS
    if node.op == "call_method":
        if node.target == "flatten":
            return _flatten_args(node) == (1, -1)
        if node.target in ("view", "reshape"):
            return _is_batch_flatten_view(node)
        return node.target in PASS_METHODS
    return False


def _flatten_args(node: fx.Node) -> tuple[object, object]:
    args = list(node.args[1:]) + [None, None]
    start = node.kwargs.get("start_dim", args[0] if args[0] is not None else 0)
    end = node.kwargs.get("end_dim", args[1] if args[1] is not None else -1)
    return start, end


def _is_batch_flatten_view(node: fx.Node) -> bool:
    """``x.view(x.size(0), -1)`` (or with a literal batch size): a flatten, nothing else."""
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return len(shape) == 2 and shape[1] == -1


def _stop(name: str, node: fx.Node, modules: dict[str, nn.Module], what: str) -> Skip:
    """The Skip for a walk from ``name`` that stops at ``node``."""
    if node.op == "output":
        if what == "activation":
            return Skip(name, f"{name} is an output layer (never compressed)")
        return Skip(name, f"{name} feeds the model output with no consumer layer")
    mod = modules.get(node.target) if node.op == "call_module" else None
    is_act = isinstance(mod, ACTIVATIONS) or (node.op == "call_function"
                                              and node.target in ACTIVATION_FUNCTIONS)
    if isinstance(mod, nn.LeakyReLU) and mod.negative_slope == 0:
        is_act = False
    label = _label(node)
    if is_act:
        kind = type(mod).__name__ if mod is not None else label
        return Skip(name, f"{label} ({kind}) after {name} is not a ReLU", refused=True)
    if node.op == "call_function" and node.target in MERGING_OPS:
        return Skip(name, f"{name} feeds {label} (residual addition or concatenation)")
    if mod is not None and isinstance(mod, BATCHNORMS):
        return Skip(name, f"{label} (BatchNorm) after the activation of {name} is not "
                          "positively homogeneous", refused=True)
    if mod is not None and isinstance(mod, nn.MultiheadAttention):
        return Skip(name, f"{label} (attention) follows {name}", refused=True)
    kind = type(mod).__name__ if mod is not None else label
    return Skip(name, f"{label} ({kind}) after {name} is not supported on a block's path",
                refused=True)
