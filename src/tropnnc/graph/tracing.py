"""Tracing with torch.fx (:func:`trace`, :class:`TraceError`), and :func:`input_readers`,
the layers that read the network's input as it is."""

from __future__ import annotations

from torch import fx, nn

from ._nodes import _is_flatten


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
