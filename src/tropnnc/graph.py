"""Block discovery: find producer -> ReLU -> [pass-through ops] -> consumer chains with torch.fx.

Works on any module torch.fx can trace. A chain qualifies when every tensor on it has
exactly one user (so no unit also feeds a residual addition or a concatenation; shape
queries such as ``x.size(0)`` do not count), the producer and consumer are ungrouped
Linear/Conv2d layers each called once, and every op in between is channel-wise and
positively homogeneous (max/avg/adaptive pools, dropout, flatten of the non-batch dims).
Max pools and dropout may also sit between the producer (or its BatchNorm) and the ReLU:
they commute with it. Everything else is reported as a :class:`Skip` with the reason;
``refused`` marks the cases strict mode turns into errors (an op on the path the method
cannot reason about), as opposed to layers left alone by design (residual streams, the
output layer).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

PRODUCERS = (nn.Linear, nn.Conv2d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d)
#: channel-wise ops that commute with ReLU (monotone, per channel): allowed before it too
PRE_RELU_MODULES = DROPOUTS + (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Identity)
PRE_RELU_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.max_pool2d, F.adaptive_max_pool2d}
#: channel-wise, positively homogeneous modules allowed between ReLU and the consumer
PASS_MODULES = PRE_RELU_MODULES + (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.ReLU)
PASS_FUNCTIONS = PRE_RELU_FUNCTIONS | {
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.relu,
    torch.relu,
    torch.relu_,
    torch.flatten,
}
PASS_METHODS = {"relu", "relu_", "flatten", "contiguous"}
RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
ACTIVATIONS = (
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.SELU,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Softplus,
    nn.Mish,
    nn.ReLU6,
    nn.CELU,
    nn.GLU,
    nn.Hardsigmoid,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.RReLU,
    nn.Softmax,
    nn.LogSoftmax,
)
ACTIVATION_FUNCTIONS = {
    F.gelu,
    F.silu,
    torch.tanh,
    torch.sigmoid,
    F.elu,
    F.leaky_relu,
    F.softplus,
    F.hardswish,
    F.mish,
    F.relu6,
    F.selu,
    F.glu,
    F.tanh,
    F.sigmoid,
    F.hardtanh,
    F.hardsigmoid,
    F.celu,
    F.prelu,
    F.rrelu,
    F.logsigmoid,
    F.softsign,
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.exp,
    torch.abs,
}
ACTIVATION_METHODS = {"sigmoid", "tanh", "exp", "abs", "softmax", "sigmoid_", "tanh_", "abs_"}
#: activations accepted besides ReLU: blocks with them are compressed by the same methods;
#: only ReLU, LeakyReLU and ReLU6 (piecewise linear) have a certificate
ACCEPTED_MODULES = {nn.ReLU6: "relu6", nn.GELU: "gelu", nn.SiLU: "silu", nn.Hardswish: "hardswish"}
ACCEPTED_FUNCTIONS = {F.relu6: "relu6", F.gelu: "gelu", F.silu: "silu", F.hardswish: "hardswish"}
#: element-wise gates a channel group may pass (squeeze-and-excitation scales): never a
#: block's activation, no certificate
GATE_MODULES = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}
GATE_FUNCTIONS = {torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.hardsigmoid: "hardsigmoid"}
RESIDUAL_OPS = {operator.add, operator.iadd, torch.add, operator.sub, torch.sub}
CONCAT_OPS = {torch.cat, torch.concat, torch.stack}
#: products of two activations or attention: not a fixed linear read of the units
ATTENTION_OPS = {
    operator.mul,
    operator.imul,
    torch.mul,
    operator.matmul,
    torch.matmul,
    torch.bmm,
    torch.einsum,
    F.scaled_dot_product_attention,
    F.multi_head_attention_forward,
    torch.baddbmm,
}
ATTENTION_METHODS = {"mul", "mul_", "matmul", "bmm"}
ATTENTION_MODULES = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.Transformer,
)
#: ops that move values between channels (or between samples and channels)
RESHAPE_FUNCTIONS = {
    torch.reshape,
    torch.flatten,
    torch.permute,
    torch.transpose,
    torch.swapaxes,
    torch.movedim,
    torch.squeeze,
    torch.unsqueeze,
    torch.chunk,
    torch.split,
    F.pixel_shuffle,
    F.pixel_unshuffle,
    F.channel_shuffle,
    torch.roll,
    torch.flip,
    torch.t,
}
RESHAPE_METHODS = {
    "view",
    "reshape",
    "permute",
    "transpose",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "t",
    "chunk",
    "split",
    "swapaxes",
    "movedim",
    "roll",
    "flip",
    "view_as",
    "reshape_as",
    "expand",
    "repeat",
    "unfold",
}
RESHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
#: tensor methods and attributes that read shape or type only (not a use of the values)
METADATA_METHODS = {"size", "dim", "numel", "type", "get_device", "is_contiguous"}
METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}
SPATIAL_DIMS = ({2, 3}, {-1, -2})


@dataclass(frozen=True)
class BlockSpec:
    """Where one compressible block lives in a model (module paths, by qualified name)."""

    producer: str
    consumer: str
    bn: str | None  # BatchNorm folded into the producer
    between: tuple[str, ...]  # the ops on the path besides BatchNorm and the ReLU, for reports
    flatten: bool  # conv producer read by a Linear through a flatten (or a global mean)
    activation: str = "relu"  # relu, relu6, gelu, silu, hardswish or leaky_relu:<slope>

    @property
    def producers(self) -> tuple[Producer, ...]:
        return (Producer(self.producer, self.bn),)


@dataclass(frozen=True)
class Producer:
    """A layer writing into a channel group, with the BatchNorm folded into it."""

    layer: str
    bn: str | None


@dataclass(frozen=True)
class Consumer:
    """A layer reading a channel group: its input channels are ``segments`` in order, each
    (group name, width) or (None, width) for channels of no group (width None: whatever the
    layer's input has besides the others); the group is ``segments[index]``. ``flatten``:
    a Linear reading the channels through a flatten of (C, H, W) or a global mean."""

    layer: str
    segments: tuple[tuple[str | None, int | None], ...]
    index: int
    flatten: bool


@dataclass(frozen=True)
class GroupSpec:
    """Channels shared by several layers, clustered once and merged in every member.

    Every producer writes all n channels (their sum, product, or the same channels reached
    through residual additions and channel-wise ops); every consumer reads them (possibly as
    a range of a concatenation); ``channelwise`` are depthwise convolutions (with their
    BatchNorm) on the way, whose per-channel filters merge with the channels. Named by its
    first producer, like a block (``producer``, ``consumer`` and ``bn`` give the first
    members, for code that handles blocks).
    """

    producers: tuple[Producer, ...]
    consumers: tuple[Consumer, ...]
    channelwise: tuple[Producer, ...]
    activation: str  # "relu", "identity", or the channel-wise ops joined by "+"
    between: tuple[str, ...]  # additions, concatenations, pools, for reports

    @property
    def producer(self) -> str:
        return self.producers[0].layer

    @property
    def consumer(self) -> str:
        return self.consumers[0].layer

    @property
    def bn(self) -> str | None:
        return self.producers[0].bn

    @property
    def flatten(self) -> bool:
        return self.consumers[0].flatten

    @property
    def layers(self) -> tuple[str, ...]:
        """Every member layer, producers first."""
        names = [p.layer for p in self.producers] + [c.layer for c in self.channelwise]
        return tuple(names + [c.layer for c in self.consumers if c.layer not in names])


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
            "the traced graph, so forward() must be traceable (no data-dependent control "
            "flow, modules registered as submodules)"
        ) from exc


def input_readers(model: nn.Module) -> set[str]:
    """The Linear and Conv layers that read the network's (first) input as it is, or
    through flattens, reshapes, dropout and identities only: their input's distribution is
    the input domain's. Empty when the model cannot be traced."""
    try:
        gm = trace(model)
    except TraceError:
        return set()
    modules = dict(gm.named_modules())
    frontier = [n for n in gm.graph.nodes if n.op == "placeholder"][:1]
    readers: set[str] = set()
    while frontier:
        for user in frontier.pop().users:
            module = modules.get(user.target) if user.op == "call_module" else None
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                readers.add(str(user.target))
            elif isinstance(module, (nn.Dropout, nn.Identity)) or _is_flatten(user, modules):
                frontier.append(user)
    return readers


def discover(model: nn.Module) -> tuple[list[BlockSpec | GroupSpec], list[Skip]]:
    """All compressible blocks and channel groups of ``model`` in forward order, and the
    skipped producers."""
    graph = trace(model).graph
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    groups, group_skips, members = _groups(graph, modules, calls)
    grouped = members | {p.layer for _, g in groups for p in g.producers}
    found: list[tuple[int, BlockSpec | GroupSpec]] = list(groups)
    skips: list[Skip] = []
    for order, node in enumerate(graph.nodes):
        if (
            node.op != "call_module"
            or not isinstance(modules[node.target], PRODUCERS)
            or node.target in grouped
        ):
            continue
        spec = _follow(node, modules, calls)
        if isinstance(spec, BlockSpec):
            found.append((order, spec))
            continue
        coupled = group_skips.get(spec.layer)
        if coupled is not None and any(word in spec.reason for word in _COUPLING):
            spec = coupled  # the group's reason: why the coupled channels stay
        skips.append(spec)
    return [spec for _, spec in sorted(found, key=lambda e: e[0])], skips


def _follow(
    node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]
) -> BlockSpec | Skip:
    """Walk from a producer node to its consumer, or say why the walk stops."""
    name = node.target
    producer = modules[name]
    units = layer_width(producer)
    if calls[name] > 1:
        return Skip(name, f"{name} is called {calls[name]} times (shared weights)")
    if getattr(producer, "groups", 1) != 1:
        return Skip(
            name,
            f"{name} ({type(producer).__name__}) is a grouped or depthwise "
            f"convolution (groups={producer.groups}): its units do not all "
            "read the same inputs",
            refused=True,
        )
    bn = None
    cur = node
    users = _single_user(cur, name, modules)
    if isinstance(users, Skip):
        return users
    if users.op == "call_module" and isinstance(modules[users.target], BATCHNORMS):
        bn_mod = modules[users.target]
        if not bn_mod.track_running_stats or bn_mod.running_mean is None:
            return Skip(
                name,
                f"{users.target} ({type(bn_mod).__name__}) after {name} has no "
                "running statistics to fold",
                refused=True,
            )
        if calls[users.target] > 1:
            return Skip(
                name,
                f"{users.target} ({type(bn_mod).__name__}) after {name} is "
                f"called {calls[users.target]} times: it cannot be folded",
                refused=True,
            )
        if bn_mod.num_features != units:
            return Skip(
                name,
                f"{users.target} ({type(bn_mod).__name__}) normalises "
                f"{bn_mod.num_features} features, not the {units} units of "
                f"{name}",
                refused=True,
            )
        bn = users.target
        cur = users
        users = _single_user(cur, name, modules)
        if isinstance(users, Skip):
            return users
    between: list[str] = []
    while (activation := _activation(users, modules)) is None:  # max pools, dropout commute
        if not _is_pre_relu(users, modules):
            first = cur is node or (bn is not None and cur.target == bn)
            return _stop(
                name, users, modules, "activation" if first else "op", via=bn, origin=(node, cur)
            )
        between.append(_label(users))
        cur = users
        users = _single_user(cur, name, modules)
        if isinstance(users, Skip):
            return users
    cur = users
    flatten = False
    while True:
        nxt = _single_user(cur, name, modules)
        if isinstance(nxt, Skip):
            return nxt
        if nxt.op == "call_module" and isinstance(modules[nxt.target], PRODUCERS):
            return _consumer(
                name,
                producer,
                nxt.target,
                modules[nxt.target],
                calls,
                bn,
                tuple(between),
                flatten,
                activation,
            )
        if not _is_pass(nxt, modules):
            return _stop(name, nxt, modules, "op", origin=(node, cur))
        if _is_flatten(nxt, modules):
            flatten = True
        between.append(_label(nxt))
        cur = nxt


