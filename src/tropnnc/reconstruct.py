"""Data-free reconstruction of the consumer after any merge (docs/expected-error.md).

A merge (from any method) fixes the new units; what the consumer should read from them is a
separate question. Under the block's Gaussian input model (:mod:`tropnnc.moments`) the
consumer slices and bias that minimise the expected squared output error

    E || C a + c0 - C~ a~ - c~ ||^2

are the least-squares solution C~ = C P^T with the k x n projection

    P = (Cov(a~, a~) + lambda I)^-1 Cov(a~, a),    c~ = c0 + C E[a] - C~ E[a~]

(the data-free analogue of refitting the consumer on calibration data: the sample moments
are replaced by the model's). A conv consumer applies the same P at every read position
(the model ignores spatial correlation), so new slices are out~[k] = sum_i P_ki out[i].
``shrink`` blends P with the method's own share-form projection, which limits the damage
where the model is wrong (strong compression). The result carries P, from which
:func:`tropnnc.block.certificate` still gives a proven bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import _memory
from .block import Block, Merge
from .moments import (
    ACTIVATIONS,
    ActivationMoments,
    Gaussian,
    activation_moments,
    bn_unit_stats,
    relu_cross,
    relu_mean,
    unit_model,
)

#: where a block without BatchNorm gets its input model: "chained" carries the modelled
#: activations of the block compressed just before it where it reads them directly (fully
#: connected chains), "local" always uses the isotropic input
INPUT_MODELS = ("chained", "local")


@dataclass(frozen=True)
class Reconstruction:
    """Options of the least-squares reconstruction.

    ``ridge``: lambda relative to the mean variance of the new units; it pulls P toward the
    method's own share-form projection (toward 0 for merges without shares). ``shrink`` in [0, 1]:
    weight of the method's share-form projection in the final one (0: pure least squares).
    ``sigma``: std of the isotropic input of blocks without BatchNorm (None: 1, and
    :func:`tropnnc.compress` sets the input domain's half-width, 0.5 for pixels in [0, 1], for
    blocks that read the network input; docs/expected-error.md). ``samples``: Monte
    Carlo draws (0: closed form for ReLU; other activations always sample). ``bn_shrink``:
    the shrink of blocks whose model comes from BatchNorm statistics (None: ``shrink``).
    ``inputs``: one of :data:`INPUT_MODELS` (docs/expected-error.md, "Chained input models").
    """

    ridge: float = 1e-6
    shrink: float = 0.0
    sigma: float | None = None
    samples: int = 0
    bn_shrink: float | None = None
    inputs: str = "chained"

    def __post_init__(self) -> None:
        for name in ("ridge", "sigma"):
            value = getattr(self, name)
            if value is None and name == "sigma":
                continue
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"reconstruction {name} must be a finite number >= 0, got {value!r}"
                )
        for name in ("shrink", "bn_shrink"):
            value = getattr(self, name)
            if value is None and name == "bn_shrink":
                continue
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"reconstruction {name} must be in [0, 1], got {value!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 0:
            raise ValueError(f"reconstruction samples must be an int >= 0, got {self.samples!r}")
        if self.inputs not in INPUT_MODELS:
            raise ValueError(
                f"reconstruction inputs must be one of {', '.join(INPUT_MODELS)}, "
                f"got {self.inputs!r}"
            )

    @property
    def isotropic_std(self) -> float:
        """The std of the isotropic input model (``sigma``, 1 when None)."""
        return 1.0 if self.sigma is None else self.sigma


def least_squares_projection(
    block: Block,
    merge: Merge,
    options: Reconstruction,
    generator: torch.Generator | None = None,
    inputs: Gaussian | None = None,
) -> tuple[Tensor, ActivationMoments] | str:
    """P (K, n) and the activation moments under the block's input model (``inputs``, or
    isotropic), float64; or the reason (a string) why the model is degenerate."""
    cosine = None if merge.gram is None else merge.gram.cpu()
    model = unit_model(
        block.weight.cpu(),
        block.bn,
        merge.rows.cpu(),
        merge.assignment.cpu(),
        options.isotropic_std,
        inputs if options.inputs == "chained" else None,
        cosine,
    )
    one_call = block.weight.dtype != torch.float64  # float32: no float64 result bits to keep
    moments = activation_moments(model, block.activation, options.samples, generator, one_call)
    cov = moments.new_cov
    scale = float(cov.diagonal().mean())
    if not math.isfinite(scale) or scale <= 0:
        return "the merged units have no variance under the input model"
    lam = max(options.ridge, 1e-12) * scale
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(cov + lam * eye)
    if int(info) != 0:
        return "the merged units' covariance is not positive definite"
    # ridge toward the method's own projection (0 without shares): where that merge is
    # already exact (duplicates, keep = 1) it is also the least-squares optimum, so it stays
    p = torch.cholesky_solve(_ridged_cross(moments.cross, merge, lam), factor)  # (K, n)
    if not bool(torch.isfinite(p).all()):
        return "the least-squares projection is not finite"
    shrink = options.shrink
    if block.bn is not None and options.bn_shrink is not None:
        shrink = options.bn_shrink
    if shrink > 0:
        p = (1.0 - shrink) * p + shrink * _share_projection(merge, cov.shape[0], p.shape[1])
    return p, moments


def _ridged_cross(cross: Tensor, merge: Merge, lam: float) -> Tensor:
    """cross + lam P_share (K, n) without the dense share projection: P_share has one entry
    per column (unit i's own merged unit), added in place to a copy of ``cross`` (adding
    0.0 first turns -0.0 into 0.0 as the dense sum does, so the result is the same bits)."""
    rhs = cross + 0.0  # (K, n)
    if merge.shares is not None:
        assignment = merge.assignment.cpu()
        live = (assignment >= 0).nonzero().squeeze(1)
        own = (assignment[live], live)
        rhs[own] = rhs[own] + lam * merge.shares.cpu()[live].double()
    return rhs


def _share_projection(merge: Merge, k: int, n: int) -> Tensor:
    """The merge's own projection (K, n): P_a(i) i = lambda_i (zeros without shares)."""
    share = torch.zeros(k, n, dtype=torch.float64)
    if merge.shares is not None:
        live = (merge.assignment.cpu() >= 0).nonzero().squeeze(1)
        share[merge.assignment.cpu()[live], live] = merge.shares.cpu()[live].double()
    return share


