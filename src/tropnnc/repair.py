"""Data-free repair from BatchNorm statistics: keep each consumer output's mean unchanged.

A producer unit followed by BatchNorm (gamma, beta, running mean mu_r, running var v) has,
after folding, the pre-activation z_i = gamma (conv(x) - mu_r) / sqrt(v + eps) + beta, whose
mean over the training distribution is beta_i and whose standard deviation is
|gamma_i| sqrt(v / (v + eps)) ~ |gamma_i|. Modelling z_i as Gaussian N(mu_i, sigma_i^2):

* E[relu(z)] = m Phi(m/s) + s phi(m/s) (:func:`gaussian_relu_mean`);
* a share-form merge puts member i of cluster k at z_i ~ lambda_i <u_k, (x,1)>, so the merged
  unit's pre-activation <u_k, (x,1)> has (estimated) mean sum_i mu_i / sum_i lambda_i and
  standard deviation sum_i sigma_i / sum_i lambda_i: the lambda-weighted average of the
  members' mu_i / lambda_i and sigma_i / lambda_i (:func:`merged_stats`, the formula of the
  issue). :func:`bn_repair` uses :func:`span_stats` instead, which measured better on
  vgg-small (results/repair/README.md): the merged row is written as a combination
  sum_i alpha_i a_i of its members' weights (exact for tropnnc directions and cluster
  means), so its mean sum_i alpha_i (mu_i - b_i) + u_b is exact for any input distribution,
  and its variance is alpha^T C alpha with the members' correlations modelled by the cosine
  of their weights (Model Folding's assumption); a new unit that copies an original unit
  (``merge.kept``) takes that unit's statistics exactly;
* the consumer's output j reads unit i through the weights c_ji (r reads: one for Linear,
  kh*kw for a conv consumer, H*W for a Linear after a flatten); its expected value is
  sum_i E[relu(z_i)] cbar_ji + beta_j with cbar_ji = sum_r c_jir. For a conv consumer this is
  the value at interior positions (all kh*kw reads fall on the feature map; at the border
  zero padding drops some reads). Pooling between the ReLU and the consumer is ignored (exact
  in expectation for average pooling; a max pool raises both means alike).
  :func:`bias_correction` returns delta_j = sum_i E[relu(z_i)] cbar_ji
  - sum_k E[relu(z~_k)] cbar~_jk; adding it to the consumer's bias makes the expected
  consumer pre-activation of the compressed block equal the original's.

Variance (``repair="bn-var"``, :func:`consumer_variance_repair`): before the bias
correction, scale each merged unit's consumer slices (i.e. its shares, so the merge stays in
share form and certified) so that the variance its cluster contributes to the consumer,
summed over outputs, is kept under the same Gaussian/cosine-correlation model.

All functions are pure (float64 tensors in, tensors out); :func:`bn_repair` ties them to a
:class:`~tropnnc.block.Block` and a :class:`~tropnnc.block.Merge`.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from .block import Block, Merge
from .moments import bn_unit_stats
from .moments import relu_mean as gaussian_relu_mean

REPAIRS = (None, "bn", "bn-var")
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _phi_Phi(m: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """t = m/s, phi(t), Phi(t) with s = 0 handled as the limit (t = +-inf)."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    t = torch.where(s > 0, m / safe, torch.where(m > 0, math.inf, -math.inf) * torch.ones_like(m))
    t = torch.where((s <= 0) & (m == 0), torch.zeros_like(m), t)
    phi = torch.exp(-0.5 * t.clamp(-40, 40) ** 2) * _INV_SQRT_2PI
    phi = torch.where(torch.isinf(t), torch.zeros_like(phi), phi)
    big_phi = 0.5 * (1.0 + torch.erf(t / _SQRT2))
    return t, phi, big_phi


def gaussian_relu_var(m: Tensor, s: Tensor) -> Tensor:
    """Var[relu(z)] for z ~ N(m, s^2): (m^2 + s^2) Phi + m s phi - E[relu(z)]^2 (>= 0)."""
    m, s = torch.broadcast_tensors(
        torch.as_tensor(m, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64).abs()
    )
    _, phi, big_phi = _phi_Phi(m, s)
    second = (m * m + s * s) * big_phi + m * s * phi
    mean = m * big_phi + s * phi
    return torch.where(s > 0, (second - mean * mean).clamp(min=0), torch.zeros_like(m))


