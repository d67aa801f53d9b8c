"""Eigenvector refinement of a spherical clustering (rank-1 K-subspaces).

The Lloyd centroid of a cluster, normalize(sum m_i d_i), is not the direction that fits its
members best in the residual sum_i m_i sin(theta_i); the top eigenvector of the cluster's
weighted scatter sum_i m_i^2 d_i d_i^T fits them better. :func:`_refine` alternates those
eigenvectors with argmax-cosine reassignment and keeps each restart's best state, so it never
returns a worse objective. Eigenvectors of clusters of up to ``_EIGH_MAX_SIZE`` members are
exact batched ``eigh`` of their padded Gram blocks; larger clusters use power iteration on a
sparse block-diagonal Gram.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ._checks import _eps
from ._restarts import _cluster_counts, _cluster_sum, _flat_labels, _gather, _restart_chunks
from .degenerate import _one_member, _one_member_per_restart, _repair_empty
from .lloyd import _spherical_step
from .residual import _spherical_residual

_POWER_MAX_ITER = 100  # power iterations per refinement step (clusters above _EIGH_MAX_SIZE)
_EIGH_MAX_SIZE = 64  # clusters up to this size get an exact batched eigh


def _block_operator(gram: Tensor, a: Tensor, k: int, include: Tensor) -> Tensor:
    """Sparse CSR (R*n, R*n) block-diagonal G * [a_i == a_l] over the included clusters.

    ``include`` (R, K) bool selects the clusters whose blocks are stored (rows of the other
    units are empty). Row i holds the members of i's cluster in ascending order, so the rows
    come out sorted without a sort. Stores sum |C_k|^2 entries: a matvec costs that much.
    """
    r, n = a.shape
    flat = _flat_labels(a, k).reshape(-1)  # (R*n,)
    order = torch.argsort(flat, stable=True)  # global units sorted by cluster, then index
    sizes = torch.bincount(flat, minlength=r * k)  # (R*K,)
    starts = sizes.cumsum(0) - sizes
    s = torch.where(include.reshape(-1)[flat], sizes[flat], 0)  # (R*n,) entries of row i
    crow = torch.cat([s.new_zeros(1), s.cumsum(0)])  # (R*n + 1,)
    p = int(crow[-1])
    pos = torch.arange(p, device=a.device) - crow[:-1].repeat_interleave(s, output_size=p)
    cols = order[starts[flat].repeat_interleave(s, output_size=p) + pos]  # (P,)
    del pos
    local = torch.arange(n, device=a.device).repeat(r).repeat_interleave(s, output_size=p)
    vals = gram[local, cols % n]  # (P,)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, vals, (r * n, r * n), check_invariants=False)


def _eigh_blocks(gram: Tensor, m: Tensor, members: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Top eigenvectors of padded clusters with torch.linalg.eigh, in Gram coefficients.

    ``members`` (B, S) local unit indices of B clusters padded to S (``valid`` marks real
    entries). With A = diag(m) G_C diag(m) and A v = lam v (top), u = sum_i m_i v_i d_i /
    sqrt(lam) is the top unit eigenvector of sum_i m_i^2 d_i d_i^T. A cluster with lam ~ 0
    (all weights 0) falls back to its last member's direction. Returns (alpha, cos), (B, S):
    coefficients (||u|| = 1) and each member's cosine to u; sign not fixed yet.
    """
    eps = _eps(gram.dtype)
    pair = valid[:, :, None] & valid[:, None, :]  # (B, S, S)
    gb = gram[members[:, :, None], members[:, None, :]] * pair  # (B, S, S) Gram blocks
    mm = torch.where(valid, m[members], 0.0)  # (B, S)
    vec = torch.linalg.eigh(gb * mm[:, :, None] * mm[:, None, :]).eigenvectors[..., -1]
    coef = mm * vec  # (B, S) u ~ sum coef_i d_i
    n2 = (coef * (gb @ coef[..., None]).squeeze(-1)).sum(dim=1)  # (B,) ||u||^2 = lam
    b, s = members.shape
    cluster = torch.arange(b, device=m.device).repeat_interleave(s)  # (B S,) each entry's block
    slot = torch.where(valid, torch.arange(s, device=m.device), -1).reshape(-1)  # -1: padding
    one = _one_member(coef.reshape(-1), cluster, slot, n2, (mm * mm).sum(dim=1), eps)
    if one is not None:  # lam ~ 0 (all weights 0): the last member's direction
        coef = one.alpha.view(b, s)
        n2 = (coef * (gb @ coef[..., None]).squeeze(-1)).sum(dim=1)
    coef = coef * n2.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt()[:, None]
    return coef, (gb @ coef[..., None]).squeeze(-1)


