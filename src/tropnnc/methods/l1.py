"""L1-norm pruning (Li et al., ICLR 2017): keep the units with the largest incoming L1 norm."""

from __future__ import annotations

import torch

from ..block import Block, Merge, select
from . import register
from ._base import Method


@register
class L1Pruning(Method):
    """Score each unit by the L1 norm of its incoming weights (bias excluded)."""

    name = "l1"

    def __init__(self) -> None:
        pass

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        scores = block.weight[:, :-1].abs().sum(1)  # (n,)
        kept = torch.topk(scores, k).indices.sort().values
        return select(block, kept)
