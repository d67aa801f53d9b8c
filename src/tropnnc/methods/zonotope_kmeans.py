"""Zonotope K-means (Misiakos et al., ICLR 2022): the predecessor, single-output only.

The generators g_i = |c_i| w_i of P (c_i > 0) and of Q (c_i < 0) are clustered separately
by Euclidean k-means; each cluster becomes one unit whose hidden row is the cluster mean of
the generators and whose output weight is +/- the cluster size, so the merged generator is
the cluster sum; the paper bounds the error by rho times the k-means distortion
sum_i ||g_i - mean of g over i's cluster||. In share form: lambda_i = 1 / |c_i|, row = mean
generator.
"""

from __future__ import annotations

import torch

from ..block import Block, Merge, merge_by_shares
from ..cluster import kmeans
from . import register
from ._base import Method, is_single_output, split_by_sign


@register
class ZonotopeKMeans(Method):
    """Euclidean k-means on the generators of P and Q, merged by cluster sums."""

    name = "zonotope-kmeans"
    multi_output = False

    def __init__(self, *, restarts: int = 4, iters: int = 100) -> None:
        self.restarts = restarts
        self.iters = iters

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        if not is_single_output(block):
            raise ValueError(
                f"zonotope-kmeans handles single-output blocks only; {block.name!r} feeds "
                f"{block.m} outputs (x {block.out.shape[2]} reads): use 'tropnnc' or "
                "'neural-path-kmeans' for multi-output blocks"
            )
        c = block.out[:, 0, 0]  # (n,)
        gens = c.abs()[:, None] * block.weight  # (n, d+1)
        pos = c > 0
        n_pos = int(pos.sum())
        k_pos, k_neg = split_by_sign(k, n_pos, block.n - n_pos)
        if k < 2 and 0 < n_pos < block.n:
            raise ValueError(
                "zonotope-kmeans needs a width of at least 2 when the block has "
                "both positive and negative output weights"
            )
        assignment = torch.empty(block.n, dtype=torch.long)
        rows, offset = [], 0
        for mask, width in ((pos, k_pos), (~pos, k_neg)):
            if width == 0:
                continue
            idx = mask.nonzero().squeeze(1)
            clustering = kmeans(
                gens[idx], width, generator=generator, restarts=self.restarts, iters=self.iters
            )
            assignment[idx] = clustering.assignment + offset
            rows.append(clustering.centroids)
            offset += width
        return merge_by_shares(block, assignment, 1.0 / c.abs(), torch.cat(rows))
