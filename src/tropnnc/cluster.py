"""Clustering kernels: weighted spherical k-means (with eigenvector refinement), k-means, Ward.

Everything runs in *Gram space* so that the cost of a Lloyd step does not depend on the
dimension of the points (later layers have 25,088-dim units) nor on the number of clusters:

* the one product that reads the points is the Gram matrix G = X X^T (:func:`gram_matrix`:
  only the row blocks on and above the diagonal are multiplied, in float32 once the product
  is large; float64 inputs are converted a column chunk at a time);
* a centroid is a coefficient vector over the points, u_k = sum_{i: a(i)=k} alpha_i x_i;
* T[k, j] = <x_j, u_k> = sum_{i: a(i)=k} alpha_i G[i, j] costs O(|C_k| n) per cluster;
* ||u_k||^2 = sum_{i: a(i)=k} alpha_i T[k, i].

Lloyd iterations (:class:`_Lloyd`) keep every cluster's score row in one (restarts, K, n)
buffer and, after a reassignment, recompute only the rows of clusters that gained or lost
members; a step is then one ``amax`` pass over the buffer plus work proportional to what
moved. Seeding (greedy k-means++ for the spherical case, plain k-means++ for the Euclidean
one) tracks each unit's nearest seed, which is the initial assignment.
Restarts are processed in chunks whose buffer fits ``_MEMORY_BUDGET_BYTES`` (one buffer,
reused); row-chunked passes keep their temporaries under ``_CHUNK_BYTES``. The refinement's
per-cluster top eigenvectors are exact batched ``eigh`` of the padded Gram blocks for
clusters of up to ``_EIGH_MAX_SIZE`` members and power iteration on a sparse block-diagonal
Gram otherwise. The only Python loops are over k-means++ seeding steps, Lloyd / refinement /
power iterations, cluster-size buckets, restarts and memory chunks. Nothing here assumes a
device: tensors stay where the inputs are.

Randomness: every random number comes from the ``torch.Generator`` argument, drawn up front as
one (restarts, k) float64 uniform matrix, (restarts, k, L) for greedy seeding with L trials
(row r drives restart r's seeding by inverse-CDF sampling). Restart r therefore depends only
on the first (r + 1) * k (* L) draws and is computed independently of the others, so a run
with more restarts contains the runs with fewer ones and reaches a lower or equal objective.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Clustering",
    "GramClustering",
    "cosine_gram",
    "combine_rows",
    "cosine_residual",
    "gram_dtype",
    "gram_matrix",
    "gram_of_chunks",
    "kmeans",
    "kmeans_gram",
    "member_cosines",
    "merged_gram",
    "spherical_kmeans",
    "spherical_kmeans_gram",
    "ward",
    "ward_threshold",
]

_MEMORY_BUDGET_BYTES = 1 << 25  # soft cap for one batch of (restarts, K, n) buffers / temporaries
_CHUNK_BYTES = 1 << 24  # temporaries of row-chunked passes (small enough for malloc to recycle)
_CACHE_BYTES = 1 << 21  # temporaries of streaming passes that are consumed at once (in cache)
_FLOAT32_GRAM_MACS = 1 << 27  # float64 Gram products above this many multiply-adds use float32
_GRAM_BLOCK = 512  # row strip of the symmetric Gram product
_GREEDY_EXACT_WORK = 1 << 26  # greedy seeding: exact gains while trials*n*k fits (per restart)
_GREEDY_NEIGHBOURS = 32  # otherwise gains over each candidate's nearest units only
# greedy seeding takes one seed per step up to k = _GREEDY_ONE_PER_STEP clusters, else up to
# min(_GREEDY_MAX_PER_STEP, k // _GREEDY_SEEDS_PER_EXTRA) per step: fewer steps of its loop
# of small ops (a step with several seeds costs 2-8x a one-seed step; benchmarks/README.md)
_GREEDY_ONE_PER_STEP = 128
_GREEDY_SEEDS_PER_EXTRA = 32
_GREEDY_MAX_PER_STEP = 16
_POWER_MAX_ITER = 100  # power iterations per refinement step (clusters above _EIGH_MAX_SIZE)
_EIGH_MAX_SIZE = 64  # clusters up to this size get an exact batched eigh


@dataclass(frozen=True)
class Clustering:
    """Result of a clustering: labels, centroids and the objective restarts were compared by."""

    assignment: Tensor  # (n,) long in [0, K), every cluster non-empty
    centroids: Tensor  # (K, d): unit rows (spherical) or weighted means (Euclidean)
    objective: float  # spherical: sum_i r_i; Euclidean: weighted inertia


@dataclass(frozen=True)
class GramClustering:
    """A spherical clustering found from the Gram matrix alone.

    Centroid k is the direction of sum_{i: a(i)=k} coefficients[i] * d_i (not normalised:
    normalise it in point space, where its norm is exact).
    """

    assignment: Tensor  # (n,) long in [0, K), every cluster non-empty
    coefficients: Tensor  # (n,) alpha_i >= 0 in the Gram's dtype
    objective: float  # sum_i r_i, the spherical objective (spec P5 without rho)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _all_finite(x: Tensor) -> bool:
    """Whether every entry is finite, from its min and max (no boolean copy of ``x``)."""
    if x.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())


def _as_matrix(x: Tensor, name: str) -> Tensor:
    """Check that ``x`` is a finite floating (n, d) matrix."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if not _all_finite(x):
        raise ValueError(f"{name} must be finite")
    return x


