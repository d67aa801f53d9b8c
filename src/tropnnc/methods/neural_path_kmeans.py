"""Neural Path K-means (Misiakos et al., ICLR 2022): the predecessor's multi-output method.

Each unit is the path vector (w_i, c_i); Euclidean k-means clusters them, and a cluster
becomes one unit with the mean input vector and the summed output slices. The paper bounds
output j's error by rho * sum_i (|c_ji| ||w_i - mean(w)|| + ||mean(w)|| |c_ji - mean_j(c)|);
the share-form certificate with lambda_i = 1 that the library reports is never larger. The path
vectors are never concatenated: k-means runs on their centred Gram matrix
(:func:`tropnnc.methods._features.centred_feature_gram`).
"""

from __future__ import annotations

import torch

from ..block import Block, Merge, merge_by_shares
from ..cluster import combine_rows, kmeans_gram
from . import register
from ._base import Method
from ._features import centred_feature_gram


@register
class NeuralPathKMeans(Method):
    """Euclidean k-means on concatenated (input, output) vectors; mean rows, summed slices."""

    name = "neural-path-kmeans"

    def __init__(self, *, restarts: int = 4, iters: int = 100) -> None:
        self.restarts = restarts
        self.iters = iters

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        gram = centred_feature_gram(block, with_out=True)  # of the paths (w_i, c_i)
        clustering = kmeans_gram(
            gram, k, generator=generator, restarts=self.restarts, iters=self.iters
        )
        a, alpha = clustering.assignment, clustering.coefficients.to(block.weight.dtype)
        total = torch.zeros(k, dtype=alpha.dtype, device=alpha.device).index_add_(0, a, alpha)
        rows = combine_rows(block.weight, a, alpha, k) / total[:, None]  # cluster means
        shares = torch.ones(block.n, dtype=block.weight.dtype, device=block.weight.device)
        return merge_by_shares(block, a, shares, rows)
