"""ThiNet (Luo, Wu, Lin, ICCV 2017) without fine-tuning: greedy channel selection on data.

From the calibration reads (``block.reads``, (S, n, r)) sample (sample s, output j) pairs and
record each unit's contribution x_c = sum_r reads[s, c, r] * out[c, j, r]; a row of X sums to
the consumer's output j minus bias. Greedily remove the unit whose removal keeps the summed
removed contribution ||acc + X[:, c]||^2 smallest (through the Gram matrix of X, vectorised
over candidates) until k remain, then fit one scale per kept unit by least squares (float64)
so that X_K s reproduces the full row sums. Negative scales are allowed (no certificate).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..block import Block, Merge, select
from . import register
from ._base import Method


@register
class ThiNet(Method):
    """Options: ``rows`` (about how many (sample, output) pairs to draw; each sample gets
    ceil(rows / S) distinct outputs, at most m), ``ridge`` (0: plain least squares; else a
    relative Tikhonov weight for the scale fit), ``rescale`` (False: keep the selected slices
    unscaled)."""

    name = "thinet"
    data_driven = True

    def __init__(self, *, rows: int = 20000, ridge: float = 0.0, rescale: bool = True) -> None:
        self.rows = rows
        self.ridge = ridge
        self.rescale = rescale
        if rows < 1 or ridge < 0:
            raise ValueError("thinet: rows must be >= 1 and ridge >= 0")

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        if block.reads is None:
            raise ValueError(
                "thinet needs calibration reads on the block: call "
                "tropnnc.compress(..., method='thinet', calibration=<inputs>)"
            )
        if not 1 <= k <= block.n:
            raise ValueError(f"thinet: k must be in 1..{block.n}, got {k}")
        reads = block.reads.to(torch.float64)
        if reads.shape[1:] != (block.n, block.out.shape[2]):
            raise ValueError(
                f"thinet: reads of shape {tuple(reads.shape)} do not match the "
                f"block's {block.n} units with {block.out.shape[2]} reads each"
            )
        x = contributions(reads, block.out.to(torch.float64), self.rows, generator)  # (R, n)
        removed = greedy_removal(x.T @ x, block.n - k)
        keep_mask = torch.ones(block.n, dtype=torch.bool)
        keep_mask[removed] = False
        kept = keep_mask.nonzero().squeeze(1)
        if not self.rescale:
            return select(block, kept)
        return select(block, kept, fit_scales(x, kept, self.ridge))


def contributions(
    reads: Tensor, out: Tensor, rows: int, generator: torch.Generator, chunk: int = 4096
) -> Tensor:
    """X (R, n): per-unit contributions to randomly drawn (sample, output) pairs."""
    s, n, _ = reads.shape
    m = out.shape[1]
    per = min(m, max(1, math.ceil(rows / s)))
    outputs = torch.rand(s, m, generator=generator).argsort(1)[:, :per].reshape(-1)  # (S*per,)
    samples = torch.arange(s).repeat_interleave(per)
    x = torch.empty(samples.numel(), n, dtype=torch.float64)
    for start in range(0, samples.numel(), chunk):  # chunks bound the gathered slices' memory
        sl = slice(start, start + chunk)
        x[sl] = torch.einsum("bcr,cbr->bc", reads[samples[sl]], out[:, outputs[sl]])
    return x


def greedy_removal(gram: Tensor, count: int) -> Tensor:
    """Indices of ``count`` units removed greedily: each step the unit j minimising
    ||acc + x_j||^2 = ||acc||^2 + 2 <acc, x_j> + ||x_j||^2, from the Gram matrix of X."""
    n = gram.shape[0]
    cross = torch.zeros(n, dtype=gram.dtype)  # <acc, x_j>
    diag = gram.diagonal()
    available = torch.ones(n, dtype=torch.bool)
    removed = torch.empty(count, dtype=torch.long)
    for step in range(count):
        score = torch.where(available, 2 * cross + diag, torch.inf)
        j = int(score.argmin())
        removed[step] = j
        available[j] = False
        cross += gram[j]
    return removed


def fit_scales(x: Tensor, kept: Tensor, ridge: float = 0.0) -> Tensor:
    """Least-squares scales s (k,) with X[:, kept] s ~ X.sum(1), in float64.

    ``ridge`` = 0: minimum-norm least squares (SVD based, safe for rank deficiency);
    otherwise normal equations with a Tikhonov term ``ridge`` x the mean squared column norm.
    """
    xk = x[:, kept]
    target = x.sum(1)
    if ridge == 0:
        scale = torch.linalg.lstsq(xk, target[:, None], driver="gelsd").solution[:, 0]
    else:
        gram = xk.T @ xk
        lam = ridge * gram.diagonal().mean().clamp(min=1e-300)
        eye = torch.eye(kept.numel(), dtype=x.dtype)
        scale = torch.linalg.solve(gram + lam * eye, xk.T @ target)
    unused = xk.abs().amax(0) == 0  # a kept unit that never contributes keeps its slice
    return torch.where(unused, torch.ones_like(scale), scale)
