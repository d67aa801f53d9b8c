"""Attention heads, narrowed by truncated SVD of their two circuits (pure tensor functions).

Attention has no ReLU between its layers, so there is no zonotope to approximate: each head
h is two bilinear maps of its input tokens, and the best rank-r approximation of a matrix is
its truncated SVD (Eckart-Young, in the spectral and the Frobenius norm). With the input
written as x = D n + beta (D = diag(gamma), beta: the affine of the LayerNorm the head
reads, n its normalised output, ||n|| <= rho; without a norm D = I, beta = 0):

* QK circuit: the logit of query i on key j is scale * (Wq x_i + bq) . (Wk x_j + bk). Terms
  constant in j cancel in the softmax, so it is scale * [n_i; 1]^T G n_j with
  G = [Q^T; q0^T] K ((E + 1, E)), Q = Wq D, K = Wk D, q0 = Wq beta + bq. Its truncated SVD
  U_r S_r V_r^T gives new query rows [Q'^T; q0'^T] = U_r S_r^(1/2), key rows K' = S_r^(1/2) V_r^T.
* OV circuit: attention weights sum to one, so the head adds Wo (Wv x_bar + bv) with x_bar the
  weighted mean of the inputs: M = Wo Wv D n_bar ((E_out, E)) plus a constant, which moves
  into the output bias exactly. Truncated: Wo' = U_r S_r^(1/2), value rows S_r^(1/2) V_r^T.

The two circuits get their own ranks r_qk and r_v (:func:`split_width`). Certificate (every
token, every input with ||n_j|| <= rho): the logits move by at most
eps = scale sigma_{r_qk+1}(G) sqrt(rho^2 + 1) rho, so the attention weights by at most
min(2, exp(2 eps) - 1) in l1, and the output moves by at most
sum_h rho (sigma_{r_v+1}(M_h) + sigma_1(M_h) min(2, exp(2 eps_h) - 1)) in l2. A LayerNorm or
RMSNorm gives rho = sqrt(E) for any input. docs/method.md, "Attention heads".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Heads:
    """The weights of one multi-head attention, per head (torch Linear convention: rows are
    outputs). H heads of query/key width dq and value width dv; inputs of E features."""

    wq: Tensor  # (H, dq, E)
    bq: Tensor  # (H, dq)
    wk: Tensor  # (H, dq, E)
    bk: Tensor  # (H, dq)
    wv: Tensor  # (H, dv, E)
    bv: Tensor  # (H, dv)
    wo: Tensor  # (E_out, H, dv)
    bo: Tensor  # (E_out,)
    scale: float  # the logits' factor (1 / sqrt(dq) in most models)

    @property
    def heads(self) -> int:
        return self.wq.shape[0]


@dataclass(frozen=True)
class Narrowed:
    """Heads narrowed to ``qk_rank`` query/key and ``v_rank`` value dims, with the singular
    values of the original circuits (what the certificate reads)."""

    heads: Heads
    qk_rank: int
    v_rank: int
    qk_values: Tensor  # (H, min(E + 1, E, dq)) singular values of each head's G
    ov_values: Tensor  # (H, min(E_out, E, dv)) singular values of each head's M


def narrow(
    heads: Heads,
    qk_rank: int,
    v_rank: int,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
) -> Narrowed:
    """The heads of ``heads`` with query/key width ``qk_rank`` and value width ``v_rank``,
    by truncated SVD of both circuits, reading inputs x = diag(gamma) n + beta (``gamma``,
    ``beta``: the input norm's affine, (E,); None: x = n). Computed in float64 on the CPU;
    the result has the input's dtype."""
    dtype = heads.wq.dtype
    f64 = {"device": "cpu", "dtype": torch.float64}
    h = {
        name: getattr(heads, name).to(**f64) for name in ("wq", "bq", "wk", "bk", "wv", "bv", "wo")
    }
    e = h["wq"].shape[-1]
    g = torch.ones(e, **f64) if gamma is None else gamma.to(**f64)
    b = torch.zeros(e, **f64) if beta is None else beta.to(**f64)
    g_inv = torch.where(g != 0, 1 / torch.where(g != 0, g, 1), 0)  # D^+: a 0 gain reads nothing

    # QK: G = [Q^T; q0^T] K, (H, E + 1, E)
    q = h["wq"] * g  # (H, dq, E)
    q0 = h["wq"] @ b + h["bq"]  # (H, dq)
    k = h["wk"] * g
    left = torch.cat([q, q0.unsqueeze(-1)], dim=-1).transpose(1, 2)  # (H, E + 1, dq)
    u, s_qk, vh = torch.linalg.svd(left @ k, full_matrices=False)
    root = s_qk[:, :qk_rank].sqrt()
    new_left = u[:, :, :qk_rank] * root.unsqueeze(1)  # (H, E + 1, r)
    wq = new_left[:, :e].transpose(1, 2) * g_inv  # (H, r, E)
    bq = new_left[:, e] - wq @ b  # (H, r)
    wk = root.unsqueeze(-1) * vh[:, :qk_rank] * g_inv  # (H, r, E)
    bk = -(wk @ b)

    # OV: M_h = Wo_h Wv_h D, (H, E_out, E); constants into the output bias
    wo_h = h["wo"].permute(1, 0, 2)  # (H, E_out, dv)
    u, s_ov, vh = torch.linalg.svd(wo_h @ (h["wv"] * g), full_matrices=False)
    root = s_ov[:, :v_rank].sqrt()
    wo = (u[:, :, :v_rank] * root.unsqueeze(1)).permute(1, 0, 2)  # (E_out, H, r_v)
    wv = root.unsqueeze(-1) * vh[:, :v_rank] * g_inv  # (H, r_v, E)
    bv = -(wv @ b)
    constant = (wo_h @ (h["wv"] @ b + h["bv"]).unsqueeze(-1)).squeeze(-1).sum(0)  # (E_out,)
    bo = heads.bo.to(**f64) + constant

    new = Heads(
        *(t.to(dtype) for t in (wq, bq, wk, bk, wv, bv, wo, bo)),
        scale=heads.scale,
    )
    return Narrowed(new, qk_rank, v_rank, s_qk, s_ov)


def split_width(width: int, head_dim: int) -> tuple[int, int]:
    """Query/key and value widths per head for an average width ``width`` (so the four
    projections keep their MACs at ``width / head_dim``): a quarter of the 2 * width to
    query/key, the rest to values, values capped at ``head_dim``. The value circuit
    carries the output, the query-key one only steers the softmax: on vit-mini (2 datasets,
    3 seeds, heads alone; results/architectures/README.md) this split beat the even one by
    0.0-1.1 points at keep 0.9 and 0.75 and by 8.6-9.6 at keep 0.5."""
    total = 2 * width
    v = min(head_dim, total - max(1, round(total / 4)))
    return total - v, v


def certificate(narrowed: Narrowed, rho: float) -> float:
    """A bound on the l2 change of any output token for inputs whose normalised part has
    norm at most ``rho`` (module docstring); inf for an infinite ``rho``."""
    scale = narrowed.heads.scale
    tail_qk = _tail(narrowed.qk_values, narrowed.qk_rank)  # (H,)
    tail_ov = _tail(narrowed.ov_values, narrowed.v_rank)
    if not math.isfinite(rho):  # nan: unknown; inf: unbounded inputs
        exact = not (tail_qk.any() or tail_ov.any())
        return 0.0 if exact else rho if math.isnan(rho) else math.inf
    eps = abs(scale) * tail_qk * math.sqrt(rho**2 + 1) * rho
    moved = torch.clamp(torch.expm1(2 * eps), max=2.0)  # l1 change of the attention weights
    top = narrowed.ov_values[:, 0]
    return float((rho * (tail_ov + top * moved)).sum())


def _tail(values: Tensor, rank: int) -> Tensor:
    """sigma_{rank+1} per head (0 when the circuit has rank <= ``rank``)."""
    if values.shape[1] <= rank:
        return torch.zeros(values.shape[0], dtype=values.dtype)
    return values[:, rank]