def merged_stats(
    mu: Tensor,
    sigma: Tensor,
    assignment: Tensor,
    shares: Tensor,
    k: int,
    kept: Tensor | None = None,
    weight: Tensor | None = None,
    rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Estimated mean and std (k,) of each merged unit's pre-activation <u_k, (x,1)>.

    Member i (assignment[i] = k, share lambda_i > 0) has z_i ~ lambda_i <u_k, x>, i.e.
    <u_k, x> ~ z_i / lambda_i; the lambda-weighted average of mu_i / lambda_i is
    sum mu_i / sum lambda_i (likewise for sigma).

    With the members' rows ``weight`` (n, d+1) and the merged ``rows`` (k, d+1) (the
    default of :func:`bn_repair`), the estimate is refined: the merged bias u_b is known
    exactly, and member i = (a_i, b_i) tells the input's mean and std along its direction,
    (mu_i - b_i) / ||a_i|| and sigma_i / ||a_i||; their lambda-weighted averages times
    ||u_w|| give the input part of the merged unit's mean and its std. Both estimates are
    exact when the members are positive multiples of u_k; the refined one is also exact
    for any merge when the input is isotropic with mean 0.

    ``kept[k] >= 0``: unit k copies that original unit, whose statistics are used as they
    are. Clusters whose shares are all 0 get (0, 0) (their consumer slices are 0).
    """
    live = (assignment >= 0) & (shares > 0)
    idx = assignment[live]
    lam = shares[live].double()
    if weight is not None and rows is not None:
        norms = weight[live, :-1].norm(dim=1).double()
        ok_n = norms > 0
        lam = torch.where(ok_n, lam, torch.zeros_like(lam))
        safe_n = torch.where(ok_n, norms, torch.ones_like(norms))
        x_mu = (mu[live].double() - weight[live, -1].double()) / safe_n * lam
        x_sd = sigma[live].double() / safe_n * lam
    else:
        x_mu, x_sd = mu[live].double(), sigma[live].double()
    num_mu = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, x_mu)
    num_sd = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, x_sd)
    den = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, lam)
    ok = den > 0
    safe = torch.where(ok, den, torch.ones_like(den))
    m = torch.where(ok, num_mu / safe, torch.zeros_like(den))
    s = torch.where(ok, num_sd / safe, torch.zeros_like(den))
    if weight is not None and rows is not None:
        u_norm = rows[:, :-1].norm(dim=1).double()
        m = torch.where(ok, m * u_norm + rows[:, -1].double(), torch.zeros_like(m))
        s = s * u_norm
    if kept is not None:
        copy = kept >= 0
        m[copy] = mu[kept[copy]].double()
        s[copy] = sigma[kept[copy]].double()
    return m, s


def span_stats(
    mu: Tensor,
    sigma: Tensor,
    weight: Tensor,
    assignment: Tensor,
    rows: Tensor,
    kept: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and std (k,) of each merged unit's pre-activation, through its members' span.

    Write the merged weights u_w ~ sum_i alpha_i a_i over the cluster's members (least
    squares; exact for cluster means, Model Folding's rescaled means, and tropnnc's
    directions, which all lie in that span). Then E<u, (x,1)> = sum_i alpha_i (mu_i - b_i)
    + u_b, exact whenever the residual is 0 and the BN means are right, whatever the input
    distribution. The variance sum_ij alpha_i alpha_j sigma_i sigma_j rho_ij needs the
    members' correlations, modelled as rho_ij = cos(a_i, a_j) (the correlation of two
    units under uncorrelated inputs of equal variance; Model Folding's assumption).
    ``kept[k] >= 0``: unit k copies that original unit, whose statistics are used as they are.
    """
    k = rows.shape[0]
    m = torch.zeros(k, dtype=torch.float64)
    s = torch.zeros(k, dtype=torch.float64)
    a_all = weight[:, :-1].double()
    norms = a_all.norm(dim=1).clamp(min=torch.finfo(torch.float64).tiny)
    for c in range(k):
        if kept is not None and kept[c] >= 0:
            m[c], s[c] = mu[kept[c]], sigma[kept[c]]
            continue
        idx = (assignment == c).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        a = a_all[idx]  # (n_c, d)
        u = rows[c, :-1].double()
        alpha = torch.linalg.lstsq(a.T, u[:, None], driver="gelsd").solution[:, 0]  # (n_c,)
        m[c] = alpha @ (mu[idx].double() - weight[idx, -1].double()) + rows[c, -1].double()
        cos = (a / norms[idx, None]) @ (a / norms[idx, None]).T
        sd = sigma[idx].double()
        s[c] = (
            (alpha[:, None] * alpha[None, :] * cos * sd[:, None] * sd[None, :])
            .sum()
            .clamp(min=0)
            .sqrt()
        )
    return m, s


