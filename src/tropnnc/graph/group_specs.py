"""Turn the analysed channel spaces into specs: a :class:`GroupSpec` for every group whose
readers all read its channels as they are, a linear-bottleneck :class:`BlockSpec`, or the
:class:`Skip` of every producer of a blocked group."""

from __future__ import annotations

from torch import nn

from .spaces import _Space
from .specs import BlockSpec, Consumer, GroupSpec, Producer, Skip


def _finish(
    spaces: list[_Space], modules: dict[str, nn.Module]
) -> tuple[list[tuple[int, GroupSpec | BlockSpec]], dict[str, Skip], set[str]]:
    """Turn the analysed spaces into GroupSpecs (or Skips of their producers)."""
    roots = list(dict.fromkeys(s.find() for s in spaces))
    for root in roots:
        _check_readers(root, modules)
    names = {root: root.producers[0][1].layer for root in roots if root.blocked is None}
    groups: list[tuple[int, GroupSpec | BlockSpec]] = []
    skips: dict[str, Skip] = {}
    members: set[str] = set()
    for root in roots:
        producers = [p for _, p in sorted(root.producers, key=lambda e: e[0])]
        if root.blocked is not None:
            skips.update(_blocked_skips(producers, *root.blocked))
            continue
        channelwise = tuple(p for _, p in sorted(root.channelwise, key=lambda e: e[0]))
        spec = _spec(root, producers, _consumers(root, names), channelwise)
        if spec is None:
            continue  # a plain chain with an activation: the block walk decides
        if isinstance(spec, GroupSpec):
            members.update(p.layer for p in channelwise)
        groups.append((root.order, spec))
    return groups, skips, members


def _spec(
    root: _Space,
    producers: list[Producer],
    consumers: list[Consumer],
    channelwise: tuple[Producer, ...],
) -> GroupSpec | BlockSpec | None:
    """The spec of an unblocked group: a linear bottleneck (one producer [-> BN] -> one
    consumer, no activation) is a BlockSpec; the same chain with an activation is None (the
    block walk decides); anything else is a GroupSpec."""
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
        return BlockSpec(producers[0].layer, c.layer, producers[0].bn, (), c.flatten, "identity")
    if simple:
        return None
    return GroupSpec(
        tuple(producers),
        tuple(consumers),
        channelwise,
        _group_activation(root, len(producers), bool(channelwise)),
        tuple(dict.fromkeys(root.ops)),
    )


def _check_readers(root: _Space, modules: dict[str, nn.Module]) -> None:
    """Block a group whose readers cannot be merged with it: none at all, one layer reading
    it twice or also writing into it, or a layer reading it in another layout."""
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
        if _misread(mod, seg, flatten, kinds):
            root.block(
                f"is read by {layer} ({type(mod).__name__}) in a layout other than its channels"
            )


def _misread(
    mod: nn.Module,
    seg: tuple[tuple[_Space | None, int | None], ...],
    flatten: bool,
    kinds: set[type],
) -> bool:
    """Whether consumer ``mod``, reading segments ``seg`` (through a flatten or not), reads
    them in a layout other than the channels of producers of types ``kinds``: a Conv2d
    after a Linear, or an input width that is not the segments' total."""
    widths = [w for _, w in seg]
    total = None if None in widths else sum(widths)
    if isinstance(mod, nn.Conv2d):
        return nn.Linear in kinds or (total is not None and mod.in_channels != total)
    if flatten:
        return total is None or mod.in_features % total != 0
    return nn.Conv2d in kinds or (total is not None and mod.in_features != total)


def _blocked_skips(producers: list[Producer], reason: str, refused: bool) -> dict[str, Skip]:
    """The Skip of every producer of a blocked group, naming (up to three of) the others."""
    others = [p.layer for p in producers]
    skips = {}
    for p in producers:
        rest = [o for o in others if o != p.layer]
        head = (
            f"{p.layer} writes into a channel group with {', '.join(rest[:3])}"
            f"{', ...' if len(rest) > 3 else ''} that"
            if rest
            else f"the channel group of {p.layer}"
        )
        skips[p.layer] = Skip(p.layer, f"{head} {reason}", refused)
    return skips


def _consumers(root: _Space, names: dict[_Space, str]) -> list[Consumer]:
    """The group's readers in forward order, each segment of their input named by its group
    (its width dropped: the group gives it) or left as (None, width) for channels of no
    mergeable group."""
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
    return consumers


def _group_activation(root: _Space, producers: int, channelwise: bool) -> str:
    """The group's activation name: "relu" or "identity" when the group is positively
    homogeneous (sums keep the certificate), the one activation of a single producer (or a
    leaky ReLU), otherwise its parts joined by "+"."""
    acts = set(root.acts)
    plain = not channelwise and not root.gated
    if plain and acts <= {"relu"}:  # positively homogeneous: sums keep the certificate
        return "relu" if acts else "identity"
    if plain and len(acts) == 1 and (producers == 1 or next(iter(acts)).startswith("leaky_relu:")):
        return next(iter(acts))  # (ReLU6's clipping term holds for one producer)
    # named by its parts; "sum": a non-homogeneous activation in a sum
    return (
        "+".join(
            sorted(acts)
            + ["depthwise"] * channelwise
            + ["gated"] * root.gated
            + ["sum"] * (producers > 1)
        )
        or "identity"
    )
