"""Residuals: how far each unit lies from its cluster's centroid, the quantity restarts minimise."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import _as_matrix, _as_weights


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
    inputs' dtype, the rest in float64. The spherical objective is the sum of these: the
    error bound of merging every unit into its centroid with share max(0, <w_i, u>), per unit
    of input radius and output weight.
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
