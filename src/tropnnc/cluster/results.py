"""What a clustering returns: labels with centroids in point space, or in Gram space."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


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
    objective: float  # sum_i r_i, the spherical objective (see .residual)
