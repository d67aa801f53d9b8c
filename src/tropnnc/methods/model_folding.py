"""Model Folding (Wang, Sikic, Thiele, Saukh, ICLR 2025), data-free, without fine-tuning.

"Forget the Data and Fine-Tuning! Just Fold the Network to Compress". Our own implementation
of what the paper and its public code (nanguoyu/model-folding-universal,
marza96/ModelFolding) do for one producer -> ReLU -> consumer block:

1. Features per unit (the code's ``concat_weights``): every parameter that has the unit's
   channel axis, i.e. the producer's row (weights and bias; here BatchNorm is already
   folded in, as the code does with ``fuse_bnorms_*`` before folding VGG) concatenated with
   the consumer's input slices of that unit (``features="both"``, default; ``"producer"``
   drops the consumer part). ``normalize``: per-feature robust scaling (median / IQR, as
   sklearn's RobustScaler) before clustering; the code turns it on exactly in its
   data-free "approximate REPAIR" mode, so the default (None) follows ``approx_repair``.
   The code's PCA to n components is a rotation of n points (distances unchanged), so it
   is omitted.
2. Clustering: Euclidean k-means into k clusters (the paper's k-means; the code uses
   Hartigan k-means (``hkmeans``) or Ward agglomerative clustering; ours is k-means++ seeding
   and Lloyd iterations with ``restarts``, from :func:`tropnnc.cluster.kmeans`).
3. Merge ("fold"): the merged producer row is the cluster mean of the members' rows, the
   merged consumer slice the sum of theirs (``(M M^T)^-1 M W`` and ``M W_next`` in the
   code). In the library's share form: shares lambda_i = 1, so the library's merge certificate
   (the bound it reports for any share-form merge) applies.
4. Data-free REPAIR (``approx_repair=True``, the paper's Fold-AR): the mean row's output
   z~ = mean_i z_i has a smaller variance than its members'. With the correlation of two
   units' pre-activations approximated by the cosine similarity of their incoming weights
   (inputs uncorrelated with equal variance), Var z~ = (1/n_c^2) sum_ij rho_ij s_i s_j. The
   row is rescaled about its mean so that its predicted std is the members' average std
   and its mean is the members' average mean: row' = a row + (1 - a) mbar e_bias,
   a = mean(s_i) / sqrt(Var z~). With BatchNorm statistics, s_i = |gamma_i| and
   mbar = mean(beta_i) (the folded pre-activation's mean); without them, s_i = ||w_i||
   (weights, bias excluded) and mbar = 0, i.e. the whole row is scaled, which is what the
   code's fused-BN path does.

Differences from the code where it was unclear or does not apply: the code's correlation
is the mean pairwise cosine of the members' full concatenated parameter vectors (including
the consumer slices) plugged into sqrt(n_c / (1 + (n_c - 1) mean_corr)), which assumes equal
member variances; we use the incoming weights and the members' own stds (equal to the
code's factor when the stds are equal and the features are the incoming weights). The code
resets BatchNorm's running mean/var to 0/1 and scales gamma, so the mean is not matched;
with BN statistics we keep the mean (mbar). Residual-stream channels (folded jointly across
a ResNet stage in the code) are left alone, like every method of this library.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..block import Block, Merge, merge_by_shares
from ..cluster import combine_rows, kmeans_gram
from . import register
from ._base import Method
from ._features import centred_feature_gram

FEATURES = ("both", "producer")


@register
class ModelFolding(Method):
    """k-means on the units' parameters, cluster-mean rows, summed slices, data-free REPAIR."""

    name = "model-folding"

    def __init__(
        self,
        *,
        features: str = "both",
        normalize: bool | None = None,
        approx_repair: bool = True,
        restarts: int = 4,
        iters: int = 100,
    ) -> None:
        self.features = features
        self.normalize = normalize
        self.approx_repair = approx_repair
        self.restarts = restarts
        self.iters = iters
        if features not in FEATURES:
            raise ValueError(f"model-folding: features must be one of {FEATURES}, got {features!r}")

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        normalize = self.approx_repair if self.normalize is None else self.normalize
        gram = centred_feature_gram(
            block, with_out=self.features == "both", transform=robust_scale if normalize else None
        )
        clustering = kmeans_gram(
            gram, k, generator=generator, restarts=self.restarts, iters=self.iters
        )
        a = clustering.assignment
        rows = cluster_means(block.weight, a, k)
        if self.approx_repair:
            rows = fold_repair(block, a, rows)
        shares = torch.ones(block.n, dtype=block.weight.dtype, device=block.weight.device)
        return merge_by_shares(block, a, shares, rows)


