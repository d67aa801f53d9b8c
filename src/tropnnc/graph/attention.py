"""Attention modules whose heads can be narrowed (:func:`find_attention`): timm's
``Attention`` and ``torch.nn.MultiheadAttention`` used as self-attention, with the
LayerNorm or RMSNorm their input comes from (it bounds that input, so the narrowed heads get
a certificate; :mod:`tropnnc.attention`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from ._ops import COMPACT_MODULES
from .norms import norm_module
from .specs import Skip
from .tracing import TraceError, trace


@dataclass(frozen=True)
class AttentionSpec:
    """Where one attention module lives and what it reads."""

    path: str
    style: str  # "timm" (Attention) or "mha" (nn.MultiheadAttention)
    heads: int
    head_dim: int  # query/key and value width per head
    norm: str | None  # the LayerNorm/RMSNorm every input token comes from (None: unknown)


def find_attention(model: nn.Module) -> tuple[list[AttentionSpec], list[Skip]]:
    """The attention modules of ``model`` that can be narrowed, and those left alone (and
    why), in module order."""
    specs, skipped = [], []
    norms = _input_norms(model)
    for path, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            why = _mha_problem(mod)
            style, heads, dim = "mha", mod.num_heads, mod.head_dim
        elif _is_timm_attention(mod):
            why = _timm_problem(mod)
            style, heads, dim = "timm", mod.num_heads, mod.head_dim
        elif isinstance(mod, COMPACT_MODULES):
            skipped.append(
                Skip(
                    path,
                    f"attention left alone: its heads were narrowed already "
                    f"({type(mod).__name__}); to narrow them further, compress the "
                    "original model with a smaller keep",
                )
            )
            continue
        else:
            continue
        if why is None and norms.get(path) == "cross":
            why = "query, key and value are different tensors (cross-attention)"
        if why is not None:
            skipped.append(Skip(path, f"attention left alone: {why}"))
            continue
        norm = norms.get(path)
        specs.append(AttentionSpec(path, style, heads, dim, norm))
    return specs, skipped


def _is_timm_attention(mod: nn.Module) -> bool:
    """timm's ``Attention`` (recognised by class name and its qkv/proj layout)."""
    return (
        type(mod).__name__ == "Attention"
        and isinstance(getattr(mod, "qkv", None), nn.Linear)
        and isinstance(getattr(mod, "proj", None), nn.Linear)
        and isinstance(getattr(mod, "num_heads", None), int)
        and isinstance(getattr(mod, "head_dim", None), int)
        and isinstance(getattr(mod, "scale", None), float)
    )


def _timm_problem(mod: nn.Module) -> str | None:
    """Why a timm Attention cannot be narrowed (None: it can)."""
    width = mod.num_heads * mod.head_dim
    if mod.qkv.out_features != 3 * width or mod.proj.in_features != width:
        return f"qkv/proj widths do not match {mod.num_heads} heads of {mod.head_dim}"
    for name in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(mod, name, nn.Identity()), nn.Identity):
            return f"it normalises inside the heads ({name})"
    if getattr(mod, "gate", None) is not None:
        return "it gates the heads' output"
    return None


def _mha_problem(mod: nn.MultiheadAttention) -> str | None:
    """Why a MultiheadAttention cannot be narrowed (None: it can)."""
    if not mod._qkv_same_embed_dim:
        return "key/value widths differ from embed_dim"
    if mod.bias_k is not None or mod.add_zero_attn:
        return "it adds key/value biases or zero attention"
    return None


def _input_norms(model: nn.Module) -> dict[str, str]:
    """For each attention module (by path) the LayerNorm/RMSNorm its query, key and value
    all come from, or "cross" when they are different tensors. Empty when ``model`` cannot
    be traced."""
    try:
        gm = trace(model)
    except TraceError:
        return {}
    originals = dict(model.named_modules())  # the graph keeps traced-through modules as stubs
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        if isinstance(originals.get(node.target), nn.MultiheadAttention):
            path = node.target
            inputs = _mha_inputs(node)
        elif node.target.endswith(".qkv") and _is_timm_attention(
            originals.get(node.target.rsplit(".", 1)[0])
        ):
            path = node.target.rsplit(".", 1)[0]
            inputs = [node.args[0]]
        else:
            continue
        if any(i is not inputs[0] for i in inputs):
            found[path] = "cross"
            continue
        norm = norm_module(inputs[0], originals)
        if norm is not None:
            found[path] = norm
    return found


def _mha_inputs(node: fx.Node) -> list[object]:
    """The query, key and value arguments of a MultiheadAttention call."""
    names = ("query", "key", "value")
    return [node.args[i] if i < len(node.args) else node.kwargs.get(n) for i, n in enumerate(names)]