def _power_iteration(
    gram: Tensor, a: Tensor, m: Tensor, k: int, include: Tensor
) -> tuple[Tensor, Tensor]:
    """Top eigenvectors of the included clusters (R, K) by batched power iteration.

    alpha <- m^2 * ((G*M) alpha) from alpha = m (the Lloyd centroid), M the same-cluster
    mask, normalised to ||u_k|| = 1 per cluster; each cluster is frozen once
    1 - cos(u, B u) <= tol, so its result does not depend on the others. Returns
    (alpha, cos), (R, n), meaningful on the included clusters' units only.
    """
    r, n = a.shape
    dtype = gram.dtype
    eps = _eps(dtype)
    tiny = torch.finfo(dtype).tiny
    tol = max(1e-13, 16 * eps)
    m2 = m * m
    out_alpha = gram.new_zeros(r, n)
    out_cos = gram.new_zeros(r, n)
    counts = _cluster_counts(a, k)  # (R, K)
    pairs = torch.where(include, counts * counts, 0).sum(dim=1)  # (R,) stored entries
    per_restart = int(pairs.max()) * (40 + gram.element_size())  # index temporaries + values
    for sl in _restart_chunks(r, per_restart):
        ac, inc = a[sl], include[sl]
        c = ac.shape[0]
        op = _block_operator(gram, ac, k, inc)

        def matvec(x: Tensor, op: Tensor = op, c: int = c) -> Tensor:
            return (op @ x.reshape(-1)).view(c, n)  # (c, n)

        alpha = m.expand(c, n).clone()  # (c, n)
        y = matvec(alpha)
        n2 = _cluster_sum(alpha * y, ac, k)  # (c, K)
        scale = _cluster_sum(alpha.abs(), ac, k)
        one = _one_member_per_restart(alpha, ac, k, n2, scale, eps, among=inc)
        if one is not None:  # a cluster's sum vanishes: one member's direction
            alpha = one.alpha
            y = matvec(alpha)
            n2 = _cluster_sum(alpha * y, ac, k)
        inv = _gather(n2.clamp_min(tiny).rsqrt(), ac)
        alpha, y = alpha * inv, y * inv
        lam_floor = (64 * eps * _cluster_sum(m2.expand(c, n), ac, k)) ** 2  # (c, K)
        done = ~inc  # (c, K)
        for _ in range(_POWER_MAX_ITER):
            if bool(done.all()):
                break
            nxt = m2 * y  # (c, n) coefficients of B u
            y_nxt = matvec(nxt)
            n2 = _cluster_sum(nxt * y_nxt, ac, k)  # ||B u||^2
            inner = _cluster_sum(nxt * y, ac, k)  # <B u, u>
            bad = ~(n2 > lam_floor)  # B u ~ 0 (all weights 0): keep u
            inv_k = torch.where(bad, 0.0, n2.clamp_min(tiny).rsqrt())
            keep = _gather(bad | done, ac)
            inv = _gather(inv_k, ac)
            alpha = torch.where(keep, alpha, nxt * inv)
            y = torch.where(keep, y, y_nxt * inv)
            done |= bad | (1.0 - inner * inv_k <= tol)
        out_alpha[sl], out_cos[sl] = alpha, y
    return out_alpha, out_cos