def reconstruct_merge(
    block: Block,
    merge: Merge,
    options: Reconstruction | None = None,
    generator: torch.Generator | None = None,
    inputs: Gaussian | None = None,
) -> tuple[Merge, str | None, Gaussian | None]:
    """``merge`` with its consumer slices and bias rebuilt by least squares under the
    block's input model (``inputs``: the modelled input of a block without BatchNorm, None:
    isotropic); or the unchanged merge and the reason when the model is degenerate (no
    variance, singular covariance), never NaN. Third: the modelled activations of the merged
    units (mean (K,), covariance (K, K)), the input model of a next block that reads them."""
    options = Reconstruction() if options is None else options
    if merge.k == 0:
        return merge, "no merged units", None
    if block.activation not in ACTIVATIONS:
        return merge, f"no input model for the activation {block.activation!r}", None
    solved = least_squares_projection(block, merge, options, generator, inputs)
    if isinstance(solved, str):
        return merge, solved + ": kept the method's consumer slices", None
    p, moments = solved
    mean, new_mean = moments.mean, moments.new_mean
    out, cbar = _project_slices(block, p)
    # match the consumer's expected output: c~ = c0 + sum_i E a_i cbar_i - sum_k E a~_k cbar~_k
    if block.out.dtype == torch.float64:  # small blocks: the order the result tables used
        delta = cbar.T @ mean - (p @ cbar).T @ new_mean
    else:  # cbar~ = P cbar, so sum_k E a~_k cbar~_k = cbar^T (P^T E a~): no (K, m) product
        delta = cbar.T @ (mean - p.T @ new_mean)
    base = (
        block.consumer_bias.double().cpu()
        if block.consumer_bias is not None
        else torch.zeros(block.m, dtype=torch.float64)
    )
    return (
        replace(
            merge,
            out=out,
            shares=None,
            gram=None,
            projection=p.to(block.weight.device),
            consumer_bias=(base + delta).to(block.weight.device),
        ),
        None,
        Gaussian(new_mean, moments.new_cov),
    )


def _project_slices(block: Block, p: Tensor) -> tuple[Tensor, Tensor]:
    """The new slices out~[k] = sum_i P_ki out[i] (K, m, r) in the slices' dtype, and the
    read-summed old slices cbar (n, m) in float64.

    When ``block.out`` is a view of a consumer weight, the product runs a chunk of consumer
    rows at a time on cache-sized transposed copies, and the result is a permuted view of a
    (m, K, r) tensor in the consumer's layout (adopted by :func:`tropnnc.surgery.apply`
    without a copy), as :func:`tropnnc.block.merge_by_shares` does: no contiguous copy of
    the whole slices (fc6's are 400 MB on VGG-16); an FC consumer (r = 1) is one product
    C P^T in its own layout.
    """
    src = block.out
    n, m, r = src.shape
    k = p.shape[0]
    like = {"dtype": src.dtype, "device": src.device}
    pl = p.to(**like)  # (K, n)
    cols = block._consumer_layout()
    if cols is None:
        flat = src.reshape(n, m * r) if src.is_contiguous() else src.contiguous().view(n, m * r)
        out = (pl @ flat).view(-1, m, r)  # (K, m, r)
        return out, flat.view(n, m, r).sum(dim=2).double().cpu()
    view = cols.view(m, n, r)
    cbar = view.sum(dim=2).T.double().cpu()  # (n, m)
    if r == 1:  # an FC consumer: one product straight into its layout, no transposed copies
        return (cols @ pl.T).view(m, k, 1).permute(1, 0, 2), cbar  # (m, K) = C P^T
    new = torch.empty(m, k, r, **like)  # the consumer's layout
    step = _memory.rows_per_chunk(n * r * src.element_size(), _memory.SLICE_BYTES)
    t = torch.empty(n, min(step, m), r, **like)  # (n, rows, r) transposed chunk
    for s in range(0, m, step):  # consumer-row chunks: (n, rows, r) -> (K, rows, r)
        e = min(m, s + step)
        tc = t[:, : e - s]
        tc.copy_(view[s:e].permute(1, 0, 2))
        new[s:e].copy_((pl @ tc.view(n, (e - s) * r)).view(k, e - s, r).permute(1, 0, 2))
    return new.permute(1, 0, 2), cbar


