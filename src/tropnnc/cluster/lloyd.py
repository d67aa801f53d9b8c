"""Lloyd iterations in Gram space: assign every unit to its best centroid, recompute, repeat.

A centroid is a coefficient vector over the points (u_k = sum_{a(i)=k} alpha_i x_i), so a
unit's score against it is a sum of Gram entries: T[k, j] = <x_j, u_k> = sum_{a(i)=k}
alpha_i G[i, j] costs O(|C_k| n), and ||u_k||^2 = sum_{a(i)=k} alpha_i T[k, i]. The cost of a
step depends neither on the points' dimension nor on the number of clusters. :class:`_Lloyd`
runs the spherical and the Euclidean iterations of a chunk of restarts; :func:`_lloyd` runs
all restarts through one reused buffer; :func:`_spherical_step` is one step from given
coefficients, used between the refinement's eigenvector rounds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _memory
from ._checks import _eps
from ._restarts import (
    _cluster_counts,
    _cluster_sum,
    _flat_labels,
    _restart_chunks,
    _scatter_columns,
)
from .degenerate import _one_member, _one_member_per_restart, _repair_empty
from .residual import _euclidean_residual, _spherical_residual


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
        self.step = _memory.rows_per_chunk(n * gram.element_size(), _memory.CHUNK_BYTES)
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
        flat = _flat_labels(a, k)  # (c, n)
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
            step = _memory.rows_per_chunk(c * n * self.gram.element_size(), _memory.CACHE_BYTES)
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
            one = _one_member(am, cid, ji, q, scale, self.eps, among=dirty & (size > 0))
            if one is not None:  # a cluster's sum vanishes: one member's direction
                am = one.alpha
                self.flat.index_copy_(0, one.clusters, self.gram.index_select(0, one.units))
                q[one.clusters] = self.diag[one.units]
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
        flat = _flat_labels(a, self.k)
        cols = torch.arange(n, device=a.device).expand(c, n)
        return self.flat[flat.reshape(-1), cols.reshape(-1)].view(c, n)

    def assign(self, a: Tensor, own: Tensor) -> tuple[Tensor, Tensor]:
        """Argmax reassignment; units within rounding of their best keep their cluster."""
        best = self.scores.amax(dim=1)  # (c, n)
        move = own < best - self.tol
        new_a, new_own = a.clone(), own.clone()
        if not bool(move.any()):
            return new_a, new_own
        step = _memory.rows_per_chunk(self.k * self.gram.element_size(), _memory.CHUNK_BYTES)
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
            dirty[_flat_labels(a, k)[moved]] = True
            dirty[_flat_labels(new_a, k)[moved]] = True
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
        one = _one_member_per_restart(al, ac, k, n2, scale, eps, among=counts > 0)
        if one is not None:  # a cluster's sum vanishes: one member's direction
            al = one.alpha
            t.view(-1, n)[one.clusters] = gram[one.units]
            n2.view(-1)[one.clusters] = diag[one.units]
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
