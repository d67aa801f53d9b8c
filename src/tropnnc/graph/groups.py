"""Channel groups: walk the traced graph once, tracking which producers' channels every
tensor carries (residual streams, concatenations, depthwise chains, squeeze-and-excitation
gates), and block the channels that reach an op a group cannot contain."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._nodes import (
    _activation,
    _category,
    _gate,
    _is_flatten,
    _is_metadata,
    _is_pass,
    _is_pre_relu,
    _kind,
    _label,
)
from ._ops import BATCHNORMS, MUL_OPS, PRODUCERS
from .group_specs import _finish
from .spaces import _Space, _union
from .specs import BlockSpec, GroupSpec, Producer, Skip, layer_width

#: why channels reaching an unsupported op of each category are blocked: (reason, refused)
_UNSUPPORTED = {
    "attention": (
        "is read by {label}, which multiplies activations (attention or gating); left alone",
        False,
    ),
    "reshape": ("is reshaped by {label}, which mixes channels", False),
    "activation": ("passes through {label}, not a supported activation", True),
    "batchnorm": ("passes through {label}", False),
}


def _groups(
    graph: fx.Graph, modules: dict[str, nn.Module], calls: dict[str, int]
) -> tuple[list[tuple[int, GroupSpec | BlockSpec]], dict[str, Skip], set[str]]:
    """Channel groups of the traced graph: (forward position, spec) of every group that can
    be merged (and of linear bottlenecks, blocks without an activation), the Skip of every
    producer of a group that cannot, and the depthwise convolutions that are members of a
    group."""
    walk = _Walk(modules, calls)
    for order, node in enumerate(graph.nodes):
        walk.visit(order, node)
    return _finish(walk.spaces, modules)


class _Walk:
    """One pass over the graph in forward order, recording which channel spaces every tensor
    carries (``segs``: one (space, width) per channel segment, space None for channels of no
    layer) and blocking the spaces whose channels reach an op a group cannot contain."""

    def __init__(self, modules: dict[str, nn.Module], calls: dict[str, int]) -> None:
        self.modules = modules
        self.calls = calls
        self.segs: dict[fx.Node, tuple[tuple[_Space | None, int | None], ...]] = {}
        self.flat: set[fx.Node] = set()  # tensors read through a flatten (or a global mean)
        self.layer_of: dict[fx.Node, Producer] = {}  # producer / depthwise nodes, for BN folding
        self.spaces: list[_Space] = []

    def block_inputs(self, node: fx.Node, reason: str, refused: bool = False) -> None:
        """Block every space that ``node`` reads: its channels cannot be merged."""
        for arg in node.all_input_nodes:
            for space, _ in self.segs.get(arg, ()):
                if space is not None:
                    space.block(reason, refused)

    def visit(self, order: int, node: fx.Node) -> None:
        """Record what ``node`` (at forward position ``order``) does to the channels it reads:
        dispatch on the kind of op, in the order the checks must run."""
        if _is_metadata(node) or node.op in ("placeholder", "get_attr"):
            return
        if node.op == "output":
            self.block_inputs(node, "feeds the model output")
            return
        has_input = any(a in self.segs for a in node.all_input_nodes)
        mod = self.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, PRODUCERS) and getattr(mod, "groups", 1) == 1:
            if has_input:
                self.read_by_layer(order, node)
            if self.calls[node.target] == 1:
                self.new_space(order, node, mod)
            return
        if not has_input:
            return
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        label = _kind(node, self.modules)
        if isinstance(mod, nn.Conv2d):  # grouped (a plain conv is a producer, above)
            self.grouped_conv(order, node, mod, src, label)
            return
        if isinstance(mod, BATCHNORMS):
            self.batchnorm(node, mod, src, label)
            return
        if self.pass_through(node, src):
            return
        category = _category(node, mod)
        if category == "residual" or _is_product(node):
            self.combine(node, _is_product(node), label)
        elif category == "concat" and node.target is not torch.stack:
            self.concat(node, label)
        else:
            self.block_inputs(node, *_unsupported(node, mod, category, label))

    def read_by_layer(self, order: int, node: fx.Node) -> None:
        """An ungrouped Linear/Conv2d reads its input's spaces: it becomes their consumer (a
        layer called several times blocks them instead: its weights serve other inputs)."""
        src = node.args[0]
        if self.calls[node.target] > 1:
            self.block_inputs(
                node,
                f"is read by {node.target}, which is called {self.calls[node.target]} times",
            )
            return
        for i, (space, _) in enumerate(self.segs[src]):
            if space is not None:
                space.find().consumers.append(
                    (order, node.target, self.segs[src], i, src in self.flat)
                )

    def new_space(self, order: int, node: fx.Node, mod: nn.Module) -> None:
        """A producer called once writes a new space of its own channels."""
        space = _Space(layer_width(mod), order)
        space.producers.append((order, Producer(node.target, None)))
        self.spaces.append(space)
        self.segs[node] = ((space, space.width),)
        self.layer_of[node] = space.producers[-1][1]

    def grouped_conv(
        self, order: int, node: fx.Node, mod: nn.Conv2d, src: fx.Node | None, label: str
    ) -> None:
        """A depthwise convolution on one space joins it as a channel-wise member (its
        per-channel filters merge with the channels); any other grouped convolution blocks
        what it reads."""
        depthwise = mod.groups == mod.in_channels == mod.out_channels
        if (
            depthwise
            and src in self.segs
            and len(self.segs[src]) == 1
            and self.segs[src][0][0] is not None
            and self.calls[node.target] == 1
        ):
            space = self.segs[src][0][0].find()
            space.channelwise.append((order, Producer(node.target, None)))
            self.layer_of[node] = space.channelwise[-1][1]
            self.segs[node] = self.segs[src]
        else:
            self.block_inputs(
                node,
                f"is read by {label}, a grouped convolution (groups={mod.groups})",
                refused=True,
            )

    def batchnorm(self, node: fx.Node, mod: nn.Module, src: fx.Node | None, label: str) -> None:
        """A BatchNorm directly after its producer (or depthwise convolution), its only
        reader, folds into that member; anywhere else it blocks what it reads."""
        users = [u for u in src.users if not _is_metadata(u)] if src is not None else []
        owner = self.layer_of.get(src)
        if (
            owner is not None
            and users == [node]
            and self.calls[node.target] == 1
            and mod.track_running_stats
            and mod.running_mean is not None
            and mod.num_features == self.segs[src][0][1]
        ):
            space = self.segs[src][0][0].find()
            for entries in (space.producers, space.channelwise):
                for j, (pos, p) in enumerate(entries):
                    if p is owner:
                        entries[j] = (pos, Producer(p.layer, node.target))
            self.segs[node] = self.segs[src]
        else:
            self.block_inputs(
                node,
                f"passes through {label} away from its producer (a "
                "BatchNorm is folded only directly after the producer)",
            )

    def pass_through(self, node: fx.Node, src: fx.Node | None) -> bool:
        """Whether ``node`` is a channel-wise op (an activation, a gate, a pool, dropout, a
        flatten); if so its output carries its input's spaces, and an activation or gate is
        recorded on them."""
        activation = _activation(node, self.modules) or _gate(node, self.modules)
        if not (
            activation is not None
            or _is_pass(node, self.modules)
            or _is_pre_relu(node, self.modules)
            or _label(node) == "stochastic_depth"
        ):  # (torchvision: identity in eval)
            return False
        if src not in self.segs:
            return True
        if activation is not None:
            for space, _ in self.segs[src]:
                if space is not None:
                    space.find().acts.add(activation)
        elif _is_flatten(node, self.modules):
            self.flat.add(node)
        if src in self.flat:
            self.flat.add(node)
        self.segs[node] = self.segs[src]
        return True

    def combine(self, node: fx.Node, is_mul: bool, label: str) -> None:
        """An addition (residual stream) or a product (gate) of two tensors with the same
        segment widths merges their spaces segment by segment; anything else it touches is
        blocked (channels of no layer, or a tensor of another layout)."""
        operands = list(node.args[:2])
        if not (
            len(operands) == 2
            and all(isinstance(a, fx.Node) and a in self.segs for a in operands)
            and [w for _, w in self.segs[operands[0]]] == [w for _, w in self.segs[operands[1]]]
        ):
            what = "multiplied by" if is_mul else "added to"
            self.block_inputs(node, f"is {what} a tensor that is not a layer's channels ({label})")
            return
        for (s1, _), (s2, _) in zip(self.segs[operands[0]], self.segs[operands[1]], strict=True):
            if s1 is None or s2 is None:
                for space in (s1, s2):
                    if space is not None:
                        space.block(f"is combined by {label} with channels of no layer")
                continue
            root = _union(s1, s2, label)
            root.ops.append(_label(node))
            root.gated |= is_mul
        self.segs[node] = self.segs[operands[0]]
        if any(o in self.flat for o in operands):
            self.flat.add(node)

    def concat(self, node: fx.Node, label: str) -> None:
        """A concatenation along the channels carries its parts' segments side by side (a
        consumer then reads each space as a range of its input); along any other dimension it
        blocks them."""
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        parts = node.args[0] if node.args else ()
        if not (dim in (1, -3) and isinstance(parts, (list, tuple))):
            self.block_inputs(
                node, f"is concatenated by {label} along dimension {dim}, not the channels"
            )
            return
        joined: list[tuple[_Space | None, int | None]] = []
        for part in parts:
            joined += (
                list(self.segs.get(part, ((None, None),)))
                if isinstance(part, fx.Node)
                else [(None, None)]
            )
        for space, _ in joined:
            if space is not None:
                space.find().ops.append(_label(node))
        self.segs[node] = tuple(joined)


def _is_product(node: fx.Node) -> bool:
    """An element-wise product (``x * y``, ``torch.mul``, ``x.mul(y)``): a gate when both
    operands carry channels of layers."""
    return (node.op == "call_function" and node.target in MUL_OPS) or (
        node.op == "call_method" and node.target in ("mul", "mul_")
    )


def _unsupported(
    node: fx.Node, mod: nn.Module | None, category: str | None, label: str
) -> tuple[str, bool]:
    """(reason, refused) for channels reaching an op a group cannot contain."""
    if isinstance(mod, nn.LayerNorm) or (
        node.op == "call_function" and node.target is F.layer_norm
    ):
        return (f"is normalised by {label}, which mixes channels; left alone", False)
    reason, refused = _UNSUPPORTED.get(
        category,
        ("is read by {label}, which is not supported on a channel group; left alone", False),
    )
    return (reason.format(label=label), refused)
