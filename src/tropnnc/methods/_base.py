"""The common interface of every compression method: a block in, a merge out.

Methods follow scikit-learn's discipline: the constructor stores the options and checks
them (a bad option fails once, when the method is made, not once per block), all work
happens in :meth:`Method.merge`, and every random choice comes from the generator passed in.
Everything method-specific lives on the method: the class attributes below tell
:func:`tropnnc.compress` what the method needs, and the two budget hooks say how it weighs
units and whether it has its own way to choose widths (docs/adding-a-method.md).
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch

from ..block import Block, Merge
from ..budget import ThresholdRule


class Method:
    """Base class. Subclasses set ``name``, check their options in ``__init__`` and
    implement :meth:`merge`; the class attributes and hooks below have defaults that suit
    a data-free, multi-output method with no budget rule of its own."""

    name: ClassVar[str] = ""
    #: handles blocks whose consumer has several outputs; False: compress refuses a model
    #: with such a block before any work
    multi_output: ClassVar[bool] = True
    #: reads calibration data (``block.reads``; compress then requires ``calibration=``)
    data_driven: ClassVar[bool] = False
    #: merges blocks on the weights' own device and dtype (e.g. a GPU); False: compress
    #: extracts every block to the CPU first (see :func:`tropnnc.surgery.extract`)
    device_aware: ClassVar[bool] = False

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        """Compress ``block`` (n units, no dead ones) to exactly ``k`` < n units."""
        raise NotImplementedError

    def curve_norm(self) -> str:
        """The norm of a unit's output slices in the unit masses of the certificate curves
        that a budget allocates widths by (:func:`tropnnc.budget.certificate_curve`)."""
        return "l2"

    def own_allocation(self) -> str | ThresholdRule | None:
        """This method's own way to choose widths under a budget (``allocator='method'``,
        and the default when there is one): the name of one of
        :data:`tropnnc.budget.CURVE_ALLOCATORS`, a :class:`tropnnc.budget.ThresholdRule`,
        or None (no rule of its own: budgets then use the ``tropnnc`` curves)."""
        return None

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
