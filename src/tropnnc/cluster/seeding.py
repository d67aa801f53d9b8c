"""Greedy k-means++ seeding (cosine) and plain k-means++ seeding, batched over restarts.

Each seeder also returns every unit's nearest seed, which is the initial assignment. Every
random number comes from uniforms drawn up front: row r drives restart r by inverse-CDF
sampling, so a restart's seeds do not depend on how many restarts run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

_GREEDY_EXACT_WORK = 1 << 26  # greedy seeding: exact gains while trials*n*k fits (per restart)
_GREEDY_NEIGHBOURS = 32  # otherwise gains over each candidate's nearest units only
# greedy seeding takes one seed per step up to k = _GREEDY_ONE_PER_STEP clusters, else up to
# min(_GREEDY_MAX_PER_STEP, k // _GREEDY_SEEDS_PER_EXTRA) per step: fewer steps of its loop
# of small ops (a step with several seeds costs 2-8x a one-seed step; benchmarks/README.md)
_GREEDY_ONE_PER_STEP = 128
_GREEDY_SEEDS_PER_EXTRA = 32
_GREEDY_MAX_PER_STEP = 16


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
