"""Gram products and what is read off them without going back to the points.

The one product that reads the points is the Gram matrix G = X X^T (:func:`gram_matrix`:
only the row strips on and above the diagonal are multiplied, in float32 once the product is
large; float64 inputs are converted a column chunk at a time). A merged direction is a
coefficient vector over the points, u_c = sum_{a(i)=c} alpha_i x_i, so its Gram with the
points, its norm and the Gram of the merged directions are all O(k n) or O(n^2) work on G
(:func:`merged_gram`, :func:`member_cosines`); :func:`combine_rows` forms the u_c themselves.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .. import _memory

_FLOAT32_GRAM_MACS = 1 << 27  # float64 Gram products above this many multiply-adds use float32
_GRAM_BLOCK = 512  # row strip of the symmetric Gram product


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
        width = n * max(x.element_size(), torch.finfo(dtype).bits // 8)  # bytes per column
        step = _memory.rows_per_chunk(width, _memory.CHUNK_BYTES)  # columns per chunk
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
    step = _memory.rows_per_chunk(width * mat.element_size(), _memory.CHUNK_BYTES)
    for s in range(0, n, step):
        out.index_add_(0, a[s : s + step], mat[s : s + step] * alpha[s : s + step, None])
    return out


def _combine(points: Tensor, a: Tensor, alpha: Tensor, k: int) -> Tensor:
    """Centroids in point space: U[c] = sum_{i: a[i]=c} alpha_i x_i, (K, d), O(n d)."""
    return combine_rows(points, a, alpha.to(points.dtype), k)