def _consumer(
    name: str,
    producer: nn.Module,
    target: str,
    consumer: nn.Module,
    calls: dict[str, int],
    bn: str | None,
    between: tuple[str, ...],
    flatten: bool,
    activation: str = "relu",
) -> BlockSpec | Skip:
    """The block ending at consumer ``target``, or why that consumer cannot read the units."""
    units = layer_width(producer)
    kind = type(consumer).__name__
    if calls[target] > 1:
        return Skip(
            name, f"consumer {target} ({kind}) is called {calls[target]} times (shared weights)"
        )
    if getattr(consumer, "groups", 1) != 1:
        return Skip(
            name,
            f"consumer {target} ({kind}) of {name} is a grouped or depthwise "
            f"convolution (groups={consumer.groups})",
            refused=True,
        )
    if isinstance(producer, nn.Linear) and isinstance(consumer, nn.Conv2d):
        return Skip(name, f"{name} (Linear) is reshaped into {target} (Conv2d)", refused=True)
    if isinstance(consumer, nn.Conv2d) and consumer.in_channels != units:
        return Skip(
            name,
            f"consumer {target} ({kind}) reads {consumer.in_channels} channels, "
            f"not the {units} channels of {name}",
            refused=True,
        )
    if isinstance(producer, nn.Linear) and consumer.in_features != units:
        return Skip(
            name,
            f"consumer {target} ({kind}) reads {consumer.in_features} features, "
            f"not the {units} units of {name}: a reshape on the path mixes "
            "units with other dimensions",
            refused=True,
        )
    is_flat = isinstance(producer, nn.Conv2d) and isinstance(consumer, nn.Linear)
    if is_flat and not flatten:
        return Skip(
            name,
            f"no flatten between {name} (Conv2d) and {target} (Linear): the "
            "Linear would read the width dimension",
            refused=True,
        )
    if is_flat and consumer.in_features % units:
        return Skip(
            name,
            f"consumer {target} ({kind}) reads {consumer.in_features} features, "
            f"not a multiple of the {units} channels of {name}",
            refused=True,
        )
    return BlockSpec(name, target, bn, between, is_flat, activation)


