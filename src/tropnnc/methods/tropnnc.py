"""TropNNC: merge units whose input vectors point the same way (spec section 4, bound P5).

Each unit is a generator direction d_i = w_i / ||w_i|| with mass m_i = ||w_i|| ||c_i||.
Weighted spherical k-means groups the directions; cluster k becomes one unit of direction
u_k, and member i hands its output slices to it with share lambda_i = max(0, <w_i, u_k>).
The error of output j is then at most rho * sum_i |c_ji| ||w_i - lambda_i u_k||, which is
zero for units that are positive multiples of one another, whatever their output slices.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from ..block import Block, Merge, compose, merge_by_shares
from ..cluster import spherical_kmeans
from . import register
from ._base import Method, is_single_output, split_by_sign

NORMS = ("l1", "l2", "max")


@register
class TropNNC(Method):
    """Multi-output TropNNC, with the sign-split form on single-output blocks.

    Options: ``norm`` of c_i in the mass m_i (l1, l2, max); ``refine`` rank-1 refinement
    iterations; ``steps`` > 1 reaches the width in several re-clusterings; ``split_signs``
    (None = automatic: on for single-output blocks); ``restarts`` and ``iters`` of k-means.
    """

    name = "tropnnc"

    def __init__(self, *, norm: str = "l2", refine: int = 0, steps: int = 1,
                 split_signs: bool | None = None, restarts: int = 4, iters: int = 100) -> None:
        self.norm = norm
        self.refine = refine
        self.steps = steps
        self.split_signs = split_signs
        self.restarts = restarts
        self.iters = iters

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        if self.norm not in NORMS:
            raise ValueError(f"tropnnc: norm must be one of {NORMS}, got {self.norm!r}")
        if self.steps < 1 or self.refine < 0:
            raise ValueError("tropnnc: steps must be >= 1 and refine >= 0")
        split = is_single_output(block) if self.split_signs is None else self.split_signs
        if split and not is_single_output(block):
            raise ValueError(f"tropnnc: split_signs=True needs a single-output block; "
                             f"{block.name!r} has {block.m} outputs")
        merge: Merge | None = None
        current = block
        for width in _step_widths(block.n, k, self.steps):
            step = self._merge_once(current, width, split, generator)
            merge = step if merge is None else compose(merge, step)
            current = replace(block, weight=step.rows, out=step.out, bn=None, reads=None)
        assert merge is not None
        return merge

    def _merge_once(self, block: Block, k: int, split: bool, generator: torch.Generator) -> Merge:
        groups = [(torch.arange(block.n), k)]
        if split:
            pos = block.out[:, 0, 0] > 0  # P's generators; the rest are Q's
            n_pos = int(pos.sum())
            if k >= 2 or n_pos in (0, block.n):  # k = 1 with both signs: one joint cluster
                k_pos, k_neg = split_by_sign(k, n_pos, block.n - n_pos)
                groups = [(pos.nonzero().squeeze(1), k_pos), ((~pos).nonzero().squeeze(1), k_neg)]
        assignment = torch.empty(block.n, dtype=torch.long)
        rows, offset = [], 0
        for idx, width in groups:
            if width == 0:
                continue
            a, u = self._cluster(block.weight[idx], self._mass(block.subset(idx)), width,
                                 generator)
            assignment[idx] = a + offset
            rows.append(u)
            offset += width
        rows_t = torch.cat(rows)  # (k, d+1) unit directions
        shares = (block.weight * rows_t[assignment]).sum(1).clamp(min=0)
        return merge_by_shares(block, assignment, shares, rows_t)

    def _mass(self, block: Block) -> Tensor:
        flat = block.out.flatten(1)  # (n, m*r)
        c_norm = {"l1": lambda: flat.abs().sum(1), "l2": lambda: flat.norm(dim=1),
                  "max": lambda: flat.abs().amax(1)}[self.norm]()
        return block.weight.norm(dim=1) * c_norm

    def _cluster(self, weight: Tensor, mass: Tensor, k: int,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
        norms = weight.norm(dim=1, keepdim=True).clamp(min=torch.finfo(weight.dtype).tiny)
        clustering = spherical_kmeans(weight / norms, mass, k, generator=generator,
                                      restarts=self.restarts, iters=self.iters,
                                      refine=self.refine)
        return clustering.assignment, clustering.centroids


def _step_widths(n: int, k: int, steps: int) -> list[int]:
    """Widths of a geometric schedule from n down to k in ``steps`` re-clusterings."""
    ratio = (k / n) ** (1.0 / steps)
    widths = [max(k, min(n - 1, math.ceil(n * ratio ** (s + 1)))) for s in range(steps - 1)]
    return sorted(set(widths), reverse=True) + [k]
