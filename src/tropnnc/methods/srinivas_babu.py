"""Data-free parameter pruning (Srinivas & Babu, BMVC 2015).

Saliency of removing unit j into unit i: s_ij = mean(c_j^2) * ||w_i - w_j||^2. Greedily
remove the j of the lowest saliency and add its output slices to i's, updating mean(c_i^2).
"""

from __future__ import annotations

import torch

from ..block import Block, Merge, merge_by_shares
from . import register
from ._base import Method


@register
class SrinivasBabu(Method):
    """Greedy pairwise merging of near-identical input vectors."""

    name = "srinivas-babu"

    def __init__(self) -> None:
        pass

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        n = block.n
        dist = torch.cdist(block.weight, block.weight).pow(2)  # (n, n) ||w_i - w_j||^2
        dist.fill_diagonal_(float("inf"))
        out = block.out.flatten(1).clone()  # (n, m*r) running output slices
        parent = torch.arange(n)
        alive = torch.ones(n, dtype=torch.bool)
        for _ in range(n - k):  # one greedy removal per step; each step is vectorised
            near, partner = dist.min(dim=0)  # best surviving i for every j
            saliency = out.pow(2).mean(1) * near
            saliency[~alive] = float("inf")
            j = int(saliency.argmin())
            i = int(partner[j])
            out[i] += out[j]
            parent[j] = i
            alive[j] = False
            dist[j, :] = float("inf")
            dist[:, j] = float("inf")
        while True:  # follow merge chains to their surviving unit (pointer jumping)
            nxt = parent[parent]
            if torch.equal(nxt, parent):
                break
            parent = nxt
        survivors = alive.nonzero().squeeze(1)
        index = torch.full((n,), -1, dtype=torch.long)
        index[survivors] = torch.arange(k)
        shares = torch.ones(n, dtype=block.weight.dtype)
        merge = merge_by_shares(block, index[parent], shares, block.weight[survivors].clone())
        return Merge(merge.rows, merge.out, merge.assignment, merge.shares, survivors)