def bias_correction(
    out: Tensor, mean_relu: Tensor, new_out: Tensor, new_mean_relu: Tensor
) -> Tensor:
    """delta (m,): sum_i E[relu z_i] cbar_ji - sum_k E[relu z~_k] cbar~_jk.

    ``out`` (n, m, r) and ``new_out`` (K, m, r) are the consumer slices before and after;
    cbar sums them over the r reads (interior positions of a conv consumer).
    """
    before = out.sum(dim=2).T.double() @ mean_relu.double()  # (m,)
    after = new_out.sum(dim=2).T.double() @ new_mean_relu.double()
    return before - after


def bn_repair(block: Block, merge: Merge, variance: bool = False) -> tuple[Merge, str | None]:
    """The merge with its consumer bias corrected from ``block``'s BN statistics.

    ``variance``: first scale each merged unit's consumer slices so that the variance its
    cluster feeds the consumer is kept (:func:`consumer_variance_repair`), then correct the
    bias.
    Returns (merge, None) when repaired, or the unchanged merge and the reason it was not
    (no BatchNorm statistics, or not a share-form merge).
    """
    if block.bn is None:
        return merge, "no BatchNorm statistics on the producer: repair is a no-op"
    if merge.shares is None:
        return merge, "not a share-form merge (no shares): repair is a no-op"
    mu, sigma = bn_unit_stats(block.bn)
    if variance:
        merge = consumer_variance_repair(block, merge, mu, sigma)
    m_new, s_new = span_stats(mu, sigma, block.weight, merge.assignment, merge.rows, merge.kept)
    delta = bias_correction(
        block.out, gaussian_relu_mean(mu, sigma), merge.out, gaussian_relu_mean(m_new, s_new)
    )
    base = (
        block.consumer_bias
        if block.consumer_bias is not None
        else torch.zeros(block.m, dtype=torch.float64)
    )
    return replace(merge, consumer_bias=base.double() + delta), None


def consumer_variance_repair(block: Block, merge: Merge, mu: Tensor, sigma: Tensor) -> Merge:
    """Scale each merged unit's consumer slices (its shares) to keep the cluster's variance.

    Model: corr(relu z_i, relu z_j) ~ cos(a_i, a_j) (incoming weights, bias excluded), so
    the cluster's original contribution to output j has variance
    V_j = sum_{i,i'} cbar_ji cbar_ji' rho_ii' v_i v_i' (v_i = std of relu z_i), the merged
    one (sum_i lambda_i cbar_ji)^2 v~_k^2; one factor t_k per unit matches sum_j V_j.
    Shares become t_k lambda_i (still share form, so the certificate still applies).
    """
    m_new, s_new = span_stats(mu, sigma, block.weight, merge.assignment, merge.rows, merge.kept)
    v = gaussian_relu_var(mu, sigma).sqrt()
    v_new = gaussian_relu_var(m_new, s_new).sqrt()
    a_in = block.weight[:, :-1]
    unit = a_in / a_in.norm(dim=1, keepdim=True).clamp(min=torch.finfo(a_in.dtype).tiny)
    cbar = block.out.sum(dim=2)  # (n, m)
    shares = merge.shares.clone()
    scale = torch.ones(merge.k, dtype=torch.float64)
    for k in range(merge.k):
        idx = ((merge.assignment == k) & (merge.shares > 0)).nonzero().squeeze(1)
        if idx.numel() < 2 or v_new[k] <= 0:
            continue
        g = (unit[idx] @ unit[idx].T).clamp(min=0) * v[idx, None] * v[None, idx]
        c = cbar[idx]  # (n_c, m)
        orig = torch.einsum("im,ij,jm->", c, g, c)
        merged = ((merge.shares[idx, None] * c).sum(0) ** 2).sum() * v_new[k] ** 2
        if orig > 0 and merged > 0:
            scale[k] = (orig / merged).sqrt()
    live = merge.assignment >= 0
    shares[live] = shares[live] * scale[merge.assignment[live]].to(shares.dtype)
    out = merge.out * scale[:, None, None].to(merge.out.dtype)
    return replace(merge, out=out, shares=shares)


def check_repair(repair: object) -> str | None:
    """Validate a ``repair`` option: None, "bn" or "bn-var"."""
    if repair not in REPAIRS:
        raise ValueError(f"repair must be None, 'bn' or 'bn-var', got {repair!r}")
    return repair  # type: ignore[return-value]