def _top_eigen_coeffs(gram: Tensor, a: Tensor, weights: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per cluster, the top eigenvector u_k of sum_{i in C_k} m_i^2 d_i d_i^T, in Gram space.

    Clusters of up to ``_EIGH_MAX_SIZE`` members are solved exactly with batched eigh on
    their padded Gram blocks (buckets of power-of-two padding, so a cluster's result does not
    depend on the others); larger ones by power iteration. ||u_k|| = 1 and the sign makes
    sum_{i in C_k} m_i <d_i, u_k> > 0. Returns (alpha, cos), (R, n): coefficients over the
    cluster's members and each unit's cosine to its own cluster's eigenvector.
    """
    r, n = a.shape
    m = weights.to(gram.dtype)
    flat = _flat_labels(a, k).reshape(-1)  # (R*n,)
    order = torch.argsort(flat, stable=True)  # global units grouped by cluster
    sizes = torch.bincount(flat, minlength=r * k)  # (R*K,)
    starts = sizes.cumsum(0) - sizes
    alpha = gram.new_zeros(r * n)
    cos = gram.new_zeros(r * n)
    lo, hi = 0, 1
    while lo < _EIGH_MAX_SIZE:  # buckets of sizes (0, 1], (1, 2], (2, 4], ...
        sel = ((sizes > lo) & (sizes <= hi)).nonzero().squeeze(1)  # (B,) clusters
        if sel.numel():
            pos = torch.arange(hi, device=a.device)
            valid = pos < sizes[sel][:, None]  # (B, hi)
            units = order[(starts[sel][:, None] + pos).clamp(max=r * n - 1)]  # (B, hi) global
            coef, c_ = _eigh_blocks(gram, m, units % n, valid)
            alpha[units[valid]] = coef[valid]
            cos[units[valid]] = c_[valid]
        lo, hi = hi, 2 * hi
    big = (sizes > _EIGH_MAX_SIZE).view(r, k)
    if bool(big.any()):
        pa, pc = _power_iteration(gram, a, m, k, big)
        on_big = _gather(big, a).reshape(-1)
        alpha = torch.where(on_big, pa.reshape(-1), alpha)
        cos = torch.where(on_big, pc.reshape(-1), cos)
    alpha, cos = alpha.view(r, n), cos.view(r, n)
    flip = _gather(_cluster_sum(m * cos, a, k) < 0, a)  # sum_i m_i <d_i, u_k> < 0
    return torch.where(flip, -alpha, alpha), torch.where(flip, -cos, cos)


def _refine(
    gram: Tensor,
    weights: Tensor,
    k: int,
    a: Tensor,
    alpha: Tensor,
    objective: Tensor,
    steps: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-1 K-subspaces refinement of every restart, keeping each restart's best state.

    Alternates u_k = top eigenvector of the cluster's weighted scatter and argmax-cosine
    reassignment; a restart stops when its assignment no longer changes or its objective
    (evaluated for (assignment, eigenvectors)) stops decreasing.
    """
    best_a, best_alpha, best_obj = a.clone(), alpha.clone(), objective.clone()
    cur = a.clone()
    active = torch.arange(a.shape[0], device=a.device)
    for _ in range(steps):
        ca = cur[active]
        coef, cos = _top_eigen_coeffs(gram, ca, weights, k)
        obj = _spherical_residual(cos, weights).sum(dim=1)
        better = obj < best_obj[active]
        upd = active[better]
        best_obj[upd] = obj[better]
        best_a[upd] = ca[better]
        best_alpha[upd] = coef[better]
        active, ca, coef = active[better], ca[better], coef[better]
        if active.numel() == 0:
            break
        _, _, new_a, new_own = _spherical_step(gram, ca, coef, k)
        new_a = _repair_empty(new_a, new_own, _spherical_residual(new_own, weights), k)
        moved = (new_a != ca).any(dim=1)
        active = active[moved]
        cur[active] = new_a[moved]
        if active.numel() == 0:
            break
    return best_a, best_alpha, best_obj
