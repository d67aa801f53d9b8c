"""The unit of compression: one hidden layer seen as producer rows and consumer slices.

A block (spec section 1) is producer -> ReLU -> [channel-wise positively homogeneous ops] ->
consumer. Hidden unit i owns

* ``weight[i]``: its input vector w_i = (incoming weights, bias) in R^{d+1}
  (a conv unit's flattened filter C_in*kh*kw followed by its bias), and
* ``out[i]``: its output slices c_i, shaped (m, r): for each of the consumer's m outputs the
  r weights through which it reads unit i (r = 1 for Linear, kh*kw for Conv2d, H*W for a
  Linear after Flatten).

Every method turns a block into a :class:`Merge`: K new producer rows and K new consumer
slices. Methods whose slices are share-weighted sums of the originals (all data-free ones)
also return the shares, from which :func:`certificate` bounds the output error (spec P5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .tropical import share_bound


@dataclass(frozen=True)
class Block:
    """One hidden layer, in float64, detached from any module.

    ``radius`` bounds the norm of the block's input (a whole input, or one conv patch), so
    every bound holds for ||(x, 1)|| <= rho = sqrt(radius^2 + 1).
    """

    name: str
    weight: Tensor  # (n, d+1) producer rows, bias last
    out: Tensor  # (n, m, r) consumer slices
    consumer_bias: Tensor | None = None  # (m,) unchanged by compression
    radius: float = 1.0
    kind: str = "linear"  # "linear" or "conv" producer
    unit_shape: tuple[int, ...] = ()  # shape of one unit's incoming weights, bias excluded
    # BN statistics per unit when BN was folded (weight, bias, running_mean, running_var, eps)
    # plus 'raw', the unfolded rows (n, d+1)
    bn: dict[str, Tensor] | None = field(default=None, compare=False)
    reads: Tensor | None = field(default=None, compare=False)  # (S, n, r) calibration reads

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def m(self) -> int:
        return self.out.shape[1]

    @property
    def rho(self) -> float:
        return math.sqrt(self.radius**2 + 1.0)

    def out_abs(self) -> Tensor:
        """|c_ji| summed over reads: (n, m) absolute weight of unit i in output j."""
        return self.out.abs().sum(dim=2)

    def subset(self, index: Tensor) -> Block:
        """The block restricted to the units in ``index`` (same outputs)."""
        bn = None if self.bn is None else {k: v[index] for k, v in self.bn.items()}
        reads = None if self.reads is None else self.reads[:, index]
        return replace(self, weight=self.weight[index], out=self.out[index], bn=bn, reads=reads)


@dataclass(frozen=True)
class Merge:
    """A compressed block: ``rows`` (K, d+1) and ``out`` (K, m, r).

    ``assignment[i]`` is the new unit that absorbed original unit i (-1: dropped without
    compensation). ``shares[i] = lambda_i >= 0`` when ``out[k] = sum_{a(i)=k} lambda_i c_i``
    holds exactly; ``shares`` is None for merges not of that form (no certificate then).
    ``kept[k]`` is the original unit that new unit k copies, -1 where it is a true merge.
    """

    rows: Tensor
    out: Tensor
    assignment: Tensor
    shares: Tensor | None
    kept: Tensor | None = None

    @property
    def k(self) -> int:
        return self.rows.shape[0]


def merge_by_shares(block: Block, assignment: Tensor, shares: Tensor, rows: Tensor) -> Merge:
    """Build the merge whose new slices are share-weighted sums: out[k] = sum lambda_i c_i."""
    k = rows.shape[0]
    live = assignment >= 0
    out = torch.zeros((k,) + tuple(block.out.shape[1:]), dtype=block.out.dtype)
    out.index_add_(0, assignment[live], shares[live, None, None] * block.out[live])
    return Merge(rows, out, assignment, shares)


def select(block: Block, kept: Tensor, scale: Tensor | None = None) -> Merge:
    """Keep the units ``kept`` unchanged (optionally scale their slices); drop the rest."""
    n = block.n
    assignment = torch.full((n,), -1, dtype=torch.long)
    assignment[kept] = torch.arange(kept.numel())
    shares = torch.zeros(n, dtype=block.weight.dtype)
    shares[kept] = 1.0 if scale is None else scale.to(shares.dtype)
    merge = merge_by_shares(block, assignment, shares, block.weight[kept].clone())
    certified = scale is None or bool((scale >= 0).all())
    return Merge(merge.rows, merge.out, assignment, shares if certified else None, kept.clone())


def compose(first: Merge, second: Merge) -> Merge:
    """A merge of the original block equal to applying ``first`` then ``second``.

    Shares multiply along the path i -> a1(i) -> a2(a1(i)); the result keeps the exact
    share form, so its certificate is measured against the original units.
    """
    a1 = first.assignment
    live = a1 >= 0
    assignment = torch.full_like(a1, -1)
    assignment[live] = second.assignment[a1[live]]
    shares = None
    if first.shares is not None and second.shares is not None:
        shares = torch.zeros_like(first.shares)
        shares[live] = first.shares[live] * second.shares[a1[live]]
    kept = None
    if first.kept is not None and second.kept is not None:
        kept = torch.where(second.kept >= 0, first.kept[second.kept.clamp(min=0)], -1)
    return Merge(second.rows, second.out, assignment, shares, kept)


def certificate(block: Block, merge: Merge) -> Tensor:
    """Per-output bound (m,) on |y_j - y~_j| over ||(x,1)|| <= rho (spec P5); NaN if unknown."""
    if merge.shares is None:
        return torch.full((block.m,), math.nan, dtype=torch.float64)
    return block.rho * share_bound(block.weight, block.out_abs(), merge.assignment,
                                   merge.shares, merge.rows)
