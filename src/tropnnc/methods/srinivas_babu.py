"""Data-free parameter pruning (Srinivas & Babu, BMVC 2015).

Saliency of removing unit j into unit i: s_ij = mean(c_j^2) * ||w_i - w_j||^2. Greedily
remove the j of the lowest saliency and add its output slices to i's, updating mean(c_i^2).

The greedy removals are sequential, but each step costs O(n + m r), not O(n^2 + n m r):
the squared distances come from one Gram product, every unit's nearest surviving partner
is kept and recomputed only for the units whose partner was just removed (removing a row
can only change the minimum of a column whose minimum it held), and the output slices are
summed only for the units that absorb others.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..block import Block, Merge, merge_by_shares
from ..cluster import gram_matrix
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
        device = block.weight.device
        inf = float("inf")
        dist = squared_distances(block.weight)  # (n, n), inf on the diagonal
        near, partner = dist.min(dim=0)  # best surviving i for every j
        width = block.out[0].numel()
        msq = block.out_norms.to(dist.dtype).square() / width  # mean(c_i^2) of each slice
        saliency = msq * near
        parent = torch.arange(n, device=device)
        running: dict[int, Tensor] = {}  # summed slices of the units that absorbed others
        for _ in range(n - k):  # one greedy removal per step, O(n + m r) each
            j = int(saliency.argmin())
            i = int(partner[j])
            total = _slice(block, running, i) + _slice(block, running, j)
            running[i] = total
            parent[j] = i
            msq[i] = total.square().mean()
            dist[j, :] = inf
            dist[:, j] = inf
            partner[j] = -1  # j no longer matches "partner == j" below
            saliency[j] = inf
            moved = (partner == j).nonzero().squeeze(1)  # units whose nearest was j
            if moved.numel():  # their columns, read as rows (dist is symmetric)
                near[moved], partner[moved] = dist.index_select(0, moved).min(dim=1)
                saliency[moved] = msq[moved] * near[moved]
            saliency[i] = msq[i] * near[i]
        while True:  # follow merge chains to their surviving unit (pointer jumping)
            nxt = parent[parent]
            if torch.equal(nxt, parent):
                break
            parent = nxt
        survivors = (parent == torch.arange(n, device=device)).nonzero().squeeze(1)
        index = torch.full((n,), -1, dtype=torch.long, device=device)
        index[survivors] = torch.arange(k, device=device)
        shares = torch.ones(n, dtype=block.weight.dtype, device=device)
        merge = merge_by_shares(block, index[parent], shares, block.weight[survivors].clone())
        return Merge(merge.rows, merge.out, merge.assignment, merge.shares, survivors)


def squared_distances(rows: Tensor) -> Tensor:
    """||w_i - w_j||^2 (n, n) in the rows' dtype, from one Gram product, exactly symmetric
    (so a column can be read as a row); the diagonal is inf (a unit is not its own
    partner)."""
    sq = torch.linalg.vector_norm(rows, dim=1).square()
    g = gram_matrix(rows, rows.dtype)
    two_g = g + g.T  # 2 G, symmetrised: G_ij + G_ji == G_ji + G_ij
    del g
    dist = sq[:, None] + sq[None, :]  # symmetric as well
    dist.sub_(two_g).clamp_(min=0.0)
    dist.fill_diagonal_(float("inf"))
    return dist


def _slice(block: Block, running: dict[int, Tensor], unit: int) -> Tensor:
    """Unit's current output slices, flattened: its running sum if it absorbed others
    (removed from ``running``; the caller stores the new sum), else its own slices."""
    own = running.pop(unit, None)
    return block.out[unit].reshape(-1) if own is None else own
