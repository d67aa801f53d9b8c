"""Layers compress writes that torch and timm do not have: multi-head attention whose heads
are narrower than ``embed_dim / num_heads`` and keep the original logit scale.

:class:`CompactAttention` replaces a timm ``Attention`` (``forward(x, attn_mask,
is_causal)``), :class:`CompactMultiheadAttention` a ``torch.nn.MultiheadAttention``
(``forward(query, key, value, ...)`` returning ``(output, weights)``). Both hold plain
``q``, ``k``, ``v`` and ``proj`` Linear layers, so parameter and MAC counts, saving and
loading treat them like any other Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Heads(nn.Module):
    """Projections and scaled dot-product attention over ``heads`` heads of query/key width
    ``qk_dim`` and value width ``v_dim``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        qk_dim: int,
        v_dim: int,
        scale: float,
        dim_out: int | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim, self.heads, self.qk_dim, self.v_dim = dim, heads, qk_dim, v_dim
        self.scale = float(scale)
        self.dim_out = dim if dim_out is None else dim_out
        self.attn_drop, self.proj_drop = float(attn_drop), float(proj_drop)
        self.q = nn.Linear(dim, heads * qk_dim)
        self.k = nn.Linear(dim, heads * qk_dim)
        self.v = nn.Linear(dim, heads * v_dim)
        self.proj = nn.Linear(heads * v_dim, self.dim_out)

    def config(self) -> dict[str, object]:
        """The constructor's arguments (what a saved model records)."""
        return {
            "dim": self.dim,
            "heads": self.heads,
            "qk_dim": self.qk_dim,
            "v_dim": self.v_dim,
            "scale": self.scale,
            "dim_out": self.dim_out,
            "attn_drop": self.attn_drop,
            "proj_drop": self.proj_drop,
        }

    def _split(self, t: Tensor, width: int) -> Tensor:
        return t.unflatten(-1, (self.heads, width)).transpose(1, 2)  # (B, H, N, width)

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor | None,
        is_causal: bool,
        weights: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Batch-first (B, N, dim) inputs -> (B, N, dim_out), and the (B, H, N, S) attention
        weights when ``weights``. ``mask``: additive float or SDPA boolean (True: attend)."""
        q = self._split(self.q(query), self.qk_dim)
        k = self._split(self.k(key), self.qk_dim)
        v = self._split(self.v(value), self.v_dim)
        drop = self.attn_drop if self.training else 0.0
        probs = None
        if weights:
            logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, N, S)
            if is_causal:
                n, s = logits.shape[-2:]
                causal = torch.ones(n, s, dtype=torch.bool, device=logits.device).tril()
                logits = logits.masked_fill(~causal, float("-inf"))
            if mask is not None:
                logits = (
                    logits.masked_fill(~mask, float("-inf"))
                    if mask.dtype == torch.bool
                    else logits + mask
                )
            probs = logits.softmax(-1)
            out = F.dropout(probs, drop, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=drop, is_causal=is_causal, scale=self.scale
            )
        out = self.proj(out.transpose(1, 2).flatten(2))  # (B, N, dim_out)
        return F.dropout(out, self.proj_drop, self.training), probs


class CompactAttention(_Heads):
    """Self-attention in place of a timm ``Attention``: ``forward(x)`` on (B, N, dim)."""

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        return self.attend(x, x, x, attn_mask, is_causal, weights=False)[0]


class CompactMultiheadAttention(_Heads):
    """Attention in place of a ``torch.nn.MultiheadAttention`` (same call and return
    conventions: masks with True = ignore, ``batch_first``, averaged weights)."""

    def __init__(self, *args: object, batch_first: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.batch_first = bool(batch_first)

    def config(self) -> dict[str, object]:
        return {**super().config(), "batch_first": self.batch_first}

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (
                t.unsqueeze(1 if not self.batch_first else 0) for t in (query, key, value)
            )
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        mask = _additive(query, key, key_padding_mask, attn_mask, self.heads)
        causal = is_causal and attn_mask is None and key_padding_mask is None
        out, probs = self.attend(query, key, value, mask, causal, weights=need_weights)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if probs is not None and average_attn_weights:
            probs = probs.mean(1)
        if unbatched:
            out = out.squeeze(1 if not self.batch_first else 0)
            probs = None if probs is None else probs.squeeze(0)
        return out, probs


def _additive(
    query: Tensor,
    key: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    heads: int,
) -> Tensor | None:
    """MultiheadAttention's masks (bool: True = ignore; float: added) as one additive
    float mask broadcasting to (B, H, N, S), or None."""
    if key_padding_mask is None and attn_mask is None:
        return None
    b, n, s = query.shape[0], query.shape[1], key.shape[1]
    mask = torch.zeros(b, heads, n, s, dtype=query.dtype, device=query.device)
    for m, shape in ((attn_mask, None), (key_padding_mask, (b, 1, 1, s))):
        if m is None:
            continue
        if shape is None:  # (N, S) or (B * H, N, S)
            shape = (n, s) if m.dim() == 2 else (b, heads, n, s)
        m = m.reshape(shape)
        mask = mask.masked_fill(m, float("-inf")) if m.dtype == torch.bool else mask + m
    return mask