def _as_weights(weights: Tensor | None, n: int, like: Tensor) -> Tensor:
    """Weights as a non-negative finite (n,) tensor in ``like``'s dtype (ones when None)."""
    if weights is None:
        return torch.ones(n, dtype=like.dtype, device=like.device)
    if not isinstance(weights, Tensor):
        weights = torch.as_tensor(weights)
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    w = weights.to(dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    return w


def _check_k(k: int) -> int:
    """Validate the number of clusters."""
    if isinstance(k, bool) or int(k) != k:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def _check_counts(restarts: int, iters: int, refine: int = 0) -> None:
    """Validate iteration counts."""
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")


def _check_gram(gram: Tensor, x: Tensor) -> Tensor:
    """Validate a precomputed Gram matrix for the rows of ``x`` (kept in its own float dtype)."""
    n = x.shape[0]
    if not isinstance(gram, Tensor) or gram.shape != (n, n):
        shape = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
        raise ValueError(f"gram must have shape ({n}, {n}), got {shape}")
    dtype = gram.dtype if gram.is_floating_point() else x.dtype
    return gram.to(dtype=dtype, device=x.device)


def _check_square(gram: Tensor) -> Tensor:
    """A finite floating square matrix."""
    if not isinstance(gram, Tensor):
        raise TypeError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must have shape (n, n), got {tuple(gram.shape)}")
    if not gram.is_floating_point():
        raise ValueError(f"gram must be a floating tensor, got {gram.dtype}")
    if not _all_finite(gram):
        raise ValueError("gram must be finite")
    return gram


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _row_step(width: int, element_size: int) -> int:
    """Rows per chunk so that a (rows, width) temporary stays under ``_CHUNK_BYTES``."""
    return max(1, _CHUNK_BYTES // max(1, width * element_size))


# --------------------------------------------------------------------------------------------
# Gram products
# --------------------------------------------------------------------------------------------


def gram_dtype(x: Tensor) -> torch.dtype:
    """The dtype :func:`gram_matrix` uses for the rows of ``x`` (n, d).

    float64 inputs keep float64 while the product is small (n^2 d <= ``_FLOAT32_GRAM_MACS``
    multiply-adds: every test-sized block, where exact collapses must stay exact); everything
    else runs in float32, at twice the speed of float64 and half its memory (cosines to about
    1e-6, plenty to cluster; certificates are recomputed in float64 from the actual rows).
    """
    n, d = x.shape
    if x.dtype == torch.float64 and n * n * d <= _FLOAT32_GRAM_MACS:
        return torch.float64
    return torch.float32


def gram_matrix(
    x: Tensor,
    dtype: torch.dtype | None = None,
    center: Tensor | None = None,
    *,
    scale: Tensor | None = None,
) -> Tensor:
    """G = (x - center)(x - center)^T, (n, n), on ``x``'s device; with ``scale`` (n,),
    G_ij * scale_i * scale_j (on the strip path, strip by strip: no extra pass over G).

    ``dtype`` defaults to :func:`gram_dtype`. When ``x`` already has that dtype (and no
    ``center``), only the row strips on and above the diagonal are multiplied (about half the
    multiply-adds of ``x @ x.T``) and mirrored. Otherwise columns are converted (and
    centred) a chunk at a time and accumulated, so no full-size converted copy of ``x`` is
    ever made.
    """
    n, d = x.shape
    dtype = gram_dtype(x) if dtype is None else dtype
    sc = None if scale is None else scale.to(dtype)
    if x.dtype != dtype or center is not None:
        g = torch.zeros(n, n, dtype=dtype, device=x.device)
        step = _row_step(n, max(x.element_size(), torch.finfo(dtype).bits // 8))
        for s in range(0, d, step):
            xc = x[:, s : s + step]
            if center is not None:
                xc = xc - center[s : s + step].to(xc.dtype)
            xc = xc.to(dtype)
            g.addmm_(xc, xc.T)
    elif n <= 2 * _GRAM_BLOCK:
        g = x @ x.T
    else:
        return _gram_strips(x, sc)
    if sc is not None:
        g.mul_(sc[:, None]).mul_(sc[None, :])
    return g


def _gram_strips(x: Tensor, sc: Tensor | None) -> Tensor:
    """x x^T (n, n) from the row strips on and above the diagonal, mirrored; each strip
    scaled by sc_i sc_j as it is made."""
    n = x.shape[0]
    g = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for i in range(0, n, _GRAM_BLOCK):
        j = min(n, i + _GRAM_BLOCK)
        strip = x[i:j] @ x[i:].T  # (b, n - i): the diagonal block and everything right of it
        if sc is not None:
            strip.mul_(sc[i:j, None]).mul_(sc[None, i:])
        g[i:j, i:] = strip
        g[j:, i:j] = strip[:, j - i :].T
    return g


def gram_of_chunks(
    chunks: Iterable[Tensor], n: int, dtype: torch.dtype, device: torch.device | str | None = None
) -> Tensor:
    """G = sum_c X_c X_c^T (n, n) over column chunks X_c (n, f_c) of a matrix that is never
    formed (features made on the fly, e.g. scaled or centred slices of several tensors).

    Each chunk is converted to ``dtype``; only the strips on and above the diagonal are
    multiplied (about half the multiply-adds), then mirrored once at the end.
    """
    g = torch.zeros(n, n, dtype=dtype, device=device)
    for x in chunks:
        x = x.to(dtype)
        if n <= 2 * _GRAM_BLOCK:
            g.addmm_(x, x.T)
            continue
        for i in range(0, n, _GRAM_BLOCK):
            j = min(n, i + _GRAM_BLOCK)
            g[i:j, i:].addmm_(x[i:j], x[i:].T)
    if n > 2 * _GRAM_BLOCK:
        for i in range(0, n, _GRAM_BLOCK):
            j = min(n, i + _GRAM_BLOCK)
            g[j:, i:j] = g[i:j, j:].T
    return g


def cosine_gram(x: Tensor, norms: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Gram matrix of the directions x_i / ||x_i||, from one product of the raw rows.

    No normalised copy of ``x`` is made: G_ij = <x_i, x_j> / (||x_i|| ||x_j||), with the
    diagonal set to exactly 1 (0 for zero rows, which have no direction). ``norms`` (n,)
    may be passed when already known.
    """
    if norms is None:
        norms = torch.linalg.vector_norm(x, dim=1)
    nz = norms > 0
    inv = torch.where(nz, 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
    g = gram_matrix(x, dtype, scale=inv)
    g.diagonal().copy_(nz.to(g.dtype))
    return g


def merged_gram(
    gram: Tensor, assignment: Tensor, coefficients: Tensor, k: int, *, product: Tensor | None = None
) -> Tensor:
    """Cosine Gram (k, k) of the merged directions u_c ~ sum_{a(i)=c} coefficients_i d_i.

    ``gram`` is the cosine Gram of the d_i. A G A^T with A the (k, n) coefficient matrix, in
    O(k n) instead of a new product over the point dimension (re-clustering a merged layer).
    ``product``: A G (k, n) when the caller has it (:func:`member_cosines` forms it too).
    """
    alpha = coefficients.to(gram.dtype)
    t = combine_rows(gram, assignment, alpha, k) if product is None else product  # A G
    g2 = combine_rows(t.T, assignment, alpha, k)  # (k, k) = A (A G)^T
    g2 = 0.5 * (g2 + g2.T)
    diag = g2.diagonal().clone()
    inv = torch.where(diag > 0, diag.clamp_min(torch.finfo(g2.dtype).tiny).rsqrt(), 0.0)
    g2.mul_(inv[:, None]).mul_(inv[None, :])
    g2.diagonal().copy_((diag > 0).to(g2.dtype))
    return g2


def member_cosines(
    gram: Tensor, assignment: Tensor, coefficients: Tensor, k: int, *, product: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Each unit's cosine to its own merged direction, and the merged vectors' norms.

    With r_c = sum_{a(i)=c} coefficients_i d_i and ``gram`` the cosine Gram of the d_i:
    returns (cos(d_i, r_{a(i)}) (n,), ||r_c|| (k,)), both in ``gram``'s dtype, from
    t = A G (k, n): ||r_c||^2 = sum_{a(i)=c} alpha_i t[c, i]. O(n^2) instead of two passes
    over the (n, d) points (the projections <w_i, u_c> and the norms of the new rows).
    ``product``: A G when the caller has it, as in :func:`merged_gram`.
    """
    alpha = coefficients.to(gram.dtype)
    t = combine_rows(gram, assignment, alpha, k) if product is None else product  # A G
    own = t.gather(0, assignment[None, :]).squeeze(0)  # (n,) <d_i, r_a(i)>
    sq = gram.new_zeros(k).index_add_(0, assignment, alpha * own)  # (k,) ||r_c||^2
    norm = sq.clamp_min(0).sqrt()
    tiny = torch.finfo(gram.dtype).tiny
    return own / norm.clamp_min(tiny)[assignment], norm


def combine_rows(mat: Tensor, a: Tensor, alpha: Tensor, k: int) -> Tensor:
    """out[c] = sum_{i: a[i] = c} alpha[i] * mat[i], (k, width), in ``mat``'s dtype; row
    chunks bound the temporaries (centroids and merged rows of large blocks)."""
    n, width = mat.shape
    out = mat.new_zeros(k, width)
    step = _row_step(width, mat.element_size())
    for s in range(0, n, step):
        out.index_add_(0, a[s : s + step], mat[s : s + step] * alpha[s : s + step, None])
    return out


# --------------------------------------------------------------------------------------------
# Gram-space primitives
# --------------------------------------------------------------------------------------------


def _cluster_sum(values: Tensor, a: Tensor, k: int) -> Tensor:
    """Per-restart cluster sums: out[r, c] = sum_{i: a[r, i] = c} values[r, i]."""
    out = values.new_zeros(a.shape[0], k)  # (R, K)
    return out.scatter_add_(1, a, values)


def _cluster_counts(a: Tensor, k: int) -> Tensor:
    """Per-restart cluster sizes, (R, K) long."""
    out = torch.zeros(a.shape[0], k, dtype=torch.long, device=a.device)  # (R, K)
    return out.scatter_add_(1, a, torch.ones_like(a))


def _gather(values: Tensor, a: Tensor) -> Tensor:
    """Broadcast per-cluster values (R, K) back to the units: (R, n)."""
    return values.gather(1, a)


def _one_hot_coeffs(a: Tensor, alpha: Tensor, k: int) -> Tensor:
    """Sparse (R*K, n) matrix with alpha[r, i] at (r*K + a[r, i], i): rows are centroids."""
    r, n = a.shape
    rows = (a + k * torch.arange(r, device=a.device)[:, None]).reshape(-1)  # (R*n,)
    cols = torch.arange(n, device=a.device).repeat(r)  # (R*n,)
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), alpha.reshape(-1), (r * k, n), check_invariants=False
    )


def _scatter_columns(gram: Tensor, a: Tensor, alpha: Tensor, k: int) -> Tensor:
    """T[r, c, j] = <x_j, u_{r,c}> = sum_{i: a[r,i]=c} alpha[r, i] G[i, j]; (R, K, n), O(R n^2)."""
    r, n = a.shape
    return torch.sparse.mm(_one_hot_coeffs(a, alpha, k), gram).view(r, k, n)  # (R, K, n)


def _combine(points: Tensor, a: Tensor, alpha: Tensor, k: int) -> Tensor:
    """Centroids in point space: U[c] = sum_{i: a[i]=c} alpha_i x_i, (K, d), O(n d)."""
    return combine_rows(points, a, alpha.to(points.dtype), k)


def _representatives(a: Tensor, k: int) -> Tensor:
    """A deterministic member per cluster (the largest index), (R, K) long; -1 when empty."""
    idx = torch.arange(a.shape[1], device=a.device).expand_as(a)  # (R, n)
    rep = torch.full((a.shape[0], k), -1, dtype=torch.long, device=a.device)  # (R, K)
    return rep.scatter_reduce_(1, a, idx, reduce="amax")


def _restart_chunks(r: int, bytes_per_restart: int) -> list[slice]:
    """Split restarts into contiguous chunks whose temporaries fit the memory budget."""
    size = max(1, _MEMORY_BUDGET_BYTES // max(1, bytes_per_restart))
    return [slice(s, min(r, s + size)) for s in range(0, r, size)]


# --------------------------------------------------------------------------------------------
# residuals and empty-cluster repair
# --------------------------------------------------------------------------------------------


def _spherical_residual(cos: Tensor, weights: Tensor) -> Tensor:
    """r_i = m_i sin(theta_i), or m_i when cos(theta_i) < 0 (share clipped); float64."""
    c = cos.double()
    w = weights.double()
    sin = torch.sqrt(torch.clamp(1.0 - c * c, min=0.0))
    return torch.where(c >= 0, w * sin, w.expand_as(c))


def _euclidean_residual(neg_dist2: Tensor, weights: Tensor) -> Tensor:
    """r_i = w_i ||x_i - c||^2 from the score -||x_i - c||^2; float64."""
    return weights.double() * torch.clamp(-neg_dist2.double(), min=0.0)


def cosine_residual(
    directions: Tensor, weights: Tensor, assignment: Tensor, centroids: Tensor
) -> Tensor:
    """Per-unit residual r_i = m_i sin(angle(d_i, u_{a(i)})) (m_i if the cosine is negative).

    Computed directly in point space (gathers centroids[assignment], (n, d)): cosines in the
    inputs' dtype, the rest in float64. The spherical objective is the sum of these (spec P5
    with all shares clipped at 0).
    """
    d = _as_matrix(directions, "directions")
    u = _as_matrix(centroids, "centroids")
    w = _as_weights(weights, d.shape[0], d)
    if assignment.shape != (d.shape[0],):
        raise ValueError(
            f"assignment must have shape ({d.shape[0]},), got {tuple(assignment.shape)}"
        )
    if u.shape[1] != d.shape[1]:
        raise ValueError(
            f"centroids must have {d.shape[1]} columns like directions, got {u.shape[1]}"
        )
    cos = torch.einsum("ij,ij->i", d, u.to(d.dtype)[assignment.long()])  # (n,)
    return _spherical_residual(cos, w)


def _repair_empty(a: Tensor, own: Tensor, residual: Tensor, k: int) -> Tensor:
    """Re-seed empty clusters with the units of largest residual, vectorised over restarts.

    Each non-empty cluster keeps an anchor (its best-scoring member, ties to the largest
    index) that is never moved, so donors always keep >= 1 member; the moved units are
    distinct and come from clusters with >= 2 members.
    """
    counts = _cluster_counts(a, k)  # (R, K)
    empty = counts == 0
    if not bool(empty.any()):
        return a
    r, n = a.shape
    idx = torch.arange(n, device=a.device).expand(r, n)  # (R, n)
    best = torch.full((r, k), -math.inf, dtype=own.dtype, device=own.device)  # (R, K)
    best = best.scatter_reduce_(1, a, own, reduce="amax")
    is_best = own == _gather(best, a)  # (R, n)
    anchor = torch.full((r, k), -1, dtype=torch.long, device=a.device)  # (R, K)
    anchor = anchor.scatter_reduce_(1, a, torch.where(is_best, idx, -1), reduce="amax")
    key = residual.masked_fill(_gather(anchor, a) == idx, -math.inf)  # (R, n)
    n_empty = int(empty.sum(dim=1).max())
    top = key.topk(n_empty, dim=1).indices  # (R, E) best candidates first
    rank = empty.long().cumsum(dim=1) - 1  # (R, K) rank of each empty cluster
    rr, kk = empty.nonzero(as_tuple=True)
    units = top[rr, rank[rr, kk]]
    a = a.clone()
    a[rr, units] = kk
    return a


# --------------------------------------------------------------------------------------------
# k-means++ seeding
# --------------------------------------------------------------------------------------------


_BELOW_ONE = 1.0 - 2.0**-40  # u * _BELOW_ONE * total < total even after float64 rounding


def _sample_rows(p: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling of one index per row of p (R, n) >= 0 with uniforms u (R,).

    The target stays strictly below the row total, so the first cdf entry above it belongs to
    a unit with p > 0. Rows with total 0 return n (callers handle them).
    """
    cdf = p.cumsum(dim=1)  # (R, n)
    target = (u * _BELOW_ONE)[:, None] * cdf[:, -1:]  # (R, 1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1)  # (R,)


def _kpp_seeds(
    weights: Tensor,
    k: int,
    uniforms: Tensor,
    dissimilarity: Callable[[Tensor], Tensor],
    nearest: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Batched k-means++ seeding: (R, k) distinct seed indices.

    First seed ~ weights; next ones ~ weights * current min dissimilarity; when that is 0 for
    every unchosen unit (or all weights are 0), uniform over the unchosen units.
    ``dissimilarity(idx)`` maps (R,) seed indices to (R, n) non-negative values (any float
    dtype; the sampling weights are float64).
    With ``nearest``, also returns (R, n) long: for every unit the position t of its least
    dissimilar seed (the first one on ties), which is the seeds' Voronoi assignment.
    """
    r = uniforms.shape[0]
    n = weights.shape[0]
    dev = weights.device
    w = weights.double()  # (n,)
    with torch.inference_mode():  # a long loop of small ops: skip autograd bookkeeping
        picked: list[Tensor] = []  # (R,) seed indices, stacked at the end
        near = torch.zeros(r, n, dtype=torch.long, device=dev) if nearest else None
        below = uniforms * _BELOW_ONE  # (R, k) as in _sample_rows, computed once
        p = w.expand(r, n)  # (R, n) sampling weights, 0 on chosen units
        buf = torch.empty(r, n, dtype=torch.float64, device=dev)
        mind: Tensor | None = None
        for t in range(k):  # the ops of _sample_rows inlined: this loop runs k times
            cdf = p.cumsum(dim=1)  # (R, n)
            idx = torch.searchsorted(cdf, below[:, t : t + 1] * cdf[:, -1:], right=True)  # (R, 1)
            if int(idx.max()) >= n:  # nothing left with positive weight * dissimilarity
                chosen = torch.zeros(r, n, dtype=torch.bool, device=dev)  # (R, n)
                if picked:
                    chosen.scatter_(1, torch.cat(picked, dim=1), True)
                fallback = _sample_rows((~chosen).double(), uniforms[:, t])[:, None]
                idx = torch.where(idx >= n, fallback, idx)
            picked.append(idx)
            if t + 1 < k or near is not None:
                dis = dissimilarity(idx[:, 0])
                if mind is None:
                    mind = dis.clone()
                else:
                    if near is not None:
                        near.masked_fill_(dis < mind, t)
                    torch.minimum(mind, dis, out=mind)
                mind.scatter_(1, idx, 0.0)  # chosen units are never sampled again
                p = torch.mul(w, mind, out=buf)
        seeds = torch.cat(picked, dim=1)  # (R, k)
    seeds = seeds.clone()  # ordinary tensors outside inference mode
    near = None if near is None else near.clone()
    return seeds if near is None else (seeds, near)


def _local_trials(k: int) -> int:
    """Candidates per greedy k-means++ step: 2 + ln k (Arthur & Vassilvitskii; scikit-learn)."""
    return 2 + int(math.log(k)) if k > 1 else 1


def _greedy_per_step(k: int) -> int:
    """Seeds per step of greedy seeding for k clusters (1 up to k = 128, then k / 32, at
    most 16)."""
    if k <= _GREEDY_ONE_PER_STEP:
        return 1
    return min(_GREEDY_MAX_PER_STEP, k // _GREEDY_SEEDS_PER_EXTRA)


def _greedy_cosine_seeds(
    gram: Tensor, weights: Tensor, k: int, uniforms: Tensor, zero_tol: float, per_step: int = 1
) -> tuple[Tensor, Tensor]:
    """Greedy k-means++ seeding on the dissimilarity 1 - cos, batched over restarts.

    Each seed gets L = ``uniforms.shape[2]`` candidates ~ weights * min dissimilarity to the
    seeds so far (inverse-CDF, one uniform each; dissimilarities within ``zero_tol`` of 0
    count as 0) and keeps the one that lowers the weighted potential sum_j w_j d_j the most:
    gain(c) = sum_j w_j relu(cos(c, j) - s_j), s_j the best cosine to a seed so far. When
    L * n * k exceeds ``_GREEDY_EXACT_WORK`` the gains of later steps are summed
    over each candidate's ``_GREEDY_NEIGHBOURS`` most similar units only (the units it can
    take over once seeds are dense).

    ``per_step`` = B > 1 picks up to B seeds per step (about k / B steps of this loop of
    small ops): seed b of a step draws its candidates from the b-th of B equal slices of the
    sampling mass. Winner j of a step is dropped (its restart takes fewer seeds that step)
    when it repeats an earlier winner i of the step (one unit's mass straddling a slice
    boundary) or is more similar to one than to its nearest seed so far: taken one at a
    time, i would have claimed most of j's gain. The kept winners' gains are otherwise not
    updated for each other. Restart r consumes its uniforms in order (row r, one row of L
    per seed), whatever the other restarts do.

    Returns (seeds (R, k), near (R, n)): the seeds and the position of each unit's most
    similar seed (the first on ties).
    """
    r, _, trials = uniforms.shape
    n = gram.shape[0]
    dev = gram.device
    wg = weights.to(gram.dtype)
    # (per restart, so that a restart's seeds do not depend on how many restarts run)
    truncated = trials * n * k > _GREEDY_EXACT_WORK and n > _GREEDY_NEIGHBOURS
    if truncated:  # (n, M) each unit's most similar units, (n, 2M) their cosines and weights
        nb_cos, nb_idx = torch.topk(gram, _GREEDY_NEIGHBOURS, dim=1)
        nb_cw = torch.cat([nb_cos, wg[nb_idx]], dim=1)
    b = per_step
    group = torch.arange(b, device=dev)  # (B,)
    # (R, k B, L) sampling fractions: the uniforms of seed position s, in slice j of B, at
    # s B + j; two ulps below one in the Gram's dtype, so (fraction * total) < total
    frac_all = (
        ((uniforms[:, :, None, :] + group[:, None]) / b)
        .clamp_(max=1.0 - 2.0 * torch.finfo(gram.dtype).eps)
        .to(gram.dtype)
        .view(r, k * b, trials)
    )
    # slot count + j of slice j sits at (count + j) B + j; slots past k are never kept
    at_offset = (group * (b + 1))[None, :, None]  # (1, B, 1)
    flat_gram = gram.reshape(-1)  # (n^2,) cosines between a step's winners
    with torch.inference_mode():  # a long loop of small ops: skip autograd bookkeeping
        seeds = torch.full((r, k + 1), n, dtype=torch.long, device=dev)  # column k: a sink
        count = torch.zeros(r, dtype=torch.long, device=dev)  # seeds so far per restart
        near = torch.zeros(r, n, dtype=torch.long, device=dev)
        best_cos = torch.full((r, n), -1.0, dtype=gram.dtype, device=dev)  # s_j (no seed: -1)
        p = wg.expand(r, n)  # (R, n) sampling weights, 0 on chosen units
        buf = torch.empty(r, n, dtype=gram.dtype, device=dev)
        cdf = torch.empty(r, n, dtype=gram.dtype, device=dev)
        above = torch.empty(r, n, dtype=torch.bool, device=dev) if b == 1 else None
        started = False
        least, most = 0, 0
        while least < k:
            torch.cumsum(p, dim=1, out=cdf)  # (R, n)
            if b == 1:  # one seed per step: every restart is at position `least`
                frac = frac_all[:, least]  # (R, L)
            else:
                at = (count[:, None, None] * b + at_offset).clamp_(max=k * b - 1)  # (R, B, 1)
                frac = frac_all.gather(1, at.expand(-1, -1, trials)).view(r, -1)  # (R, B L)
            cand = torch.searchsorted(cdf, frac * cdf[:, -1:], right=True)  # (R, B L)
            if int(cand.max()) >= n:  # nothing left with positive weight * dissimilarity
                chosen = torch.zeros(r, n + 1, dtype=torch.bool, device=dev)
                chosen.scatter_(1, seeds[:, :k], True)  # (column k: dropped winners)
                u0 = uniforms[:, :, 0].gather(1, count[:, None].clamp(max=k - 1)).squeeze(1)
                fallback = _sample_rows((~chosen[:, :n]).double(), u0)[:, None]
                cand = torch.where(cand >= n, fallback, cand)  # (a repeated winner)
            c = cand.view(-1)  # (R B L,)
            if truncated and started:  # index_select: far cheaper than advanced indexing
                s_nb = best_cos.gather(1, nb_idx.index_select(0, c).view(r, -1))  # (R, B L M)
                cw = nb_cw.index_select(0, c).view(r, b * trials, 2, -1)  # (R, B L, 2, M)
                gain = torch.linalg.vecdot(
                    cw[:, :, 0].sub(s_nb.view(r, b * trials, -1)).relu_(), cw[:, :, 1]
                )
            else:  # (R, B L): sum_j w_j relu(cos(c, j) - s_j)
                rows = gram.index_select(0, c).view(r, b * trials, n)
                gain = rows.sub_(best_cos[:, None, :]).relu_() @ wg
            idx = (
                cand.view(r, b, trials)
                .gather(2, gain.view(r, b, trials).argmax(dim=2, keepdim=True))
                .squeeze(2)
            )  # (R, B)
            if b == 1:
                seeds[:, least] = idx[:, 0]
                cos = gram.index_select(0, idx[:, 0])  # (R, n)
                near.masked_fill_(torch.gt(cos, best_cos, out=above), least)
                torch.maximum(best_cos, cos, out=best_cos)
                count += 1
            else:  # slots past k repeat group 0's winner; repeats are dropped
                valid = (count[:, None] + group) < k  # (R, B)
                idx = torch.where(valid, idx, idx[:, :1])
                # winner j also yields to an earlier winner i of its step that is more similar
                # to it than its nearest seed so far (the two would split one region; one
                # seed at a time, j's gain would mostly be gone)
                pair = flat_gram.index_select(0, (idx[:, :, None] * n + idx[:, None, :]).view(-1))
                clash = (idx[:, :, None] == idx[:, None, :]) | (
                    pair.view(r, b, b) > best_cos.gather(1, idx)[:, :, None]
                )  # (R, B, B) [j, i]
                keep = valid & ~clash.tril(-1).any(dim=2)
                pos = torch.where(keep, count[:, None] + keep.cumsum(dim=1) - 1, k)  # (R, B)
                seeds.scatter_(1, pos, idx)
                idx = torch.where(keep, idx, idx[:, :1])  # a dropped winner: group 0's row
                cos = gram.index_select(0, idx.t().reshape(-1)).view(b, r, n)  # (B, R, n)
                top = cos.amax(dim=0)  # (R, n) each unit's most similar winner
                upd = top > best_cos
                if most >= k:  # restarts that are complete stay as they are
                    upd &= (count < k)[:, None]
                ri, ui = upd.nonzero(as_tuple=True)  # the units a winner takes: the first
                won = cos.permute(1, 2, 0)[ri, ui] == top[ri, ui, None]  # (U, B)  on ties
                near[ri, ui] = pos[ri, won.byte().argmax(dim=1)]
                torch.maximum(best_cos, top, out=best_cos)
                count += keep.sum(dim=1)
            best_cos.scatter_(1, idx, 1.0)  # chosen units are never sampled again
            p = torch.mul(wg, torch.threshold(1.0 - best_cos, zero_tol, 0.0), out=buf)
            started = True
            if b == 1:
                least += 1
            else:
                least, most = (int(v) for v in torch.aminmax(count))
        seeds = seeds[:, :k]  # (R, k)
    return seeds.clone(), near.clone()  # ordinary tensors outside inference mode


# --------------------------------------------------------------------------------------------
# incremental Lloyd iterations in Gram space
# --------------------------------------------------------------------------------------------


class _Lloyd:
    """Lloyd iterations of a chunk of c restarts, every centroid's scores kept in memory.

    ``scores`` (c, K, n) holds the score of every unit against every centroid: spherical, the
    cosine <x_j, u_k> / ||u_k|| (u_k = sum alpha_i x_i, alpha = weights); Euclidean,
    2 <x_j, c_k> - ||c_k||^2 (c_k the weighted mean), which is -||x_j - c_k||^2 without the
    per-unit ||x_j||^2. After a reassignment only the clusters that gained or lost members
    are recomputed, from their members (O(|C| n) each, so a row is always the same function
    of its members); a step is one ``amax`` over the buffer, an exact ``max`` over the columns
    of the units that may move (own score below the best by more than rounding: ties keep the
    current cluster) and work proportional to what moved.
    """

    def __init__(
        self, gram: Tensor, weights: Tensor, k: int, spherical: bool, scores: Tensor
    ) -> None:
        self.gram = gram
        self.w = weights.to(gram.dtype)
        self.k = k
        self.spherical = spherical
        self.scores = scores  # (c, K, n)
        c, _, n = scores.shape
        self.flat = scores.view(c * k, n)
        self.diag = gram.diagonal()
        self.step = _row_step(n, gram.element_size())
        eps = _eps(gram.dtype)
        self.eps = eps
        if spherical:
            self.tol: Tensor | float = 16 * eps
        else:  # rounding scale of -||x_j - c||^2 (||c||^2 <= max_i ||x_i||^2)
            self.tol = 16 * eps * (self.diag + self.diag.max())  # (n,)

    def full_score(self, own: Tensor) -> Tensor:
        """Scores with the per-unit term: cosine, or -||x_j - c||^2."""
        return own if self.spherical else own - self.diag

    def residual(self, score: Tensor) -> Tensor:
        if self.spherical:
            return _spherical_residual(score, self.w)
        return _euclidean_residual(score, self.w)

    def update(self, a: Tensor, alpha: Tensor, dirty: Tensor) -> None:
        """Recompute coefficients and score rows of the clusters flagged in ``dirty`` (c*K,)."""
        c, n = a.shape
        k, dtype = self.k, self.gram.dtype
        ck = c * k
        rows = dirty.nonzero().squeeze(1)  # (D,) dirty global clusters
        if rows.numel() == 0:
            return
        flat = a + k * torch.arange(c, device=a.device)[:, None]  # (c, n)
        ri, ji = dirty[flat].nonzero(as_tuple=True)  # (M,) members of dirty clusters
        cid = flat[ri, ji]
        am = self.w[ji]
        size = torch.bincount(cid, minlength=ck)
        if not self.spherical:  # weighted means; plain means inside clusters of total weight 0
            total = self.w.new_zeros(ck).index_add_(0, cid, am)
            zero = total[cid] <= 0
            if bool(zero.any()):
                am = torch.where(zero, torch.ones_like(am), am)
                total = self.w.new_zeros(ck).index_add_(0, cid, am)
        everything = rows.numel() == ck
        if everything:  # every unit is a member (ri, ji row-major): the Gram's rows in
            self.flat.zero_()  # order, no gather; chunks of rows of every restart at once
            step = max(1, _CACHE_BYTES // (c * n * self.gram.element_size()))
            dst, coef = cid.view(c, n), am.view(c, n)
            for s in range(0, n, step):
                t = self.gram[None, s : s + step] * coef[:, s : s + step, None]  # (c, rows, n)
                self.flat.index_add_(0, dst[:, s : s + step].reshape(-1), t.view(-1, n))
        else:
            self.flat.index_fill_(0, rows, 0.0)
            for s in range(0, ji.numel(), self.step):
                t = self.gram.index_select(0, ji[s : s + self.step])
                t.mul_(am[s : s + self.step, None])
                self.flat.index_add_(0, cid[s : s + self.step], t)
        q = self.w.new_zeros(ck).index_add_(0, cid, am * self.flat[cid, ji])  # ||u||^2 / Q
        if self.spherical:
            scale = self.w.new_zeros(ck).index_add_(0, cid, am.abs())
            deg = dirty & (size > 0) & ~(q > (64 * self.eps * scale) ** 2)
            if bool(deg.any()):  # the cluster's sum vanishes: one member's direction
                rep = torch.full((ck,), -1, dtype=torch.long, device=a.device)
                rep.scatter_reduce_(0, cid, ji, reduce="amax")
                am = torch.where(deg[cid], (ji == rep[cid]).to(dtype), am)
                drows = deg.nonzero().squeeze(1)
                self.flat.index_copy_(0, drows, self.gram.index_select(0, rep[drows]))
                q[drows] = self.diag[rep[drows]]
            mul = q.clamp_min(torch.finfo(dtype).tiny).rsqrt()
            add = None
        else:
            wk = total.clamp_min(torch.finfo(dtype).tiny)
            mul = 2.0 / wk
            add = -q / (wk * wk)
        if everything:  # scale every row in place
            self.flat.mul_(mul[:, None])
            if add is not None:
                self.flat.add_(add[:, None])
        else:
            for s in range(0, rows.numel(), self.step):
                rr = rows[s : s + self.step]
                t = self.flat.index_select(0, rr)
                t.mul_(mul[rr, None])
                if add is not None:
                    t.add_(add[rr, None])
                self.flat.index_copy_(0, rr, t)
        empty = rows[size[rows] == 0]
        if empty.numel():
            self.flat.index_fill_(0, empty, -math.inf)
        alpha[ri, ji] = am

    def own(self, a: Tensor) -> Tensor:
        """Each unit's score against its own cluster, (c, n)."""
        c, n = a.shape
        flat = a + self.k * torch.arange(c, device=a.device)[:, None]
        cols = torch.arange(n, device=a.device).expand(c, n)
        return self.flat[flat.reshape(-1), cols.reshape(-1)].view(c, n)

    def assign(self, a: Tensor, own: Tensor) -> tuple[Tensor, Tensor]:
        """Argmax reassignment; units within rounding of their best keep their cluster."""
        best = self.scores.amax(dim=1)  # (c, n)
        move = own < best - self.tol
        new_a, new_own = a.clone(), own.clone()
        if not bool(move.any()):
            return new_a, new_own
        step = _row_step(self.k, self.gram.element_size())
        for r in range(a.shape[0]):
            cols = move[r].nonzero().squeeze(1)
            for s in range(0, cols.numel(), step):
                jj = cols[s : s + step]
                val, arg = self.scores[r].index_select(1, jj).max(dim=0)
                new_a[r, jj], new_own[r, jj] = arg, val
        return new_a, new_own

    def run(self, a: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
        """Iterate from assignment ``a`` (c, n, no empty cluster) until nothing moves or
        ``iters`` reassignments; returns (a, alpha, own): the final assignment, its centroid
        coefficients and every unit's full score against its own centroid."""
        c, n = a.shape
        k = self.k
        offset = k * torch.arange(c, device=a.device)[:, None]
        alpha = self.gram.new_zeros(c, n)
        dirty = torch.ones(c * k, dtype=torch.bool, device=a.device)
        own = self.gram.new_zeros(c, n)
        for it in range(iters + 1):
            self.update(a, alpha, dirty)
            own = self.own(a)
            if it == iters:
                break
            new_a, new_own = self.assign(a, own)
            new_full = self.full_score(new_own)
            new_a = _repair_empty(new_a, new_full, self.residual(new_full), k)
            moved = new_a != a
            if not bool(moved.any()):
                break
            dirty = torch.zeros(c * k, dtype=torch.bool, device=a.device)
            dirty[(a + offset)[moved]] = True
            dirty[(new_a + offset)[moved]] = True
            a = new_a
        return a, alpha, self.full_score(own)


def _lloyd(
    gram: Tensor, weights: Tensor, k: int, a: Tensor, iters: int, spherical: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd iterations of every restart (rows of ``a``), in chunks sharing one score buffer.

    Returns (a, alpha, own), each (R, n): see :meth:`_Lloyd.run`.
    """
    r, n = a.shape
    out_a, out_alpha, out_own = torch.empty_like(a), gram.new_empty(r, n), gram.new_empty(r, n)
    chunks = _restart_chunks(r, k * n * gram.element_size())
    buf = gram.new_empty(chunks[0].stop - chunks[0].start, k, n)
    for sl in chunks:
        c = sl.stop - sl.start
        engine = _Lloyd(gram, weights, k, spherical, buf[:c])
        out_a[sl], out_alpha[sl], out_own[sl] = engine.run(a[sl], iters)
    return out_a, out_alpha, out_own


# --------------------------------------------------------------------------------------------
# spherical k-means in Gram space
# --------------------------------------------------------------------------------------------


def _spherical_step(
    gram: Tensor, a: Tensor, alpha: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Centroids u = normalize(sum alpha_i d_i) of assignment a (R, n) and one reassignment.

    Returns (alpha, own, new_a, new_own), all (R, n): the coefficients actually used (a
    cluster whose sum vanishes, e.g. all weights 0, falls back to one member's direction), the
    cosine of each unit to its own centroid, the argmax-cosine assignment (gains within
    rounding, 16 eps, keep the current cluster: no churn between equal centroids) and its
    cosine. Empty clusters score -inf.
    """
    r, n = a.shape
    eps = _eps(gram.dtype)
    out_alpha = alpha.clone()
    own = gram.new_empty(r, n)
    new_a = torch.empty_like(a)
    new_own = gram.new_empty(r, n)
    diag = gram.diagonal()
    for sl in _restart_chunks(r, 2 * k * n * gram.element_size()):
        ac, al = a[sl], alpha[sl]
        t = _scatter_columns(gram, ac, al, k)  # (c, K, n) unnormalised <d_j, u_k>
        counts = _cluster_counts(ac, k)  # (c, K)
        n2 = _cluster_sum(al * t.gather(1, ac[:, None]).squeeze(1), ac, k)  # (c, K) ||u||^2
        scale = _cluster_sum(al.abs(), ac, k)
        deg = (counts > 0) & ~(n2 > (64 * eps * scale) ** 2)
        if bool(deg.any()):
            rep = _representatives(ac, k)  # (c, K)
            idx = torch.arange(n, device=a.device)
            al = torch.where(_gather(deg, ac), (idx == _gather(rep, ac)).to(al.dtype), al)
            rr, kk = deg.nonzero(as_tuple=True)
            t[rr, kk] = gram[rep[rr, kk]]
            n2 = n2.clone()
            n2[rr, kk] = diag[rep[rr, kk]]
        t.div_(n2.clamp_min(torch.finfo(gram.dtype).tiny).sqrt()[..., None])
        t.masked_fill_((counts == 0)[..., None], -math.inf)
        out_alpha[sl] = al
        own[sl] = t.gather(1, ac[:, None]).squeeze(1)
        best, arg = t.max(dim=1)
        stay = own[sl] >= best - 16 * eps  # rounding-level ties keep the current cluster
        new_a[sl] = torch.where(stay, ac, arg)
        new_own[sl] = torch.where(stay, own[sl], best)
        del t
    return out_alpha, own, new_a, new_own


def _block_operator(gram: Tensor, a: Tensor, k: int, include: Tensor) -> Tensor:
    """Sparse CSR (R*n, R*n) block-diagonal G * [a_i == a_l] over the included clusters.

    ``include`` (R, K) bool selects the clusters whose blocks are stored (rows of the other
    units are empty). Row i holds the members of i's cluster in ascending order, so the rows
    come out sorted without a sort. Stores sum |C_k|^2 entries: a matvec costs that much.
    """
    r, n = a.shape
    flat = (a + k * torch.arange(r, device=a.device)[:, None]).reshape(-1)  # (R*n,)
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
    floor = (64 * eps * (mm * mm).sum(dim=1)) ** 2
    deg = ~(n2 > floor)
    if bool(deg.any()):
        last = valid.sum(dim=1, keepdim=True) - 1  # (B, 1)
        rep = (torch.arange(members.shape[1], device=m.device) == last).to(coef.dtype)
        coef = torch.where(deg[:, None], rep, coef)
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
        deg = inc & ~(n2 > (64 * eps * _cluster_sum(alpha.abs(), ac, k)) ** 2)
        if bool(deg.any()):
            rep = _representatives(ac, k)
            idx = torch.arange(n, device=a.device)
            alpha = torch.where(_gather(deg, ac), (idx == _gather(rep, ac)).to(dtype), alpha)
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
    flat = (a + k * torch.arange(r, device=a.device)[:, None]).reshape(-1)  # (R*n,)
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


def spherical_kmeans_gram(
    gram: Tensor,
    weights: Tensor,
    k: int,
    *,
    generator: torch.Generator,
    restarts: int = 4,
    iters: int = 100,
    refine: int = 0,
) -> GramClustering:
    """Weighted spherical k-means from the cosine Gram matrix of the directions alone.

    The work of :func:`spherical_kmeans` without the points: ``gram`` (n, n) holds
    <d_i, d_j> (unit diagonal; see :func:`cosine_gram`), and the centroids come back as
    coefficients over the directions. The Lloyd iterations run in ``gram``'s dtype; the
    objective is accumulated in float64.
    """
    g = _check_square(gram)
    n = g.shape[0]
    w = _as_weights(weights, n, g)
    k = _check_k(k)
    _check_counts(restarts, iters, refine)
    if n and bool(((g.diagonal() - 1).abs() > 1e-3).any()):
        raise ValueError("directions must have unit-norm rows (the Gram diagonal must be 1)")
    if k >= n:
        return GramClustering(torch.arange(n, device=g.device), torch.ones_like(w), 0.0)

    uniforms = torch.rand(
        restarts,
        k,
        _local_trials(k),
        generator=generator,
        dtype=torch.float64,
        device=generator.device,
    ).to(g.device)  # (R, k, L)
    seeds, near = _greedy_cosine_seeds(
        g, w, k, uniforms, 16 * _eps(g.dtype), per_step=_greedy_per_step(k)
    )
    own = g[seeds.gather(1, near), torch.arange(n, device=g.device)]  # (R, n) seed cosines
    a = _repair_empty(near, own, _spherical_residual(own, w), k)
    a, alpha, own = _lloyd(g, w, k, a, iters, spherical=True)
    obj = _spherical_residual(own, w).sum(dim=1)  # (R,) float64
    if refine > 0:
        a, alpha, obj = _refine(g, w, k, a, alpha, obj, refine)
    best = int(torch.argmin(obj))
    return GramClustering(a[best].clone(), alpha[best].clone(), float(obj[best]))


def spherical_kmeans(
    directions: Tensor,
    weights: Tensor,
    k: int,
    *,
    generator: torch.Generator,
    restarts: int = 4,
    iters: int = 100,
    refine: int = 0,
    gram: Tensor | None = None,
) -> Clustering:
    """Weighted spherical k-means of unit directions (spec section 4, steps 2 and refinement).

    Seeding: greedy k-means++ on 1 - cos (:func:`_greedy_cosine_seeds`: 2 + ln k candidates
    per seed ~ weights * min dissimilarity, the one lowering the weighted potential most is
    kept; for k > 128 up to min(16, k / 32) seeds per step, from disjoint slices of the
    sampling mass, a winner yielding to a more similar winner of its step); each
    unit starts in its nearest seed's cluster. Lloyd: assign argmax cos, update
    u_k = normalize(sum_{i in C_k} m_i d_i).
    Empty clusters take the units of largest residual. Restarts are compared by sum_i r_i,
    r_i = m_i sin(theta_i) (m_i if cos < 0): the P5 certificate without rho and output norms.
    ``refine`` > 0 adds eigenvector/reassignment rounds that keep the best state, so it never
    returns a worse objective. ``gram`` may be the precomputed directions @ directions.T
    (default: :func:`gram_matrix`, float32 for large float64 inputs). k >= n: every unit its
    own cluster. The centroids are combined and normalised in the directions' dtype.
    """
    d = _as_matrix(directions, "directions")
    n = d.shape[0]
    w = _as_weights(weights, n, d)
    k = _check_k(k)
    _check_counts(restarts, iters, refine)
    if gram is not None:
        gram = _check_gram(gram, d)
    if k >= n:
        return Clustering(torch.arange(n, device=d.device), d.clone(), 0.0)
    g = gram_matrix(d) if gram is None else gram  # (n, n)
    res = spherical_kmeans_gram(
        g, w, k, generator=generator, restarts=restarts, iters=iters, refine=refine
    )
    u = _combine(d, res.assignment, res.coefficients, k)  # (K, d)
    u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min(torch.finfo(d.dtype).tiny)
    return Clustering(res.assignment, u, res.objective)


# --------------------------------------------------------------------------------------------
# Euclidean k-means in Gram space
# --------------------------------------------------------------------------------------------


def kmeans(
    points: Tensor,
    k: int,
    *,
    generator: torch.Generator,
    restarts: int = 4,
    iters: int = 100,
    weights: Tensor | None = None,
    gram: Tensor | None = None,
) -> Clustering:
    """(Weighted) Euclidean k-means: k-means++ (D^2) seeding, Lloyd, best of ``restarts``.

    Objective = sum_i w_i ||x_i - c_{a(i)}||^2 (inertia). Empty clusters take the points of
    largest weighted squared distance. Works in Gram space on the centred points (one
    :func:`gram_matrix` product of ``points`` minus their mean, float32 for large float64
    inputs; a given ``gram`` = points @ points.T is double-centred instead; distances are
    translation invariant). Centroids are the weighted means (plain means inside clusters of
    total weight 0), combined in the points' dtype.
    """
    x = _as_matrix(points, "points")
    n = x.shape[0]
    w = _as_weights(weights, n, x)
    k = _check_k(k)
    _check_counts(restarts, iters)
    if gram is not None:
        gram = _check_gram(gram, x)
    if k >= n:
        return Clustering(torch.arange(n, device=x.device), x.clone(), 0.0)
    if gram is None:
        g = gram_matrix(x, center=x.mean(dim=0))  # (n, n)
    else:
        row = gram.mean(dim=1)
        g = gram - row[:, None] - row[None, :] + row.mean()  # (n, n) double-centred
    res = kmeans_gram(g, k, generator=generator, restarts=restarts, iters=iters, weights=w)
    total = _cluster_sum(res.coefficients[None], res.assignment[None], k)[0]  # (K,)
    centers = _combine(x, res.assignment, res.coefficients, k) / total.to(x.dtype)[:, None]
    return Clustering(res.assignment, centers, res.objective)


def kmeans_gram(
    gram: Tensor,
    k: int,
    *,
    generator: torch.Generator,
    restarts: int = 4,
    iters: int = 100,
    weights: Tensor | None = None,
) -> GramClustering:
    """The work of :func:`kmeans` from the Gram matrix of the *centred* points alone (see
    :func:`gram_of_chunks`), for callers that never need the points in one matrix.

    Centroid c is sum_{a(i)=c} coefficients_i x_i / sum_{a(i)=c} coefficients_i (the
    weighted mean; coefficients are the weights, or 1 inside clusters of total weight 0).
    The same random draws as :func:`kmeans`, so both give the same clustering of the same
    points. k >= n: every point its own cluster.
    """
    g = _check_square(gram)
    n = g.shape[0]
    w = _as_weights(weights, n, g).to(g.dtype)
    k = _check_k(k)
    _check_counts(restarts, iters)
    if k >= n:
        return GramClustering(torch.arange(n, device=g.device), torch.ones_like(w), 0.0)
    uniforms = torch.rand(
        restarts, k, generator=generator, dtype=torch.float64, device=generator.device
    ).to(g.device)  # (R, k)
    diag = g.diagonal()
    eps16 = 16 * _eps(g.dtype)

    def dissimilarity(idx: Tensor) -> Tensor:
        ds = diag.index_select(0, idx)[:, None]  # (R, 1)
        dis = (diag[None, :] + ds - 2 * g.index_select(0, idx)).double()  # (R, n)
        floor = eps16 * (diag[None, :] + ds).abs().double()
        return dis.masked_fill(dis <= floor, 0.0)

    seeds, near = _kpp_seeds(w, k, uniforms, dissimilarity, nearest=True)
    s = seeds.gather(1, near)  # (R, n) each unit's nearest seed
    own = 2 * g[s, torch.arange(n, device=g.device)] - diag[s] - diag  # -||x_j - x_s||^2
    a = _repair_empty(near, own, _euclidean_residual(own, w), k)
    a, alpha, own = _lloyd(g, w, k, a, iters, spherical=False)
    obj = _euclidean_residual(own, w).sum(dim=1)  # (R,) float64
    best = int(torch.argmin(obj))
    return GramClustering(a[best].clone(), alpha[best].clone(), float(obj[best]))


# --------------------------------------------------------------------------------------------
# Ward
# --------------------------------------------------------------------------------------------


def _ward_linkage(points: Tensor):
    """scipy Ward linkage matrix of the rows of ``points``.

    scipy's own distance pass (``pdist``) is a plain loop; the pairwise Euclidean distances
    come instead from one float64 Gram product of the centred points (symmetric strips,
    column chunks: no float64 copy of the points), as scipy's condensed matrix.
    """
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    x = _as_matrix(points, "points").detach()
    n = x.shape[0]
    center = x.mean(dim=0)
    step = _row_step(n, 8)
    chunks = (
        x[:, s : s + step].double() - center[s : s + step].double()
        for s in range(0, x.shape[1], step)
    )
    g = gram_of_chunks(chunks, n, torch.float64, x.device)
    sq = g.diagonal().clone()
    dist = g.mul_(-2.0).add_(sq[:, None]).add_(sq[None, :]).clamp_(min=0.0).sqrt_()
    dist.fill_diagonal_(0.0)
    return linkage(squareform(dist.cpu().numpy(), checks=False), method="ward")


def _relabel(labels, device: torch.device) -> Tensor:
    """Map arbitrary labels to 0..K-1 (ordered by label value) as a long tensor."""
    import numpy as np

    _, inverse = np.unique(np.asarray(labels).reshape(-1), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long, device=device)


def ward(points: Tensor, k: int) -> Tensor:
    """Ward agglomerative clustering into exactly k clusters: (n,) long labels 0..k-1.

    The tree is cut after n - k merges (as scipy's ``cut_tree``), so ties in merge heights
    (e.g. duplicate points) cannot change the count. k >= n: identity labels.
    """
    x = _as_matrix(points, "points")
    k = _check_k(k)
    n = x.shape[0]
    if k >= n:
        return torch.arange(n, device=x.device)
    return torch.as_tensor(_cut(_ward_linkage(x), k), dtype=torch.long, device=x.device)


def _cut(z, k: int):
    """Labels (n,) after the first n - k merges of linkage ``z``: the same as scipy's
    ``cut_tree(z, n_clusters=k)`` (clusters numbered by their smallest member), without its
    Python loop over the merges: each node's parent, then pointer jumping to the roots."""
    import numpy as np

    n = z.shape[0] + 1
    parent = np.arange(2 * n - 1)
    merged = z[: n - k, :2].astype(np.int64)  # (n - k, 2) children of nodes n .. 2n - k - 1
    parent[merged[:, 0]] = parent[merged[:, 1]] = n + np.arange(n - k)
    root = parent[:n]
    while True:
        up = parent[root]
        if np.array_equal(up, root):
            break
        root = up
    first = np.full(2 * n - 1, n, dtype=np.int64)
    np.minimum.at(first, root, np.arange(n))  # smallest member of each cluster
    return np.unique(first[root], return_inverse=True)[1].reshape(-1)


def ward_threshold(points: Tensor, threshold: float) -> Tensor:
    """Ward clustering cut at linkage distance ``threshold`` (scipy fcluster 'distance').

    Returns (n,) long labels relabelled to 0..K-1.
    """
    from scipy.cluster.hierarchy import fcluster

    x = _as_matrix(points, "points")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be finite and >= 0, got {threshold}")
    n = x.shape[0]
    if n <= 1:
        return torch.zeros(n, dtype=torch.long, device=x.device)
    return _relabel(fcluster(_ward_linkage(x), t=threshold, criterion="distance"), x.device)