def reconstruct_reference(
    block: Block,
    merge: Merge,
    options: Reconstruction | None = None,
    inputs: Gaussian | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The least-squares reconstruction written plainly (ReLU, closed form), as an oracle for
    :func:`reconstruct_merge`: new slices (K, m, r), consumer bias (m,) and P (K, n).
    ``inputs``: a modelled block input x ~ N(m, C) (a chained input model)."""
    options = Reconstruction() if options is None else options
    w, b = block.weight[:, :-1].double().cpu(), block.weight[:, -1].double().cpu()  # (n, d), (n,)
    u, e = merge.rows[:, :-1].double().cpu(), merge.rows[:, -1].double().cpu()  # (K, d), (K,)
    n, k, assign = w.shape[0], u.shape[0], merge.assignment.cpu()
    # 1. z = W x + b: mean mu (n,), covariance S (n, n) (BN statistics, or x ~ N(m, C) when
    # given, or x ~ N(0, sigma^2 I))
    mu, S = b, options.isotropic_std**2 * (w @ w.T)
    if block.bn is None and inputs is not None and options.inputs == "chained":
        mu, S = w @ inputs.mean.double() + b, w @ inputs.cov.double() @ w.T
    if block.bn is not None:
        mu, std = (t.double().cpu() for t in bn_unit_stats(block.bn))
        cos = (w @ w.T) / torch.outer(w.norm(dim=1), w.norm(dim=1))
        S = torch.outer(std, std) * cos
    # 2. merged unit c = its members' map: u_c = sum_i A_ci w_i (min-norm), z~ = e + A (z - b)
    A = torch.zeros(k, n, dtype=torch.float64)
    for c in range(k):
        members = (assign == c).nonzero().squeeze(1)
        A[c, members] = torch.linalg.pinv(w[members].T, rtol=1e-10) @ u[c]
    mu_new, S_cross, S_new = e + A @ (mu - b), A @ S, A @ S @ A.T  # (K,), (K, n), (K, K)
    # 3. activation moments E a (n,), E a~ (K,), Cov(a~, a) (K, n), Cov(a~, a~) (K, K)
    s, s_new = S.diagonal().sqrt(), S_new.diagonal().sqrt()
    Ea, Ea_new = relu_mean(mu, s), relu_mean(mu_new, s_new)

    def cov(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor, c12: Tensor) -> Tensor:
        rho = (c12 / torch.outer(s1, s2)).clamp(-1.0, 1.0)
        second = relu_cross(m1[:, None], s1[:, None], m2[None, :], s2[None, :], rho)
        return second - torch.outer(relu_mean(m1, s1), relu_mean(m2, s2))

    C_cross = cov(mu_new, s_new, mu, s, S_cross)
    C_new = cov(mu_new, s_new, mu_new, s_new, S_new)
    # 4. P = (C_new + lam I)^-1 (C_cross + lam P_share), blended toward P_share by the shrink
    share = _share_projection(merge, k, n)
    lam = max(options.ridge, 1e-12) * float(C_new.diagonal().mean())
    P = torch.linalg.solve(C_new + lam * torch.eye(k, dtype=torch.float64), C_cross + lam * share)
    t = options.bn_shrink if block.bn is not None and options.bn_shrink is not None else None
    t = options.shrink if t is None else t
    P = (1.0 - t) * P + t * share
    # 5. slices out~[c] = sum_i P_ci out[i]; bias keeps the expected output (interior reads)
    out = block.out.double().cpu()  # (n, m, r)
    new_out = torch.einsum("cn,nmr->cmr", P, out)
    base = torch.zeros(out.shape[1], dtype=torch.float64)
    if block.consumer_bias is not None:
        base = block.consumer_bias.double().cpu()
    bias = base + out.sum(2).T @ Ea - new_out.sum(2).T @ Ea_new
    return new_out, bias, P
