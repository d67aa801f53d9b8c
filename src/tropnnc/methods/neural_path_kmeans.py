"""Neural Path K-means (Misiakos et al., ICLR 2022): the predecessor's multi-output method.

Each unit is the path vector (w_i, c_i); Euclidean k-means clusters them, and a cluster
becomes one unit with the mean input vector and the summed output slices (bound P5b; the
share-form certificate lambda_i = 1 reported by the library is never larger).
"""

from __future__ import annotations

import torch

from ..block import Block, Merge, merge_by_shares
from ..cluster import kmeans
from . import register
from ._base import Method


@register
class NeuralPathKMeans(Method):
    """Euclidean k-means on concatenated (input, output) vectors; mean rows, summed slices."""

    name = "neural-path-kmeans"

    def __init__(self, *, restarts: int = 4, iters: int = 100) -> None:
        self.restarts = restarts
        self.iters = iters

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        paths = torch.cat([block.weight, block.out.flatten(1)], dim=1)  # (n, d+1+m*r)
        clustering = kmeans(paths, k, generator=generator, restarts=self.restarts,
                            iters=self.iters)
        d = block.weight.shape[1]
        rows = clustering.centroids[:, :d]
        shares = torch.ones(block.n, dtype=block.weight.dtype)
        return merge_by_shares(block, clustering.assignment, shares, rows)
