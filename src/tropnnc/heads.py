"""Attention surgery: read an attention module's heads out of a model (:func:`extract_heads`)
and write narrowed heads back as a :mod:`tropnnc.modules` layer (:func:`apply_heads`); the
norm its input comes from (:func:`input_norm`), for the narrowing and its certificate."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .attention import Heads
from .graph.attention import AttentionSpec
from .modules import CompactAttention, CompactMultiheadAttention
from .surgery import get_module, set_module


def extract_heads(model: nn.Module, spec: AttentionSpec) -> Heads:
    """The per-head weights of the attention module at ``spec.path``."""
    mod = get_module(model, spec.path)
    h, d = spec.heads, spec.head_dim
    if spec.style == "timm":
        w, b = mod.qkv.weight, mod.qkv.bias
        proj, scale = mod.proj, mod.scale
    else:
        w, b = mod.in_proj_weight, mod.in_proj_bias
        proj, scale = mod.out_proj, 1 / math.sqrt(d)
    e = w.shape[1]
    w = w.detach().reshape(3, h, d, e)  # output feature s * H * d + head * d + i
    like = {"dtype": w.dtype, "device": w.device}
    b = torch.zeros(3, h, d, **like) if b is None else b.detach().reshape(3, h, d)
    bo = proj.bias.detach() if proj.bias is not None else torch.zeros(proj.out_features, **like)
    return Heads(
        w[0], b[0], w[1], b[1], w[2], b[2],
        proj.weight.detach().reshape(proj.out_features, h, d),
        bo.to(**like),
        float(scale),
    )  # fmt: skip


def input_norm(model: nn.Module, spec: AttentionSpec) -> tuple[Tensor | None, Tensor | None]:
    """The affine (gamma, beta) of the norm ``spec``'s input comes from; (None, None) for
    no norm or one without an affine."""
    if spec.norm is None:
        return None, None
    norm = get_module(model, spec.norm)
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    return (
        None if weight is None else weight.detach(),
        None if bias is None else bias.detach(),
    )


def apply_heads(model: nn.Module, spec: AttentionSpec, heads: Heads) -> None:
    """Replace the attention module at ``spec.path`` by a compact one holding ``heads``,
    in the original's dtype, device, mode and dropout."""
    old = get_module(model, spec.path)
    h, r, e = heads.wq.shape
    e_out = heads.wo.shape[0]
    if spec.style == "timm":
        drop = {"attn_drop": old.attn_drop.p, "proj_drop": old.proj_drop.p}
        new = CompactAttention(e, h, r, heads.wv.shape[1], heads.scale, e_out, **drop)
        frozen = not old.qkv.weight.requires_grad
    else:
        drop = {"attn_drop": old.dropout, "proj_drop": 0.0}
        new = CompactMultiheadAttention(
            e, h, r, heads.wv.shape[1], heads.scale, e_out, batch_first=old.batch_first, **drop
        )
        frozen = not old.in_proj_weight.requires_grad
    like = next(old.parameters())
    new = new.to(dtype=like.dtype, device=like.device)
    with torch.no_grad():
        for layer, w, b in (
            (new.q, heads.wq, heads.bq),
            (new.k, heads.wk, heads.bk),
            (new.v, heads.wv, heads.bv),
        ):
            layer.weight.copy_(w.reshape(-1, e))
            layer.bias.copy_(b.reshape(-1))
        new.proj.weight.copy_(heads.wo.reshape(e_out, -1))
        new.proj.bias.copy_(heads.bo)
    new.requires_grad_(not frozen)
    new.train(old.training)
    set_module(model, spec.path, new)