def layer_width(module: nn.Module) -> int:
    """The number of units of a Linear (output features) or Conv2d (output channels) layer."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


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


def _single_user(node: fx.Node, producer: str, modules: dict[str, nn.Module]) -> fx.Node | Skip:
    """The one node that uses ``node``'s values, or the Skip of ``producer`` saying why not.

    Several users are a residual or branching connection (left alone), unless one of them
    is attention (refused: the units would be read multiplicatively).
    """
    users = [u for u in node.users if not _is_metadata(u)]
    if len(users) == 1:
        return users[0]
    where = producer if node.target == producer else f"{_label(node)} (after {producer})"
    if not users:
        return Skip(producer, f"the output of {where} is unused")
    attention = [
        u
        for u in users
        if _category(u, modules.get(u.target) if u.op == "call_module" else None) == "attention"
    ]
    if attention:
        return Skip(
            producer,
            f"the output of {where} feeds {_kind(attention[0], modules)}, "
            "which multiplies activations (attention or gating): not a "
            "fixed linear read of the units; left alone",
        )
    kinds = ", ".join(sorted({_label(u) for u in users}))
    return Skip(
        producer,
        f"the output of {where} has {len(users)} users ({kinds}): it "
        f"feeds a residual or branching connection, so {producer} keeps "
        "its width",
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


def _attention_ahead(node: fx.Node, modules: dict[str, nn.Module], hops: int = 6) -> fx.Node | None:
    """The attention op that ``node``'s values reach through at most ``hops`` reshapes,
    index or split ops (a qkv projection's heads), or None."""
    frontier = [node]
    for _ in range(hops):
        nxt = []
        for cur in frontier:
            for user in cur.users:
                mod = modules.get(user.target) if user.op == "call_module" else None
                category = _category(user, mod)
                if category == "attention":
                    return user
                if category == "reshape" or user.target in (
                    operator.getitem,
                    torch.unbind,
                    "unbind",
                    "__getitem__",
                ):
                    nxt.append(user)
        frontier = nxt
    return None


def _is_token_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A flatten of the spatial dimensions then a transpose that puts the channels last
    (``x.flatten(2).transpose(1, 2)``): a patch embedding."""
    if node.op == "call_module":
        mod = modules[node.target]
        spatial = isinstance(mod, nn.Flatten) and mod.start_dim == 2 and mod.end_dim == -1
    else:
        spatial = (
            (node.op == "call_method" and node.target == "flatten")
            or (node.op == "call_function" and node.target is torch.flatten)
        ) and _flatten_args(node) == (2, -1)
    users = list(node.users)
    return (
        spatial
        and len(users) == 1
        and users[0].target in ("transpose", torch.transpose)
        and set(users[0].args[1:3]) in ({1, 2}, {-1, -2}, {1, -1})
    )


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


def _is_shortcut(origin: fx.Node, prev: fx.Node, merge: fx.Node) -> bool:
    """True when producer node ``origin`` (reaching ``merge`` through ``prev``) is a shortcut
    projection: the producer's input also reaches another operand of ``merge``."""
    source = origin.args[0] if origin.args and isinstance(origin.args[0], fx.Node) else None
    if source is None:
        return False
    seen: set[fx.Node] = set()
    stack = [a for a in merge.all_input_nodes if a is not prev]
    while stack:
        cur = stack.pop()
        if cur is source:
            return True
        if cur not in seen:
            seen.add(cur)
            stack.extend(cur.all_input_nodes)
    return False


def _stop(
    name: str,
    node: fx.Node,
    modules: dict[str, nn.Module],
    what: str,
    via: str | None = None,
    origin: tuple[fx.Node, fx.Node] | None = None,
) -> Skip:
    """The Skip for a walk from ``name`` that stops at ``node``.

    ``what`` is "activation" when ``node`` directly follows the producer (or its
    BatchNorm ``via``), "op" when it follows the ReLU; ``origin`` is the producer's node
    and the node on its path just before ``node``.
    """
    if node.op == "output":
        if what == "activation":
            return Skip(name, f"{name} is an output layer (never compressed)")
        return Skip(name, f"{name} feeds the model output with no consumer layer")
    mod = modules.get(node.target) if node.op == "call_module" else None
    label = _label(node)
    category = _category(node, mod)
    source = f"{name} (through {via})" if via else name
    if category == "residual":
        role = (
            "is a shortcut (downsample) projection"
            if origin is not None and _is_shortcut(*origin, node)
            else "is the last layer of a residual branch"
        )
        return Skip(
            name,
            f"{source} {role}: it feeds a residual addition ({label}), and the "
            "residual stream keeps its width",
        )
    if category == "concat":
        return Skip(
            name,
            f"{source} feeds a concatenation ({label}): its units are read "
            "by other branches too, so it keeps its width",
        )
    described = _kind(node, modules)
    if category == "activation":
        return Skip(
            name,
            f"{described} after {name} is not a supported activation (ReLU, "
            "LeakyReLU, ReLU6, GELU, SiLU, hard-swish)",
            refused=True,
        )
    if category == "attention":
        return Skip(
            name,
            f"{described} after {name} multiplies activations (attention or "
            "gating): not a fixed linear read of the units; left alone",
        )
    if category == "reshape":
        attention = _attention_ahead(node, modules)
        if attention is not None:
            return Skip(
                name,
                f"{name} feeds {_kind(attention, modules)} through {described}: "
                "attention (query, key, value) is left alone",
            )
        if _is_token_flatten(node, modules):
            return Skip(
                name,
                f"{described} after {name} turns its channels into the features "
                "of tokens (a flatten of H, W); left alone",
            )
        return Skip(
            name,
            f"{described} after {name} is a reshape that mixes channels (only "
            "a per-sample flatten of C, H, W is allowed)",
            refused=True,
        )
    if category == "batchnorm":
        if what == "activation":  # a second BatchNorm directly after the folded one
            return Skip(
                name,
                f"{described} after {source} cannot be folded (only one "
                "BatchNorm directly after the producer)",
                refused=True,
            )
        return Skip(
            name,
            f"{described} after the activation of {name} is not positively homogeneous",
            refused=True,
        )
    if what == "activation" and isinstance(mod, PRODUCERS):
        return Skip(
            name,
            f"{source} feeds {described} with no activation in between (a "
            "linear bottleneck): there is no ReLU to compress across",
            refused=True,
        )
    if what == "activation":  # before any ReLU only ops that commute with it may sit
        return Skip(
            name,
            f"{described} directly after {source} comes before the ReLU, where "
            "only max pools and dropout are allowed (they commute with it; avg "
            "pools and flatten only after the ReLU)",
            refused=True,
        )
    return Skip(
        name,
        f"{described} after {name} is not supported on a block's path (allowed: "
        "ReLU, max/avg/adaptive pools, dropout, flatten)",
        refused=True,
    )


# --------------------------------------------------------------------------------------------
# channel groups: residual streams, concatenations, branches, depthwise convolutions
# --------------------------------------------------------------------------------------------

MUL_OPS = {operator.mul, operator.imul, torch.mul}
_COUPLING = ("residual or branching", "residual addition", "concatenation", "depthwise")


class _Space:
    """The channels of one producer during group analysis; spaces joined by an addition,
    a product or a shared reader are merged (union-find)."""

    def __init__(self, width: int, order: int) -> None:
        self.parent = self
        self.width = width
        self.order = order
        self.producers: list[tuple[int, Producer]] = []
        self.channelwise: list[tuple[int, Producer]] = []
        self.consumers: list[tuple[int, str, tuple, int, bool]] = []
        self.acts: set[str] = set()
        self.ops: list[str] = []
        self.blocked: tuple[str, bool] | None = None  # (reason, refused)
        self.gated = False

    def find(self) -> _Space:
        root = self
        while root.parent is not root:
            root = root.parent
        self.parent = root
        return root

    def block(self, reason: str, refused: bool = False) -> None:
        root = self.find()
        if root.blocked is None:
            root.blocked = (reason, refused)


def _union(a: _Space, b: _Space, label: str) -> _Space:
    a, b = a.find(), b.find()
    if a is b:
        return a
    if a.width != b.width:
        a.block(f"is combined with {b.width} other channels by {label}")
    if b.order < a.order:
        a, b = b, a
    b.parent = a
    a.producers += b.producers
    a.channelwise += b.channelwise
    a.consumers += b.consumers
    a.acts |= b.acts
    a.ops += b.ops
    a.gated |= b.gated
    if a.blocked is None:
        a.blocked = b.blocked
    return a


def _groups(
    graph: fx.Graph, modules: dict[str, nn.Module], calls: dict[str, int]
) -> tuple[list[tuple[int, GroupSpec | BlockSpec]], dict[str, Skip], set[str]]:
    """Channel groups of the traced graph: (forward position, spec) of every group that can
    be merged (and of linear bottlenecks, blocks without an activation), the Skip of every
    producer of a group that cannot, and the depthwise convolutions that are members of a
    group."""
    segs: dict[fx.Node, tuple[tuple[_Space | None, int | None], ...]] = {}
    flat: set[fx.Node] = set()
    layer_of: dict[fx.Node, Producer] = {}  # producer / depthwise nodes, for BN folding
    spaces: list[_Space] = []

    def block_inputs(node: fx.Node, reason: str, refused: bool = False) -> None:
        for arg in node.all_input_nodes:
            for space, _ in segs.get(arg, ()):
                if space is not None:
                    space.block(reason, refused)

    for order, node in enumerate(graph.nodes):
        if _is_metadata(node) or node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            block_inputs(node, "feeds the model output")
            continue
        has_input = any(a in segs for a in node.all_input_nodes)
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, PRODUCERS) and getattr(mod, "groups", 1) == 1:
            if has_input:
                src = node.args[0]
                if calls[node.target] > 1:
                    block_inputs(
                        node,
                        f"is read by {node.target}, which is called {calls[node.target]} times",
                    )
                else:
                    for i, (space, _) in enumerate(segs[src]):
                        if space is not None:
                            space.find().consumers.append(
                                (order, node.target, segs[src], i, src in flat)
                            )
            if calls[node.target] == 1:
                space = _Space(layer_width(mod), order)
                space.producers.append((order, Producer(node.target, None)))
                spaces.append(space)
                segs[node] = ((space, space.width),)
                layer_of[node] = space.producers[-1][1]
            continue
        if not has_input:
            continue
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        label = _kind(node, modules)
        if isinstance(mod, nn.Conv2d):  # grouped (a plain conv is a producer, above)
            depthwise = mod.groups == mod.in_channels == mod.out_channels
            if (
                depthwise
                and src in segs
                and len(segs[src]) == 1
                and segs[src][0][0] is not None
                and calls[node.target] == 1
            ):
                space = segs[src][0][0].find()
                space.channelwise.append((order, Producer(node.target, None)))
                layer_of[node] = space.channelwise[-1][1]
                segs[node] = segs[src]
            else:
                block_inputs(
                    node,
                    f"is read by {label}, a grouped convolution (groups={mod.groups})",
                    refused=True,
                )
            continue
        if isinstance(mod, BATCHNORMS):
            users = [u for u in src.users if not _is_metadata(u)] if src is not None else []
            owner = layer_of.get(src)
            if (
                owner is not None
                and users == [node]
                and calls[node.target] == 1
                and mod.track_running_stats
                and mod.running_mean is not None
                and mod.num_features == segs[src][0][1]
            ):
                space = segs[src][0][0].find()
                for entries in (space.producers, space.channelwise):
                    for j, (pos, p) in enumerate(entries):
                        if p is owner:
                            entries[j] = (pos, Producer(p.layer, node.target))
                segs[node] = segs[src]
            else:
                block_inputs(
                    node,
                    f"passes through {label} away from its producer (a "
                    "BatchNorm is folded only directly after the producer)",
                )
            continue
        activation = _activation(node, modules) or _gate(node, modules)
        if (
            activation is not None
            or _is_pass(node, modules)
            or _is_pre_relu(node, modules)
            or _label(node) == "stochastic_depth"
        ):  # (torchvision: identity in eval)
            if src not in segs:
                continue
            if activation is not None:
                for space, _ in segs[src]:
                    if space is not None:
                        space.find().acts.add(activation)
            elif _is_flatten(node, modules):
                flat.add(node)
            if src in flat:
                flat.add(node)
            segs[node] = segs[src]
            continue
        category = _category(node, mod)
        is_add = category == "residual"
        is_mul = (node.op == "call_function" and node.target in MUL_OPS) or (
            node.op == "call_method" and node.target in ("mul", "mul_")
        )
        if is_add or is_mul:
            operands = list(node.args[:2])
            if (
                len(operands) == 2
                and all(isinstance(a, fx.Node) and a in segs for a in operands)
                and [w for _, w in segs[operands[0]]] == [w for _, w in segs[operands[1]]]
            ):
                for (s1, _), (s2, _) in zip(segs[operands[0]], segs[operands[1]], strict=True):
                    if s1 is None or s2 is None:
                        for space in (s1, s2):
                            if space is not None:
                                space.block(f"is combined by {label} with channels of no layer")
                        continue
                    root = _union(s1, s2, label)
                    root.ops.append(_label(node))
                    root.gated |= is_mul
                segs[node] = segs[operands[0]]
                if any(o in flat for o in operands):
                    flat.add(node)
            else:
                what = "added to" if is_add else "multiplied by"
                block_inputs(node, f"is {what} a tensor that is not a layer's channels ({label})")
            continue
        if category == "concat" and node.target is not torch.stack:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            parts = node.args[0] if node.args else ()
            if dim in (1, -3) and isinstance(parts, (list, tuple)):
                joined: list[tuple[_Space | None, int | None]] = []
                for part in parts:
                    joined += (
                        list(segs.get(part, ((None, None),)))
                        if isinstance(part, fx.Node)
                        else [(None, None)]
                    )
                for space, _ in joined:
                    if space is not None:
                        space.find().ops.append(_label(node))
                segs[node] = tuple(joined)
                continue
            block_inputs(
                node, f"is concatenated by {label} along dimension {dim}, not the channels"
            )
            continue
        reasons = {
            "attention": (
                f"is read by {label}, which multiplies activations (attention or "
                "gating); left alone",
                False,
            ),
            "reshape": (f"is reshaped by {label}, which mixes channels", False),
            "activation": (f"passes through {label}, not a supported activation", True),
            "batchnorm": (f"passes through {label}", False),
        }
        if isinstance(mod, nn.LayerNorm) or (
            node.op == "call_function" and node.target is F.layer_norm
        ):
            reason = (f"is normalised by {label}, which mixes channels; left alone", False)
        else:
            reason = reasons.get(
                category,
                (
                    f"is read by {label}, which is not supported on a channel group; left alone",
                    False,
                ),
            )
        block_inputs(node, *reason)
    return _finish(spaces, modules)


