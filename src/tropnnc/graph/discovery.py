"""Block discovery: the channel groups first, then a block walk from every other producer."""

from __future__ import annotations

from torch import nn

from ._ops import PRODUCERS
from .blocks import _follow
from .groups import _groups
from .specs import BlockSpec, GroupSpec, Skip
from .tracing import trace

#: words of a block walk's Skip that mean the producer's channels are coupled to others: the
#: group analysis' reason replaces it
_COUPLING = ("residual or branching", "residual addition", "concatenation", "depthwise")


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
