"""Neuron Merging (Kim, Kim, Park, Jeon, NeurIPS 2020), data-free, without fine-tuning.

Keep the top-k units by a norm criterion; merge every pruned unit n into the kept unit m
whose incoming vector (weights with bias) is most cosine-similar, when that similarity is at
least ``threshold``: m's output slice gains ||v_n|| / ||v_m|| times n's (a share).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..block import Block, Merge, merge_by_shares
from . import register
from ._base import Method

CRITERIA = ("l1", "l2", "l2-gm")
#: the paper's default similarity thresholds for fully connected and convolutional layers
DEFAULT_THRESHOLD = {"linear": 0.45, "conv": 0.1}


@register
class NeuronMerging(Method):
    """Prune by ``criterion`` and fold pruned units into their most similar kept unit."""

    name = "neuron-merging"

    def __init__(self, *, criterion: str = "l1", threshold: float | None = None) -> None:
        self.criterion = criterion
        self.threshold = threshold

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        if self.criterion not in CRITERIA:
            raise ValueError(f"neuron-merging: criterion must be one of {CRITERIA}, "
                             f"got {self.criterion!r}")
        t = DEFAULT_THRESHOLD[block.kind] if self.threshold is None else self.threshold
        v = block.weight  # (n, d+1) incoming vectors with bias appended
        kept = torch.topk(_scores(v, self.criterion), k).indices.sort().values
        norms = v.norm(dim=1)
        cos = (v @ v[kept].T) / (norms[:, None] * norms[kept][None, :]).clamp(min=1e-300)
        best_cos, best = cos.max(dim=1)  # (n,) most similar kept unit
        assignment = torch.where(best_cos >= t, best, -1)
        shares = torch.where(best_cos >= t, norms / norms[kept][best], 0.0)
        assignment[kept] = torch.arange(k)
        shares[kept] = 1.0
        merge = merge_by_shares(block, assignment, shares, v[kept].clone())
        return Merge(merge.rows, merge.out, merge.assignment, merge.shares, kept)


def _scores(v: Tensor, criterion: str) -> Tensor:
    """Importance of each unit: L1 or L2 norm of its weights (bias excluded), or l2-gm."""
    w = v[:, :-1]
    if criterion == "l1":
        return w.abs().sum(1)
    if criterion == "l2":
        return w.norm(dim=1)
    return torch.cdist(w, w).sum(1)  # geometric-median style: far from the others = important


def bn_merge_terms(bn_n: dict[str, Tensor], bn_m: dict[str, Tensor],
                   s: Tensor) -> tuple[Tensor, Tensor]:
    """Scale S and shift c with BN_n(s z) = S * BN_m(z) + c (the paper's BN-aware merge).

    ``bn_*`` hold ``weight`` (gamma), ``bias`` (beta), ``running_mean`` (mu) and
    ``running_var`` with ``eps``; sigma = sqrt(var + eps). Shapes broadcast.
    """
    sigma_n = (bn_n["running_var"] + bn_n["eps"]).sqrt()
    sigma_m = (bn_m["running_var"] + bn_m["eps"]).sqrt()
    g_n, g_m = bn_n["weight"], bn_m["weight"]
    scale = s * (g_n / g_m) * (sigma_m / sigma_n)
    shift = (g_n / sigma_n) * (s * (bn_m["running_mean"] - sigma_m * bn_m["bias"] / g_m)
                               - bn_n["running_mean"]) + bn_n["bias"]
    return scale, shift
