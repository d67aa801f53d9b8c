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
