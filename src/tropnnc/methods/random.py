"""Random pruning: keep a seeded, uniformly random subset of units."""

from __future__ import annotations

import torch

from ..block import Block, Merge, select
from . import register
from ._base import Method


@register
class RandomPruning(Method):
    """Keep k units drawn uniformly without replacement; the rest are dropped."""

    name = "random"

    def __init__(self) -> None:
        pass

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        kept = torch.randperm(block.n, generator=generator)[:k].sort().values
        return select(block, kept)
