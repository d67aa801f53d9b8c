"""The common interface of every compression method: a block in, a merge out.

Methods follow scikit-learn's discipline: the constructor only stores options, all work
happens in :meth:`Method.merge`, and every random choice comes from the generator passed in.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch

from ..block import Block, Merge


class Method:
    """Base class. Subclasses set ``name`` and implement :meth:`merge`."""

    name: ClassVar[str] = ""
    #: handles blocks whose consumer has several outputs
    multi_output: ClassVar[bool] = True
    #: reads calibration data (reported as data-driven)
    data_driven: ClassVar[bool] = False

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        """Compress ``block`` (n units, no dead ones) to exactly ``k`` < n units."""
        raise NotImplementedError

    def options(self) -> dict[str, object]:
        """The constructor options as stored (for reports and manifests)."""
        params = inspect.signature(type(self).__init__).parameters
        return {p: getattr(self, p) for p in params if p != "self" and hasattr(self, p)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def is_single_output(block: Block) -> bool:
    """True when every unit has one scalar output weight (m = 1, r = 1)."""
    return tuple(block.out.shape[1:]) == (1, 1)


def split_by_sign(k: int, n_pos: int, n_neg: int) -> tuple[int, int]:
    """Split a width k between the positive and negative units, in proportion to their counts.

    Each non-empty sign gets at least one unit and no more than it has; needs k >= 2 when
    both signs are present.
    """
    n = n_pos + n_neg
    if n_neg == 0:
        return k, 0
    if n_pos == 0:
        return 0, k
    k_pos = round(k * n_pos / n)
    k_pos = min(max(k_pos, 1, k - n_neg), n_pos, k - 1)
    return k_pos, k - k_pos
