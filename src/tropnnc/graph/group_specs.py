"""Turn the analysed channel spaces into specs: a :class:`GroupSpec` for every group whose
readers all read its channels as they are, a linear-bottleneck :class:`BlockSpec`, or the
:class:`Skip` of every producer of a blocked group."""

from __future__ import annotations

from torch import nn

from .spaces import _Space
from .specs import BlockSpec, Consumer, GroupSpec, Skip


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
