"""Weighted spherical k-means of unit directions: TropNNC's clustering.

Seeding (:mod:`.seeding`, greedy k-means++ on 1 - cos), Lloyd iterations (:mod:`.lloyd`) and
the optional eigenvector refinement (:mod:`.refine`) all run on the cosine Gram matrix of the
directions. Restarts are compared by the spherical objective sum_i m_i sin(theta_i), theta_i
the angle between unit i and its centroid (m_i when the cosine is negative): the error bound
of a merge in which every unit hands its output slices to its centroid with share
max(0, <w_i, u>), without the input radius and the output weights.

Randomness: every random number comes from the ``torch.Generator`` argument, drawn up front as
one (restarts, k, L) float64 uniform tensor (L seeding trials per seed); row r drives restart
r, so restart r depends only on the first (r + 1) k L draws and a run with more restarts
contains the runs with fewer ones and reaches a lower or equal objective.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import _check_gram_call, _check_points_call, _eps
from .degenerate import _repair_empty
from .gram import _combine, gram_matrix
from .lloyd import _lloyd
from .refine import _refine
from .residual import _spherical_residual
from .results import Clustering, GramClustering
from .seeding import _greedy_cosine_seeds, _greedy_per_step, _local_trials


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
    g, w, k = _check_gram_call(gram, weights, k, (restarts, iters, refine))
    n = g.shape[0]
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
    """Weighted spherical k-means of unit directions, optionally refined by eigenvectors.

    Seeding: greedy k-means++ on 1 - cos (:func:`_greedy_cosine_seeds`: 2 + ln k candidates
    per seed ~ weights * min dissimilarity, the one lowering the weighted potential most is
    kept; for k > 128 up to min(16, k / 32) seeds per step, from disjoint slices of the
    sampling mass, a winner yielding to a more similar winner of its step); each
    unit starts in its nearest seed's cluster. Lloyd: assign argmax cos, update
    u_k = normalize(sum_{i in C_k} m_i d_i).
    Empty clusters take the units of largest residual. Restarts are compared by sum_i r_i,
    r_i = m_i sin(theta_i) (m_i if cos < 0): the merge's certificate without the input
    radius and output norms.
    ``refine`` > 0 adds eigenvector/reassignment rounds that keep the best state, so it never
    returns a worse objective. ``gram`` may be the precomputed directions @ directions.T
    (default: :func:`gram_matrix`, float32 for large float64 inputs). k >= n: every unit its
    own cluster. The centroids are combined and normalised in the directions' dtype.
    """
    counts = (restarts, iters, refine)
    d, w, k, gram = _check_points_call(directions, "directions", weights, k, counts, gram)
    n = d.shape[0]
    if k >= n:
        return Clustering(torch.arange(n, device=d.device), d.clone(), 0.0)
    g = gram_matrix(d) if gram is None else gram  # (n, n)
    res = spherical_kmeans_gram(
        g, w, k, generator=generator, restarts=restarts, iters=iters, refine=refine
    )
    u = _combine(d, res.assignment, res.coefficients, k)  # (K, d)
    u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min(torch.finfo(d.dtype).tiny)
    return Clustering(res.assignment, u, res.objective)