def _finish(
    spaces: list[_Space], modules: dict[str, nn.Module]
) -> tuple[list[tuple[int, GroupSpec | BlockSpec]], dict[str, Skip], set[str]]:
    """Turn the analysed spaces into GroupSpecs (or Skips of their producers)."""
    roots = list(dict.fromkeys(s.find() for s in spaces))
    for root in roots:  # checks on the readers
        readers = [c[1] for c in root.consumers]
        if not root.consumers and root.blocked is None:
            root.block("is read by no layer")
        if len(set(readers)) != len(readers):
            root.block("is read twice by the same layer")
        if set(readers) & {p.layer for _, p in root.producers}:
            root.block("is read by a layer that also writes into it")
        kinds = {type(modules[p.layer]) for _, p in root.producers}
        for _, layer, seg, _, flatten in root.consumers:
            mod = modules[layer]
            widths = [w for _, w in seg]
            total = None if None in widths else sum(widths)
            if isinstance(mod, nn.Conv2d):
                bad = nn.Linear in kinds or (total is not None and mod.in_channels != total)
            elif flatten:
                bad = total is None or mod.in_features % total != 0
            else:
                bad = nn.Conv2d in kinds or (total is not None and mod.in_features != total)
            if bad:
                root.block(
                    f"is read by {layer} ({type(mod).__name__}) in a layout other than its channels"
                )
    names = {root: root.producers[0][1].layer for root in roots if root.blocked is None}
    groups: list[tuple[int, GroupSpec | BlockSpec]] = []
    skips: dict[str, Skip] = {}
    members: set[str] = set()
    for root in roots:
        producers = [p for _, p in sorted(root.producers, key=lambda e: e[0])]
        others = [p.layer for p in producers]
        if root.blocked is not None:
            reason, refused = root.blocked
            for p in producers:
                rest = [o for o in others if o != p.layer]
                head = (
                    f"{p.layer} writes into a channel group with {', '.join(rest[:3])}"
                    f"{', ...' if len(rest) > 3 else ''} that"
                    if rest
                    else f"the channel group of {p.layer}"
                )
                skips[p.layer] = Skip(p.layer, f"{head} {reason}", refused)
            continue
        consumers = []
        for _, layer, seg, index, flatten in sorted(root.consumers, key=lambda e: e[0]):
            resolved = tuple(
                (
                    names.get(s.find()) if s is not None else None,
                    None if s is not None and s.find() in names else w,
                )
                for s, w in seg
            )
            consumers.append(Consumer(layer, resolved, index, flatten))
        channelwise = tuple(p for _, p in sorted(root.channelwise, key=lambda e: e[0]))
        simple = (
            len(producers) == 1
            and len(consumers) == 1
            and not channelwise
            and len(consumers[0].segments) == 1
            and not root.gated
            and not root.ops
        )
        if simple and not root.acts:  # a linear bottleneck: producer [-> BN] -> consumer
            c = consumers[0]
            groups.append(
                (
                    root.order,
                    BlockSpec(
                        producers[0].layer, c.layer, producers[0].bn, (), c.flatten, "identity"
                    ),
                )
            )
            continue
        if simple:
            continue  # a plain chain with an activation: the block walk decides
        acts = set(root.acts)
        plain = not channelwise and not root.gated
        if plain and acts <= {"relu"}:  # positively homogeneous: sums keep the certificate
            activation = "relu" if acts else "identity"
        elif (
            plain
            and len(acts) == 1
            and (len(producers) == 1 or next(iter(acts)).startswith("leaky_relu:"))
        ):
            activation = next(iter(acts))  # (ReLU6's clipping term holds for one producer)
        else:  # named by its parts; "sum": a non-homogeneous activation in a sum
            activation = (
                "+".join(
                    sorted(acts)
                    + ["depthwise"] * bool(channelwise)
                    + ["gated"] * root.gated
                    + ["sum"] * (len(producers) > 1)
                )
                or "identity"
            )
        members.update(p.layer for p in channelwise)
        groups.append(
            (
                root.order,
                GroupSpec(
                    tuple(producers),
                    tuple(consumers),
                    channelwise,
                    activation,
                    tuple(dict.fromkeys(root.ops)),
                ),
            )
        )
    return groups, skips, members
