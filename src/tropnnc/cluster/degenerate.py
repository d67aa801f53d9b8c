"""Clusters that leave nothing to average: empty ones, and ones whose members' sum vanishes.

Two rules, each written once and used by every kernel:

* :func:`_repair_empty`: after a reassignment, an empty cluster takes the unit of largest
  residual (the unit its centroid explains worst) from a cluster that can spare it;
* :func:`_one_member`: a non-empty cluster whose weighted sum of members is zero up to
  rounding (all weights 0, or members that cancel) has no direction; it takes the direction
  of one member instead, the one with the largest index, so the result is deterministic.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._restarts import _cluster_counts, _flat_labels, _gather


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


class OneMember(NamedTuple):
    """The coefficients after :func:`_one_member`, and which clusters fell back to whom."""

    alpha: Tensor  # (M,) the coefficients, a one-hot member in each vanished cluster
    clusters: Tensor  # (D,) the vanished clusters, ascending
    units: Tensor  # (D,) the unit whose direction each of them takes


def _one_member(
    alpha: Tensor,
    cluster: Tensor,
    unit: Tensor,
    norm2: Tensor,
    scale: Tensor,
    eps: float,
    among: Tensor | None = None,
) -> OneMember | None:
    """Fall back to one member's direction in the clusters whose combined vector vanishes.

    A member list: entry e of ``alpha`` (M,) is the coefficient of unit ``unit[e]`` in
    cluster ``cluster[e]`` (C clusters; a unit of -1 is padding that never represents).
    Cluster c's combined vector u_c = sum_e alpha_e x_unit[e] has ||u_c||^2 = ``norm2[c]``
    (C,); it vanishes when that is not above (64 eps ``scale[c]``)^2, ``scale`` (C,) the
    size of what was summed (sum |alpha|, or sum m^2 for an eigenvector). Only the clusters
    in ``among`` (C,) bool are considered (default all; empty clusters must be left out).

    A vanished cluster's coefficients become 1 on its member of largest ``unit`` and 0 on
    the others. Returns None when no cluster vanished, else the new coefficients with the
    vanished clusters and their representatives, so the caller can take the representative's
    Gram row and squared norm (or recompute them from the new coefficients).
    """
    vanished = ~(norm2 > (64 * eps * scale) ** 2)
    if among is not None:
        vanished &= among
    if not bool(vanished.any()):
        return None
    rep = torch.full(norm2.shape, -1, dtype=torch.long, device=cluster.device)  # (C,)
    rep.scatter_reduce_(0, cluster, unit, reduce="amax")
    alpha = torch.where(vanished[cluster], (unit == rep[cluster]).to(alpha.dtype), alpha)
    clusters = vanished.nonzero().squeeze(1)
    return OneMember(alpha, clusters, rep[clusters])


def _one_member_per_restart(
    alpha: Tensor, a: Tensor, k: int, norm2: Tensor, scale: Tensor, eps: float, among: Tensor
) -> OneMember | None:
    """:func:`_one_member` for R restarts: ``alpha`` and assignment ``a`` (R, n), per-cluster
    ``norm2``, ``scale`` and ``among`` (R, K). The returned ``alpha`` is (R, n) and
    ``clusters`` index the flattened (R * K) clusters."""
    r, n = a.shape
    unit = torch.arange(n, device=a.device).repeat(r)  # (R n,) each entry's unit
    one = _one_member(
        alpha.reshape(-1),
        _flat_labels(a, k).reshape(-1),
        unit,
        norm2.reshape(-1),
        scale.reshape(-1),
        eps,
        among.reshape(-1),
    )
    return None if one is None else one._replace(alpha=one.alpha.view(r, n))
