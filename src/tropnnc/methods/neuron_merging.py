"""Neuron Merging (Kim, Kim, Park, Jeon, NeurIPS 2020), data-free, without fine-tuning.

Keep the top-k units by a norm criterion; merge every pruned unit n into the kept unit m
whose incoming vector (weights with bias) is most cosine-similar, when that similarity is at
least ``threshold``: m's output slice gains ||v_n|| / ||v_m|| times n's (a share).

BN-aware variant (``bn_aware=True``, blocks whose producer has a BatchNorm): the paper keeps
BN and compares the unfolded filters a_i. With z = a_m x, a_n = s a_m (s = ||a_n|| / ||a_m||)
gives BN_n(s z) = S BN_m(z) + c (see :func:`bn_merge_terms`; a raw producer bias b is
absorbed into the BN mean as mu - b), so unit n's folded row is S times m's plus the bias
shift c. Each pruned n goes to the kept m (with S > 0) of lowest
``bn_lambda * cosine distance + (1 - bn_lambda) * |c| / S`` (the last term min-max
normalised over n's candidates), if the cosine similarity clears ``threshold``; its share
is S. Exact (certificate 0) when a_n = s a_m and c = 0.
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
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "eps")


@register
class NeuronMerging(Method):
    """Prune by ``criterion`` and fold pruned units into their most similar kept unit.

    ``bn_aware`` uses the BN-aware score on blocks with a folded BatchNorm (plain merging
    elsewhere); ``bn_lambda`` weighs cosine distance against the BN shift there.
    """

    name = "neuron-merging"

    def __init__(
        self,
        *,
        criterion: str = "l1",
        threshold: float | None = None,
        bn_aware: bool = False,
        bn_lambda: float = 0.85,
    ) -> None:
        self.criterion = criterion
        self.threshold = threshold
        self.bn_aware = bn_aware
        self.bn_lambda = bn_lambda
        if criterion not in CRITERIA:
            raise ValueError(
                f"neuron-merging: criterion must be one of {CRITERIA}, got {criterion!r}"
            )
        if not 0.0 <= bn_lambda <= 1.0:
            raise ValueError(f"neuron-merging: bn_lambda must be in [0, 1], got {bn_lambda}")

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        t = DEFAULT_THRESHOLD[block.kind] if self.threshold is None else self.threshold
        if self.bn_aware and block.bn is not None:
            return self._merge_bn(block, k, t)
        v = block.weight  # (n, d+1) incoming vectors with bias appended
        kept = torch.topk(_scores(v, self.criterion), k).indices.sort().values
        norms = v.norm(dim=1)
        cos = (v @ v[kept].T) / (norms[:, None] * norms[kept][None, :]).clamp(min=1e-300)
        best_cos, best = cos.max(dim=1)  # (n,) most similar kept unit
        assignment = torch.where(best_cos >= t, best, -1)
        shares = torch.where(best_cos >= t, norms / norms[kept][best], 0.0)
        return _finish(block, kept, assignment, shares, v[kept].clone())

    def _merge_bn(self, block: Block, k: int, t: float) -> Merge:
        """The BN-aware merge: score on the unfolded filters, share S on the folded rows."""
        stats = {key: block.bn[key] for key in BN_KEYS}
        raw = block.bn["raw"] if "raw" in block.bn else unfold_rows(block.weight, stats)
        a, b = raw[:, :-1], raw[:, -1]  # raw filters (n, d) and raw biases (n,)
        stats["running_mean"] = stats["running_mean"] - b  # BN(a x + b) = BN'(a x)
        kept = torch.topk(_scores(raw, self.criterion), k).indices.sort().values
        norms = a.norm(dim=1)
        tiny = torch.finfo(a.dtype).tiny
        cos = (a @ a[kept].T) / (norms[:, None] * norms[kept][None, :]).clamp(min=tiny)  # (n, k)
        s = norms[:, None] / norms[kept][None, :].clamp(min=tiny)
        scale, shift = bn_merge_terms(
            {key: v[:, None] for key, v in stats.items()},
            {key: v[kept][None, :] for key, v in stats.items()},
            s,
        )
        valid = (scale > 0) & torch.isfinite(scale) & torch.isfinite(shift)
        inf = torch.tensor(float("inf"), dtype=a.dtype)
        ratio = torch.where(valid, shift.abs() / torch.where(valid, scale, 1.0), inf)
        lo = torch.where(valid, ratio, inf).amin(dim=1, keepdim=True)
        hi = torch.where(valid, ratio, -inf).amax(dim=1, keepdim=True)
        spread = hi - lo
        normalised = torch.where(
            spread > 0, (ratio - lo) / torch.where(spread > 0, spread, 1.0), 0.0
        )
        score = torch.where(
            valid, self.bn_lambda * (1.0 - cos) + (1.0 - self.bn_lambda) * normalised, inf
        )
        best_score, best = score.min(dim=1)  # (n,)
        ok = torch.isfinite(best_score) & (cos.gather(1, best[:, None])[:, 0] >= t)
        assignment = torch.where(ok, best, -1)
        shares = torch.where(ok, scale.gather(1, best[:, None])[:, 0], 0.0)
        return _finish(block, kept, assignment, shares, block.weight[kept].clone())


def _finish(block: Block, kept: Tensor, assignment: Tensor, shares: Tensor, rows: Tensor) -> Merge:
    """Kept units map to themselves with share 1; pruned ones as assigned."""
    assignment = assignment.clone()
    shares = shares.clone()
    assignment[kept] = torch.arange(kept.numel())
    shares[kept] = 1.0
    merge = merge_by_shares(block, assignment, shares, rows)
    return Merge(merge.rows, merge.out, merge.assignment, merge.shares, kept)


def unfold_rows(folded: Tensor, bn: dict[str, Tensor]) -> Tensor:
    """Invert the BN folding W' = s W, b' = s (b - mu) + beta (s = gamma / sigma).

    Rows (n, d+1) with bias last; units with gamma = 0 (constant output) come back as 0.
    """
    s = bn["weight"] / (bn["running_var"] + bn["eps"]).sqrt()
    safe = torch.where(s != 0, s, 1.0)
    w = folded[:, :-1] / safe[:, None]
    b = (folded[:, -1] - bn["bias"]) / safe + bn["running_mean"]
    raw = torch.cat([w, b[:, None]], dim=1)
    return torch.where((s != 0)[:, None], raw, 0.0)


def _scores(v: Tensor, criterion: str) -> Tensor:
    """Importance of each unit: L1 or L2 norm of its weights (bias excluded), or l2-gm."""
    w = v[:, :-1]
    if criterion == "l1":
        return w.abs().sum(1)
    if criterion == "l2":
        return w.norm(dim=1)
    return torch.cdist(w, w).sum(1)  # geometric-median style: far from the others = important


def bn_merge_terms(
    bn_n: dict[str, Tensor], bn_m: dict[str, Tensor], s: Tensor
) -> tuple[Tensor, Tensor]:
    """Scale S and shift c with BN_n(s z) = S * BN_m(z) + c (the paper's BN-aware merge).

    ``bn_*`` hold ``weight`` (gamma), ``bias`` (beta), ``running_mean`` (mu) and
    ``running_var`` with ``eps``; sigma = sqrt(var + eps). Shapes broadcast.
    """
    sigma_n = (bn_n["running_var"] + bn_n["eps"]).sqrt()
    sigma_m = (bn_m["running_var"] + bn_m["eps"]).sqrt()
    g_n, g_m = bn_n["weight"], bn_m["weight"]
    scale = s * (g_n / g_m) * (sigma_m / sigma_n)
    shift = (g_n / sigma_n) * (
        s * (bn_m["running_mean"] - sigma_m * bn_m["bias"] / g_m) - bn_n["running_mean"]
    ) + bn_n["bias"]
    return scale, shift
