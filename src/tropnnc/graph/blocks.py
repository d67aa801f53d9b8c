"""Plain blocks: walk from a producer through its BatchNorm, activation and pass-through
ops to the one consumer layer, giving a :class:`BlockSpec` or the :class:`Skip` saying why
not."""

from __future__ import annotations

from torch import fx, nn

from ._nodes import (
    _activation,
    _category,
    _is_flatten,
    _is_metadata,
    _is_pass,
    _is_pre_relu,
    _kind,
    _label,
)
from ._ops import BATCHNORMS, PRODUCERS
from .skips import _stop
from .specs import BlockSpec, Skip, layer_width


def _follow(
    node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]
) -> BlockSpec | Skip:
    """Walk from a producer node to its consumer, or say why the walk stops."""
    name = node.target
    producer = modules[name]
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
        unfoldable = _unfoldable(name, producer, users.target, modules, calls)
        if unfoldable is not None:
            return unfoldable
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
    return _to_consumer(node, users, modules, calls, bn, between, activation)


def _unfoldable(
    name: str,
    producer: nn.Module,
    target: str,
    modules: dict[str, nn.Module],
    calls: dict[str, int],
) -> Skip | None:
    """Why the BatchNorm ``target`` right after producer ``name`` cannot be folded into it
    (no running statistics, called more than once, another width), or None."""
    bn_mod = modules[target]
    units = layer_width(producer)
    if not bn_mod.track_running_stats or bn_mod.running_mean is None:
        return Skip(
            name,
            f"{target} ({type(bn_mod).__name__}) after {name} has no running statistics to fold",
            refused=True,
        )
    if calls[target] > 1:
        return Skip(
            name,
            f"{target} ({type(bn_mod).__name__}) after {name} is "
            f"called {calls[target]} times: it cannot be folded",
            refused=True,
        )
    if bn_mod.num_features != units:
        return Skip(
            name,
            f"{target} ({type(bn_mod).__name__}) normalises "
            f"{bn_mod.num_features} features, not the {units} units of "
            f"{name}",
            refused=True,
        )
    return None


def _to_consumer(
    node: fx.Node,
    act: fx.Node,
    modules: dict[str, nn.Module],
    calls: dict[str, int],
    bn: str | None,
    between: list[str],
    activation: str,
) -> BlockSpec | Skip:
    """The rest of the walk from producer ``node``: from its activation ``act`` through
    pass-through ops (ReLU, pools, dropout, flatten) to the consumer layer."""
    name = node.target
    between = list(between)
    cur = act
    flatten = False
    while True:
        nxt = _single_user(cur, name, modules)
        if isinstance(nxt, Skip):
            return nxt
        if nxt.op == "call_module" and isinstance(modules[nxt.target], PRODUCERS):
            return _consumer(
                name,
                modules[name],
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
