"""Tracing with torch.fx (:func:`trace`, :class:`TraceError`), and which layers read an input
as it is: :func:`input_readers` (the network's input) and :func:`reads_directly` (a block's
activations, for chained input models)."""

from __future__ import annotations

from torch import fx, nn

from ._nodes import _is_flatten
from ._ops import COMPACT_MODULES, IDENTITIES, PRODUCERS
from .specs import BlockSpec, GroupSpec


class TraceError(TypeError):
    """The model cannot be traced by torch.fx."""


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with the layers compress writes (:mod:`tropnnc.modules`) kept as
    leaves like torch.nn's own: a compressed model traces again."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, COMPACT_MODULES) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; TraceError naming the model on failure."""
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
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
            if isinstance(module, PRODUCERS):
                readers.add(str(user.target))
            elif isinstance(module, IDENTITIES) or _is_flatten(user, modules):
                frontier.append(user)
    return readers


def reads_directly(model: nn.Module, spec: BlockSpec | GroupSpec) -> bool:
    """Whether the block's consumer is a Linear that reads the block's activations as they
    are (no flatten, pooling or other op between; dropout and identities only), so that
    their modelled moments are its input model when it is compressed next."""
    if not isinstance(spec, BlockSpec) or spec.flatten:
        return False
    modules = dict(model.named_modules())  # a functional op on the path is no module
    return isinstance(modules.get(spec.consumer), nn.Linear) and all(
        isinstance(modules.get(name), IDENTITIES) for name in spec.between
    )
