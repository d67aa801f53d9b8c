"""Why a block walk stops: the :class:`Skip` of a producer whose path reaches an op a
block cannot contain (a residual addition, a concatenation, attention, a reshape, an
unsupported activation, the model output)."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ._nodes import _category, _flatten_args, _kind, _label
from ._ops import PRODUCERS
from .specs import Skip


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
    category = _category(node, mod)
    source = f"{name} (through {via})" if via else name
    if category in ("residual", "concat"):
        return _coupled(name, node, category, source, origin)
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
        return _reshaped(name, node, modules, described)
    if category == "batchnorm":
        return _batchnorm_on_path(name, described, source, what)
    if what == "activation":
        return _before_activation(name, mod, described, source)
    return Skip(
        name,
        f"{described} after {name} is not supported on a block's path (allowed: "
        "ReLU, max/avg/adaptive pools, dropout, flatten)",
        refused=True,
    )


def _coupled(
    name: str,
    node: fx.Node,
    category: str,
    source: str,
    origin: tuple[fx.Node, fx.Node] | None,
) -> Skip:
    """A walk reaching a residual addition or a concatenation: the producer's units are
    coupled to other channels and keep their width (left alone, not refused)."""
    label = _label(node)
    if category == "concat":
        return Skip(
            name,
            f"{source} feeds a concatenation ({label}): its units are read "
            "by other branches too, so it keeps its width",
        )
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


def _reshaped(name: str, node: fx.Node, modules: dict[str, nn.Module], described: str) -> Skip:
    """A walk reaching a reshape: left alone when it leads to attention or turns channels
    into token features (a patch embedding); refused otherwise (it mixes channels)."""
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


def _batchnorm_on_path(name: str, described: str, source: str, what: str) -> Skip:
    """A walk reaching a BatchNorm that cannot fold: a second one directly after the
    producer's, or one after the activation (not positively homogeneous)."""
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


def _before_activation(name: str, mod: nn.Module | None, described: str, source: str) -> Skip:
    """A walk stopping before any activation: a layer right after the producer (a linear
    bottleneck), or an op that does not commute with the ReLU."""
    if isinstance(mod, PRODUCERS):
        return Skip(
            name,
            f"{source} feeds {described} with no activation in between (a "
            "linear bottleneck): there is no ReLU to compress across",
            refused=True,
        )
    # before any ReLU only ops that commute with it may sit
    return Skip(
        name,
        f"{described} directly after {source} comes before the ReLU, where "
        "only max pools and dropout are allowed (they commute with it; avg "
        "pools and flatten only after the ReLU)",
        refused=True,
    )
