"""CUP: Cluster Pruning (Duggal et al., 2019), without retraining.

A unit's feature is [norms of its incoming kernel slices per input channel (FC: the raw
row)] + [norms of the consumer slices that read it per output (FC: the raw column)],
optionally the bias. Ward clustering cut into exactly k clusters; each cluster keeps its
member of largest feature norm; nothing is merged.

Under a budget CUP picks widths its own way: one Ward linkage per block and one global
threshold on the merge heights for all blocks (:meth:`CUP.own_allocation`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..block import Block, Merge, select
from ..budget import ThresholdRule
from ..cluster import ward
from . import register
from ._base import Method


@register
class CUP(Method):
    """Ward-cluster unit features; keep the largest-norm member of each cluster."""

    name = "cup"

    def __init__(self, *, include_bias: bool = False) -> None:
        self.include_bias = include_bias

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        feats = features(block, self.include_bias)  # (n, f)
        assignment = ward(feats, k)
        norms = feats.norm(dim=1)
        # per cluster, the member with the largest feature norm (scatter-max, no loop)
        best = torch.full((k,), -1.0, dtype=norms.dtype).scatter_reduce(
            0, assignment, norms, reduce="amax"
        )
        is_best = norms == best[assignment]
        first = torch.full((k,), block.n, dtype=torch.long).scatter_reduce(
            0, assignment, torch.where(is_best, torch.arange(block.n), block.n), reduce="amin"
        )
        return select(block, first.sort().values)

    def own_allocation(self) -> ThresholdRule:
        """One global threshold on the Ward merge heights of every block."""
        return ThresholdRule("cup-threshold", self.merge_heights)

    def merge_heights(self, block: Block) -> np.ndarray:
        """The heights at which the block's units merge, ascending: 0 for each dead unit
        (w_i = 0 or c_i = 0), then the Ward linkage heights of the live units' features."""
        from scipy.cluster.hierarchy import linkage

        live = (block.weight.abs().sum(1) > 0) & (block.out.flatten(1).abs().sum(1) > 0)
        idx = live.nonzero().squeeze(1)
        heights = np.zeros(0)
        if idx.numel() > 1:
            feats = features(block.subset(idx), self.include_bias).numpy()
            heights = np.sort(linkage(feats, method="ward")[:, 2])
        return np.concatenate([np.zeros(block.n - idx.numel()), heights])


def features(block: Block, include_bias: bool) -> Tensor:
    """CUP's unit features (n, f): incoming and outgoing weight statistics."""
    n = block.n
    w = block.weight[:, :-1]
    if len(block.unit_shape) > 1:  # conv: norm of each input channel's kernel slice
        w = w.reshape(n, block.unit_shape[0], -1).norm(dim=2)
    out = block.out
    c = out[:, :, 0] if out.shape[2] == 1 else out.norm(dim=2)  # (n, m)
    parts = [w, c] + ([block.weight[:, -1:]] if include_bias else [])
    return torch.cat(parts, dim=1)
