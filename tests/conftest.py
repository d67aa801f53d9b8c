"""Shared test helpers: random blocks with known structure, and points in the input ball."""

from __future__ import annotations

import torch

from tropnnc.block import Block
from tropnnc.tropical import block_forward


def random_block(
    n: int, d: int, m: int, *, seed: int = 0, reads: int = 1, radius: float = 1.0
) -> Block:
    """A block of n units on R^d with m outputs, weights and biases N(0, 1), mixed signs."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, d + 1, generator=g, dtype=torch.float64)
    out = torch.randn(n, m, reads, generator=g, dtype=torch.float64)
    bias = torch.randn(m, generator=g, dtype=torch.float64)
    return Block("fc", weight, out, bias, radius, "linear", (d,))


def multiples_block(k: int, per: int, d: int, m: int, *, seed: int = 0) -> Block:
    """k distinct directions, each used by ``per`` units at random positive scales."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(k, d + 1, generator=g, dtype=torch.float64)
    scales = torch.rand(k * per, generator=g, dtype=torch.float64) * 2 + 0.1
    weight = dirs.repeat_interleave(per, 0) * scales[:, None]
    perm = torch.randperm(k * per, generator=g)
    out = torch.randn(k * per, m, 1, generator=g, dtype=torch.float64)
    return Block("fc", weight[perm], out, torch.zeros(m, dtype=torch.float64), 1.0, "linear", (d,))


def ball_points(q: int, d: int, radius: float, *, seed: int = 1) -> torch.Tensor:
    """q points in the ball of ``radius`` in R^d: half on the sphere, half inside."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(q, d, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * radius
    x[q // 2 :] *= torch.rand(q - q // 2, 1, generator=g, dtype=torch.float64)
    return x


def forward(block: Block, rows: torch.Tensor, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The block's output (q, m) for single-read blocks."""
    return block_forward(rows, out[:, :, 0], block.consumer_bias, x)
