"""Token norms (LayerNorm, RMSNorm over the last dimension) in a traced graph. Their output
is bounded whatever their input, ||gamma * n + beta|| <= max|gamma| sqrt(E) + ||beta|| with
||n|| <= sqrt(E), which certifies what reads them: attention heads and the Linear layers of
transformer MLPs (:func:`norm_readers`)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import fx, nn

from .tracing import TraceError, trace

#: functional norms a norm module's subclass may be traced into (timm's LayerNorm)
_NORM_FUNCTIONS = {F.layer_norm, *([F.rms_norm] if hasattr(F, "rms_norm") else [])}


def is_token_norm(mod: nn.Module | None) -> bool:
    """A LayerNorm or RMSNorm over the last dimension only: its output, before the affine,
    has norm at most sqrt(features) whatever its input."""
    rms = getattr(nn, "RMSNorm", None)
    kinds = (nn.LayerNorm,) if rms is None else (nn.LayerNorm, rms)
    return isinstance(mod, kinds) and len(mod.normalized_shape) == 1


def norm_module(source: object, modules: dict[str, nn.Module]) -> str | None:
    """The path of the token norm whose output ``source`` (an fx node) is: a call of the
    module, or of F.layer_norm / F.rms_norm on its weight (a subclass traced through).
    ``modules``: the ORIGINAL model's modules (a graph keeps traced-through ones as stubs)."""
    if not isinstance(source, fx.Node):
        return None
    if source.op == "call_module":
        return source.target if is_token_norm(modules.get(source.target)) else None
    if source.op != "call_function" or source.target not in _NORM_FUNCTIONS:
        return None
    weight = source.args[2] if len(source.args) > 2 else source.kwargs.get("weight")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    path = weight.target.rpartition(".")[0]
    return path if is_token_norm(modules.get(path)) else None


def norm_readers(model: nn.Module) -> dict[str, str]:
    """Linear layers (by path) that read a token norm's output as it is, and that norm
    (the norm's width must be the layer's input). Empty when ``model`` cannot be traced."""
    try:
        gm = trace(model)
    except TraceError:
        return {}
    originals = dict(model.named_modules())
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        layer = originals.get(node.target)
        norm = norm_module(node.args[0], originals)
        if (
            isinstance(layer, nn.Linear)
            and norm is not None
            and originals[norm].normalized_shape[0] == layer.in_features
        ):
            found[node.target] = norm
    return found


def norm_radius(norm: nn.Module) -> float:
    """The bound on the l2 norm of any output token of ``norm`` (a token norm)."""
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    gain = 1.0 if weight is None else float(weight.detach().abs().max())
    shift = 0.0 if bias is None else float(bias.detach().double().norm())
    return gain * math.sqrt(norm.normalized_shape[0]) + shift
