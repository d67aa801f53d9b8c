"""Weighted Euclidean k-means in Gram space (the baselines' clustering).

k-means++ (D^2) seeding, Lloyd iterations and best of ``restarts`` by inertia, all on the
Gram matrix of the centred points (distances are translation invariant), so callers that
never form the points in one matrix (:func:`tropnnc.methods._features.centred_feature_gram`)
run the same clustering from its Gram alone. Same random draws as :mod:`.spherical`: one
(restarts, k) float64 uniform matrix, row r driving restart r.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import _check_gram_call, _check_points_call, _eps
from ._restarts import _cluster_sum
from .degenerate import _repair_empty
from .gram import _combine, gram_matrix
from .lloyd import _lloyd
from .residual import _euclidean_residual
from .results import Clustering, GramClustering
from .seeding import _kpp_seeds


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
    x, w, k, gram = _check_points_call(points, "points", weights, k, (restarts, iters, 0), gram)
    n = x.shape[0]
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
    g, w, k = _check_gram_call(gram, weights, k, (restarts, iters, 0))
    n = g.shape[0]
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