def robust_scale(x: Tensor) -> Tensor:
    """Per column: (x - median) / IQR (IQR 0 -> 1), as sklearn's RobustScaler."""
    q = torch.quantile(
        x, torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype, device=x.device), dim=0
    )  # (3, D)
    iqr = q[2] - q[0]
    return (x - q[1]) / torch.where(iqr > 0, iqr, torch.ones_like(iqr))


def cluster_means(values: Tensor, assignment: Tensor, k: int) -> Tensor:
    """Mean (k, D) of ``values`` (n, D) over each cluster (0 for an empty cluster)."""
    sums = torch.zeros((k, values.shape[1]), dtype=values.dtype, device=values.device).index_add_(
        0, assignment, values
    )
    return sums / _counts(assignment, k, values.dtype).clamp(min=1)[:, None]


def _counts(assignment: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """Cluster sizes (k,) in ``dtype``."""
    return torch.bincount(assignment, minlength=k).to(dtype)


def fold_repair(block: Block, assignment: Tensor, rows: Tensor) -> Tensor:
    """Fold-AR: rescale each mean row about its mean so its predicted std is the members'.

    Predicted Var of the mean row's output: (1/n_c^2) sum_ij cos(a_i, a_j) s_i s_j with a_i
    the incoming weights (bias excluded); target std mean(s_i); see the module docstring.
    The double sum is ||sum_i s_i a_i / ||a_i||| ^2, so every cluster's prediction comes
    from one pass over the rows (no per-cluster Gram block). A channel group's joined rows
    are repaired member by member (each layer's columns with its own BatchNorm): the
    members read different inputs and each has its own pre-activation statistics.
    """
    if block.members is None:
        return _repair_columns(block.weight, block.bn, assignment, rows)
    out = rows.clone()
    for m in block.members:
        part = slice(m.start, m.stop)
        out[:, part] = _repair_columns(block.weight[:, part], m.bn, assignment, rows[:, part])
    return out


def _repair_columns(
    weight: Tensor, bn: dict[str, Tensor] | None, assignment: Tensor, rows: Tensor
) -> Tensor:
    """:func:`fold_repair` for one layer: ``weight`` its (n, d+1) rows (bias last), ``bn``
    its BatchNorm statistics or None, ``rows`` the (k, d+1) cluster means."""
    a_in = weight[:, :-1]
    k = rows.shape[0]
    if bn is not None:
        var = bn["running_var"].clamp(min=0)
        s = bn["weight"].abs() * (var / (var + bn["eps"])).sqrt()
        mu = bn["bias"]
    else:
        s = torch.linalg.vector_norm(a_in, dim=1)
        mu = torch.zeros_like(s)
    s, mu = s.to(rows.dtype), mu.to(rows.dtype)
    norms = torch.linalg.vector_norm(a_in, dim=1)
    coef = torch.where(norms > 0, s / norms.clamp(min=torch.finfo(norms.dtype).tiny), 0.0)
    counts = _counts(assignment, k, rows.dtype)
    size = counts.clamp(min=1)
    direction_sum = combine_rows(a_in, assignment, coef.to(a_in.dtype), k)  # (k, d)
    pred = torch.linalg.vector_norm(direction_sum, dim=1).to(rows.dtype) / size
    target = (
        torch.zeros(k, dtype=rows.dtype, device=rows.device).index_add_(0, assignment, s) / size
    )
    mbar = torch.zeros(k, dtype=rows.dtype, device=rows.device).index_add_(0, assignment, mu) / size
    ok = (counts >= 2) & (pred > 0) & (target > 0)
    scale = torch.where(ok, target / torch.where(ok, pred, 1.0), 1.0)
    out = rows * scale[:, None]
    out[:, -1] += (1.0 - scale) * mbar
    return out
