"""A Gaussian input model of one block, and the moments of its activations under it.

Data-free compression can only be as good as its guess of where the inputs are. This module
makes that guess explicit (docs/expected-error.md): the pre-activations z = W x + b of a
block's units are modelled as jointly Gaussian,

* from the BatchNorm statistics when the producer had BatchNorm: unit i has mean beta_i and
  std |gamma_i| sqrt(v_i / (v_i + eps)) (exact for the training data), and two units are
  correlated like their incoming weights (the correlation of two linear maps of an isotropic
  input): rho_ij = cos(w_i, w_j);
* otherwise from a layer-local isotropic input x ~ N(0, sigma^2 I): mean b_i and covariance
  sigma^2 <w_i, w_j> (bias excluded);
* or, where the block reads the activations of a block compressed just before it (a chain of
  fully connected layers), from those activations' modelled moments x ~ N(mu, S) (a
  :class:`Gaussian` carried forward): mean W mu + b and covariance W S W^T.

A merged unit u_k is modelled as the linear map of its cluster's members that reproduces its
incoming weights: u_k = sum_i alpha_ki w_i, hence z~_k = e_k + sum_i alpha_ki (z_i - b_i).
Originals and merged units then live in one Gaussian model, whatever the method that made
them, and the BN means and stds stay exact.

The second half gives E[act(z)] and E[act(z_i) act(z~_k)]: in closed form for ReLU (the
bivariate normal CDF by Genz's algorithm), by Monte Carlo for any other activation.
All functions are pure: float64 tensors in, tensors out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from . import _memory

_SQRT2 = math.sqrt(2.0)
_TWO_PI = 2.0 * math.pi
_INV_SQRT_2PI = 1.0 / math.sqrt(_TWO_PI)
#: activations with Monte Carlo moments (ReLU also has closed forms)
ACTIVATIONS = {
    "relu": torch.relu,
    "relu6": lambda z: z.clamp(0.0, 6.0),
    "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, 0.01),
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "hardswish": torch.nn.functional.hardswish,
    "identity": lambda z: z,
}


@dataclass(frozen=True)
class UnitModel:
    """Jointly Gaussian pre-activations of a block's n original and k merged units.

    ``mean`` (n,), ``cov`` (n, n): the originals; ``new_mean`` (k,), ``cross`` (k, n) =
    Cov(z~, z), ``new_cov`` (k, k): the merged units. All float64.
    """

    mean: Tensor
    cov: Tensor
    new_mean: Tensor
    cross: Tensor
    new_cov: Tensor
    assignment: Tensor  # (n,) merged unit of each original unit (-1: none)
    coef: Tensor  # (n,) alpha_i: member i's weight in its merged unit's map (0: none)

    def map_new(self, dz: Tensor) -> Tensor:
        """z~ - new_mean (S, k) for centred original pre-activations dz (S, n): A dz."""
        k = self.new_mean.numel()
        return torch.zeros(dz.shape[0], k, dtype=dz.dtype).index_add_(
            1, self.assignment.clamp(min=0), dz * self.coef
        )


@dataclass(frozen=True)
class Gaussian:
    """Mean (d,) and covariance (d, d), float64: a modelled input of a block."""

    mean: Tensor
    cov: Tensor


def weight_gram(weight: Tensor, cosine: Tensor | None = None) -> Tensor:
    """<w_i, w_j> (n, n) of the incoming weights (bias excluded), in float64.

    Computed in the rows' dtype (float32 for large blocks: the one O(n^2 d) product), or,
    when ``cosine`` (the cosines of the full rows (w_i, b_i), bias included, as tropnnc's
    clustering computes them) is given, from it in O(n^2): |r_i| |r_j| cos_ij - b_i b_j.
    The cosine is not used where biases dominate the rows (|b| > 0.9 |r|), since the
    subtraction would then lose the weights' part to rounding.
    """
    if cosine is not None:  # norms in the rows' dtype: no float64 copy of a large block
        norms = torch.linalg.vector_norm(weight, dim=1).double()  # of the full rows
        bias = weight[:, -1].double()
        if bool((bias.abs() <= 0.9 * norms).all()):  # one (n, n) float64 tensor, in place
            g = cosine.to(device=norms.device, dtype=torch.float64, copy=True)
            g.mul_(norms[:, None]).mul_(norms[None, :])
            step = _memory.rows_per_chunk(8 * g.shape[1], _memory.CACHE_BYTES)
            for s in range(0, g.shape[0], step):  # b_i b_j a chunk of rows at a time
                g[s : s + step].sub_(bias[s : s + step, None] * bias[None, :])
            return g
    w = weight[:, :-1]
    return (w @ w.T).double()


def bn_unit_stats(bn: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Mean and std (n,) of each unit's folded pre-activation from its BN statistics.

    mean = beta; std = |gamma| sqrt(v / (v + eps)) (the std of the normalised value is
    sqrt(v / (v + eps)) when v is the true variance; ~ |gamma| for eps << v).
    """
    var = bn["running_var"].clamp(min=0)
    return bn["bias"].clone(), bn["weight"].abs() * (var / (var + bn["eps"])).sqrt()


def block_statistics(
    weight: Tensor,
    bn: dict[str, Tensor] | None,
    sigma: float = 1.0,
    gram: Tensor | None = None,
    inputs: Gaussian | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean (n,) and covariance (n, n) of the pre-activations of rows ``weight`` (n, d+1).

    With ``bn`` (the folded BatchNorm's statistics): mean beta, std |gamma| sqrt(v/(v+eps)),
    correlation the cosine of the incoming weights. Else with ``inputs`` x ~ N(mu, S) (d
    inputs): mean W mu + b, covariance W S W^T. Else an isotropic input N(0, sigma^2 I): mean
    the bias, covariance sigma^2 W W^T. ``gram``: W W^T of the weights (bias excluded) if the
    caller has it. The BN statistics may live on another device than the rows.
    """
    if bn is None and inputs is not None:  # products in the rows' dtype, as weight_gram's
        w = weight[:, :-1]  # (n, d)
        mean = (w @ inputs.mean.to(w.dtype)).double() + weight[:, -1].double()
        return mean, _sandwich(w, inputs.cov)
    g = weight_gram(weight) if gram is None else gram.double()  # (n, n)
    if bn is None:  # (sigma = 1: the Gram itself, no (n, n) copy)
        return weight[:, -1].double().clone(), g if sigma == 1.0 else sigma * sigma * g
    mean, std = (t.to(device=g.device, dtype=torch.float64) for t in bn_unit_stats(bn))
    norms = g.diagonal().clamp(min=0).sqrt()
    scale = torch.where(norms > 0, std / torch.where(norms > 0, norms, 1.0), 0.0)  # s_i/||w_i||
    return mean, scale[:, None] * g * scale[None, :]


#: row blocks of the float32 W S W^T: only the blocks on and above the diagonal are
#: multiplied, (1 + 1 / 8) / 2 of the second product
_SANDWICH_BLOCKS = 8


def _sandwich(w: Tensor, cov: Tensor) -> Tensor:
    """W S W^T (n, n) in float64 for rows ``w`` (n, d) and a symmetric S (d, d), the
    products in the rows' dtype.

    float64 rows (small blocks): the full product, symmetrised. Otherwise (float32, large
    blocks: fc7's chained input model on VGG-16) the second product is taken for the row
    blocks on and above the diagonal only and mirrored, which saves almost half of it; the
    diagonal blocks are symmetrised.
    """
    ws = w @ cov.to(w.dtype)  # (n, d) = W S
    if w.dtype == torch.float64:
        full = ws @ w.T  # (n, n)
        return 0.5 * (full + full.T)
    n = w.shape[0]
    out = torch.empty(n, n, dtype=torch.float64, device=w.device)
    step = max(1, -(-n // _SANDWICH_BLOCKS))
    for s in range(0, n, step):  # row block [s, e): columns s.. only
        e = min(n, s + step)
        out[s:e, s:] = ws[s:e] @ w[s:].T  # (rows, n - s)
        diag = out[s:e, s:e]
        diag.copy_(0.5 * (diag + diag.T))
        out[e:, s:e] = out[s:e, e:].T  # mirror below the diagonal
    return out


def member_maps(
    weight: Tensor,
    rows: Tensor,
    assignment: Tensor,
    k: int,
    gram: Tensor | None = None,
    rcond: float = 1e-10,
) -> Tensor:
    """alpha (n,): merged row k's incoming weights as a combination of its members'.

    For each cluster c (members i with assignment[i] = c) the minimum-norm least-squares
    solution of sum_i alpha_i w_i = u_c (weights, bias excluded), from the members' Gram
    matrix, batched over clusters of similar size (padded to the next power of two). Units
    with assignment -1 get 0.
    """
    n = weight.shape[0]
    alpha = torch.zeros(n, dtype=torch.float64)
    live = (assignment >= 0).nonzero().squeeze(1)
    if live.numel() == 0 or k == 0:
        return alpha
    a = assignment[live]
    order = torch.argsort(a, stable=True)
    members, labels = live[order], a[order]  # members grouped by cluster
    sizes = torch.bincount(labels, minlength=k)
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(members.numel()) - starts[labels]  # position inside its cluster
    g = weight_gram(weight) if gram is None else gram.double()
    rhs = torch.empty(members.numel(), dtype=torch.float64)  # <w_i, u_a(i)>, in row chunks
    step = _memory.rows_per_chunk(8 * weight.shape[1], _memory.CACHE_BYTES)  # 8 bytes an entry
    for start in range(0, members.numel(), step):
        part = slice(start, start + step)
        w, u = weight[members[part], :-1], rows[labels[part], :-1].to(weight.dtype)
        if weight.dtype == torch.float64:
            rhs[part] = (w * u).sum(dim=1)
        else:  # in the rows' dtype, as their Gram (a batched dot: no float64 product copy)
            rhs[part] = torch.einsum("nd,nd->n", w, u).double()
    # clusters batched by size, padded to the next power of two (not to the largest
    # cluster: one big family would make every cluster's eigh as costly as its own)
    width_of = torch.where(sizes > 1, 2 ** torch.ceil(torch.log2(sizes.double())), 1.0).long()
    for width in torch.unique(width_of[sizes > 0]).tolist():
        chosen = ((width_of == width) & (sizes > 0)).nonzero().squeeze(1)  # (c,) clusters
        rank = torch.full((k,), -1, dtype=torch.long)
        rank[chosen] = torch.arange(chosen.numel())
        mine = rank[labels] >= 0  # members of the chosen clusters
        row, col = rank[labels[mine]], slot[mine]
        index = torch.full((chosen.numel(), width), -1, dtype=torch.long)
        index[row, col] = members[mine]  # (c, L) members of each cluster, -1 padding
        valid = index >= 0
        safe = index.clamp(min=0)
        gc = g[safe[:, :, None], safe[:, None, :]] * (valid[:, :, None] & valid[:, None, :])
        b = torch.zeros(chosen.numel(), width, dtype=torch.float64)
        b[row, col] = rhs[mine]
        evals, evecs = torch.linalg.eigh(gc)  # (c, L), (c, L, L): min-norm pseudo-inverse
        cut = rcond * evals.abs().amax(dim=1, keepdim=True)
        inv = torch.where(evals > cut, 1.0 / torch.where(evals > cut, evals, 1.0), 0.0)
        sol = evecs @ (inv * (evecs.transpose(1, 2) @ b[:, :, None]).squeeze(2))[:, :, None]
        alpha[members[mine]] = sol.squeeze(2)[row, col]
    return alpha


def unit_model(
    weight: Tensor,
    bn: dict[str, Tensor] | None,
    rows: Tensor,
    assignment: Tensor,
    sigma: float = 1.0,
    inputs: Gaussian | None = None,
    cosine: Tensor | None = None,
) -> UnitModel:
    """The joint Gaussian model of the original rows ``weight`` (n, d+1) and the merged
    ``rows`` (k, d+1) with the cluster ``assignment`` (n,) (see the module docstring).
    ``inputs``: the modelled input of a block without BatchNorm (None: isotropic);
    ``cosine``: the cosine Gram of the full rows when the merge computed it (saves the
    O(n^2 d) product, see :func:`weight_gram`)."""
    k = rows.shape[0]
    gram = weight_gram(weight, cosine)
    mean, cov = block_statistics(weight, bn, sigma, gram, inputs)
    alpha = member_maps(weight, rows, assignment, k, gram)
    a = assignment.clamp(min=0)
    coef = torch.where(assignment >= 0, alpha, 0.0)
    # z~_k = e_k + sum_i alpha_i (z_i - b_i): linear in the members
    new_mean = rows[:, -1].double().clone().index_add_(0, a, coef * (mean - weight[:, -1].double()))
    n = cov.shape[0]
    cross = torch.zeros(k, n, dtype=torch.float64)  # (k, n) = A S
    new_cov = torch.zeros(k, k, dtype=torch.float64)  # (A S A^T)^T
    # rows gathered (a column index_add is slow on large matrices), a cache-sized chunk of
    # members at a time: no (n, n) scaled copy of S (the sums keep their order)
    step = _memory.rows_per_chunk(8 * max(n, k), _memory.CACHE_BYTES)
    for s in range(0, n, step):
        cross.index_add_(0, a[s : s + step], coef[s : s + step, None] * cov[s : s + step])
    for s in range(0, n, step):
        part = coef[s : s + step, None] * cross[:, s : s + step].T  # (rows, k)
        new_cov.index_add_(0, a[s : s + step], part)
    return UnitModel(mean, cov, new_mean, cross, 0.5 * (new_cov + new_cov.T), assignment, coef)


# ---------------------------------------------------------------------------------------
# ReLU moments in closed form


def _Phi(x: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-x / _SQRT2)


def _phi(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


@lru_cache(maxsize=3)
def _legendre(nodes: int) -> tuple[Tensor, Tensor]:
    x, w = np.polynomial.legendre.leggauss(nodes)
    return torch.from_numpy(x)[:, None], torch.from_numpy(w)[:, None]


#: Genz's bands of |r|: (upper end, Gauss-Legendre nodes) for the asin(r) integral
_BANDS = ((0.3, 6), (0.75, 12), (0.925, 20))


def bvn_upper(h: Tensor, k: Tensor, r: Tensor) -> Tensor:
    """P(X > h, Y > k) for standard bivariate normal (X, Y) with correlation r (broadcast).

    Genz's algorithm (Drezner-Wesolowsky with 6-, 12- or 20-point Gauss-Legendre quadrature
    by |r|, "Numerical computation of rectangular bivariate and trivariate normal and t
    probabilities", 2004): accurate to about 1e-15 for every r in [-1, 1]. Each band of
    |r| is evaluated on its own pairs only (most pairs of a layer need 6 nodes).
    """
    h, k, r = torch.broadcast_tensors(*(torch.as_tensor(t, dtype=torch.float64) for t in (h, k, r)))
    shape = h.shape
    h, k, r = h.reshape(-1), k.reshape(-1), r.reshape(-1).clamp(-1.0, 1.0)
    out = torch.empty_like(h)
    a = r.abs()
    lower = 0.0
    for upper, nodes in _BANDS:
        idx = ((a >= lower) & (a < upper)).nonzero().squeeze(1)
        lower = upper
        if idx.numel():
            out[idx] = _bvn_asin(h[idx], k[idx], r[idx], nodes)
    idx = (a >= _BANDS[-1][0]).nonzero().squeeze(1)
    if idx.numel():
        out[idx] = _bvn_near_one(h[idx], k[idx], r[idx])
    return out.clamp(0.0, 1.0).view(shape)


def _bvn_asin(h: Tensor, k: Tensor, r: Tensor, nodes: int) -> Tensor:
    """Genz's |r| < 0.925 branch: quadrature over asin(r), 1-D tensors."""
    x, w = _legendre(nodes)
    asr = torch.asin(r)
    sn = torch.sin(asr * (x + 1.0) / 2.0)  # (nodes, P)
    val = (w * torch.exp((sn * (h * k) - (h * h + k * k) / 2.0) / (1.0 - sn * sn))).sum(0)
    return val * asr / (2.0 * _TWO_PI) + _Phi(-h) * _Phi(-k)


def _bvn_near_one(h: Tensor, k: Tensor, r: Tensor) -> Tensor:
    """Genz's |r| >= 0.925 branch: the expansion around r = +-1, 1-D tensors."""
    x, w = _legendre(20)
    kk = torch.where(r < 0, -k, k)
    hk2 = h * kk
    one_minus = (1.0 - r.abs()).clamp(min=0.0)
    as_ = one_minus * (2.0 - one_minus)  # (1 - |r|)(1 + |r|)
    a = as_.sqrt()
    bs = (h - kk) ** 2
    c = (4.0 - hk2) / 8.0
    d = (12.0 - hk2) / 16.0
    safe_as = torch.where(as_ > 0, as_, 1.0)
    safe_a = torch.where(a > 0, a, 1.0)
    high = (
        a
        * torch.exp(-(bs / safe_as + hk2) / 2.0)
        * (1.0 - c * (bs - as_) * (1.0 - d * bs / 5.0) / 3.0 + c * d * as_ * as_ / 5.0)
    )
    b = bs.sqrt()
    tail = (
        torch.exp(-hk2 / 2.0)
        * math.sqrt(_TWO_PI)
        * _Phi(-b / safe_a)
        * b
        * (1.0 - c * bs * (1.0 - d * bs / 5.0) / 3.0)
    )
    high = high - torch.where(hk2 > -160.0, tail, 0.0)
    half = a / 2.0
    xs = (half * (x + 1.0)) ** 2  # (20, P)
    rs = (1.0 - xs).sqrt()
    safe_xs = torch.where(xs > 0, xs, 1.0)
    terms = torch.exp(-bs / (2.0 * safe_xs) - hk2 / (1.0 + rs)) / rs - torch.exp(
        -(bs / safe_xs + hk2) / 2.0
    ) * (1.0 + c * xs * (1.0 + d * xs))
    high = high + (half * w * torch.where(xs > 0, terms, 0.0)).sum(0)
    high = torch.where(as_ > 0, -high / _TWO_PI, 0.0)
    pos = high + _Phi(-torch.maximum(h, kk))
    neg = -high + torch.where(kk > h, _Phi(kk) - _Phi(h), 0.0)
    return torch.where(r > 0, pos, neg)


def relu_mean(m: Tensor, s: Tensor) -> Tensor:
    """E[relu(z)] for z ~ N(m, s^2), elementwise (s = 0: relu(m))."""
    m, s = torch.broadcast_tensors(
        torch.as_tensor(m, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64).abs()
    )
    pos = s > 0
    h = m / torch.where(pos, s, 1.0)
    return torch.where(pos, s * (h * _Phi(h) + _phi(h)), m.clamp(min=0))


def relu_second(m: Tensor, s: Tensor) -> Tensor:
    """E[relu(z)^2] for z ~ N(m, s^2)."""
    m, s = torch.broadcast_tensors(m.double(), s.double().abs())
    pos = s > 0
    h = m / torch.where(pos, s, 1.0)
    return torch.where(pos, s * s * ((1 + h * h) * _Phi(h) + h * _phi(h)), m.clamp(min=0) ** 2)


def relu_cross(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor, rho: Tensor) -> Tensor:
    """E[relu(z1) relu(z2)] for jointly Gaussian z1 ~ N(m1, s1^2), z2 ~ N(m2, s2^2) with
    correlation ``rho`` (broadcast). A constant (s = 0) factor is relu(m) times the other's
    mean; |rho| = 1 uses the one-dimensional integral."""
    m1, s1, m2, s2, rho = torch.broadcast_tensors(
        m1.double(), s1.double().abs(), m2.double(), s2.double().abs(), rho.double()
    )
    rho = rho.clamp(-1.0, 1.0)
    both = (s1 > 0) & (s2 > 0)
    t1, t2 = torch.where(both, s1, 1.0), torch.where(both, s2, 1.0)
    h1, h2 = m1 / t1, m2 / t2
    q2 = (1.0 - rho) * (1.0 + rho)
    edge = q2 < 1e-12
    q = torch.where(edge, 1.0, q2).sqrt()
    general = (
        (h1 * h2 + rho) * bvn_upper(-h1, -h2, rho)
        + h1 * _phi(h2) * _Phi((h1 - rho * h2) / q)
        + h2 * _phi(h1) * _Phi((h2 - rho * h1) / q)
        + q
        * _INV_SQRT_2PI
        * _phi(((h1 * h1 - 2 * rho * h1 * h2 + h2 * h2).clamp(min=0)).sqrt() / q)
    )
    # rho = +-1: z2 = m2 + sign * s2 g with z1 = m1 + s1 g; integrate over {z1 > 0, z2 > 0}
    sign = torch.where(rho >= 0, 1.0, -1.0)
    lo = torch.where(sign > 0, torch.maximum(-h1, -h2), -h1)
    hi = torch.where(sign > 0, torch.full_like(h1, math.inf), h2)
    hi = torch.maximum(hi, lo)
    mass = _Phi(hi) - _Phi(lo)
    plo, phi_hi = _phi(lo), torch.where(torch.isinf(hi), 0.0, _phi(hi))
    lo_plo = torch.where(torch.isinf(lo), 0.0, lo * plo)
    hi_phi = torch.where(torch.isinf(hi), 0.0, hi * phi_hi)
    # int (h1 + g)(h2 + sign g) phi over [lo, hi], in units of s1 s2
    degenerate = (
        h1 * h2 * mass + (h1 * sign + h2) * (plo - phi_hi) + sign * (mass + lo_plo - hi_phi)
    )
    value = s1 * s2 * torch.where(edge, degenerate, general)
    const = relu_mean(m1, s1) * relu_mean(m2, s2)  # one of them is a constant
    return torch.where(both, value.clamp(min=0), const)


# ---------------------------------------------------------------------------------------
# Moments of the activations of a UnitModel


@dataclass(frozen=True)
class ActivationMoments:
    """E a (n,), E a~ (k,), Cov(a~, a) (k, n), Cov(a~, a~) (k, k) of a UnitModel."""

    mean: Tensor
    new_mean: Tensor
    cross: Tensor
    new_cov: Tensor


def activation_moments(
    model: UnitModel,
    activation: str = "relu",
    samples: int = 0,
    generator: torch.Generator | None = None,
    one_exact_call: bool = False,
) -> ActivationMoments:
    """Moments of the activations of ``model``'s original and merged units.

    ReLU with ``samples`` = 0: closed forms (``one_exact_call``: see :func:`relu_cov_pairs`).
    Otherwise (any activation in :data:`ACTIVATIONS`) Monte Carlo with ``samples`` draws
    (default max(8192, 4 (n + k))) of z ~ N(mean, cov) and z~ = new_mean + A (z - mean)
    (exact joint sampling).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if activation == "relu" and samples == 0:
        return _relu_moments(model, one_exact_call)
    return _sampled_moments(model, activation, samples, generator)


def _std(cov: Tensor) -> Tensor:
    return cov.diagonal().clamp(min=0).sqrt()


def _corr(cov: Tensor, s_rows: Tensor, s_cols: Tensor) -> Tensor:
    den = s_rows[:, None] * s_cols[None, :]
    return torch.where(den > 0, cov / torch.where(den > 0, den, 1.0), 0.0).clamp(-1.0, 1.0)


def relu_hermite(h: Tensor, terms: int) -> Tensor:
    """Hermite coefficients (terms, len(h)) of relu(h + g), g ~ N(0, 1), h (n,).

    relu(h + g) = sum_j a_j(h) He_j(g) / sqrt(j!) with a_1 = Phi(h) and, for j >= 2,
    a_j = (-1)^j phi(h) He_{j-2}(h) / sqrt(j!) (Stein's lemma twice: the second derivative
    of relu(h + g) is a point mass at g = -h). Rows j = 1..terms; the normalised
    polynomials come from their three-term recurrence. |h| is capped at 40, where phi(h)
    is 0 in float64 and the coefficients vanish anyway.
    """
    h = h.double().clamp(-40.0, 40.0)
    out = torch.empty(terms, h.numel(), dtype=torch.float64)
    if terms == 0:
        return out
    out[0] = _Phi(h)
    density = _phi(h)
    prev, cur = torch.zeros_like(h), torch.ones_like(h)  # He_{m-1}/sqrt((m-1)!), He_m/sqrt(m!)
    for j in range(2, terms + 1):
        m = j - 2
        out[j - 1] = ((-1.0) ** j / math.sqrt(j * (j - 1))) * density * cur
        prev, cur = cur, (h * cur - math.sqrt(m) * prev) / math.sqrt(m + 1)
    return out


#: terms of the Hermite series of the ReLU covariances, and the error allowed for each pair,
#: relative to s1 s2; pairs whose guaranteed error would exceed it use the exact formula
#: (1e-13: the least-squares P then matches the exact formula to ~1e-9 on ill-conditioned
#: blocks, tests/test_reconstruct_reference.py; 1e-10 left 1e-6 there; VGG-16 equally fast)
_SERIES_TERMS = 16
_SERIES_TOL = 1e-13
_SERIES_CHUNK = 1 << 16  # pairs per chunk of the series (fits in a core's cache)


def relu_cov_pairs(
    m1: Tensor,
    s1: Tensor,
    m2: Tensor,
    s2: Tensor,
    cov: Tensor,
    symmetric: bool = False,
    one_exact_call: bool = False,
) -> Tensor:
    """Cov(relu(z1_i), relu(z2_j)) (len(m1), len(m2)) for Gaussian pre-activations with
    means ``m``, stds ``s`` and pair covariances ``cov``. ``symmetric``: the two sides are
    the same units (only the upper triangle is computed; the diagonal is exact).

    With h = m / s and rho the correlation, Mehler's formula gives
    Cov = s1 s2 sum_{j >= 1} a_j(h1) a_j(h2) rho^j (:func:`relu_hermite`), a sum of
    rank-one matrices times powers of rho: J terms cost 2 J elementwise passes instead of
    the bivariate normal CDF of every pair. The tail after J terms is at most
    |rho|^(J+1) sqrt(T1 T2), T = Var(relu(h + g)) - sum_{j<=J} a_j^2 (Cauchy-Schwarz);
    pairs where that exceeds ``_SERIES_TOL`` (in units of s1 s2: strongly correlated
    pairs, typically a merged unit and its own members) get :func:`relu_cross` instead.

    ``one_exact_call``: those pairs of all chunks in one call (VGG-16's fc blocks: 50k pairs
    in 192 chunks, 0.15-0.2 s less each); otherwise one call per chunk, as float64 blocks'
    result tables were made (elementwise kernels round the tail of a vector apart from its body,
    so the grouping moves the last bit).
    """
    terms = _SERIES_TERMS
    m1, s1, m2, s2 = (t.double() for t in (m1, s1.abs(), m2, s2.abs()))
    on1, on2 = s1 > 0, s2 > 0  # units with s = 0 are constants: no covariance
    t1, t2 = torch.where(on1, s1, 1.0), torch.where(on2, s2, 1.0)
    h1, h2 = m1 / t1, m2 / t2
    c1, c2 = relu_hermite(h1, terms), relu_hermite(h2, terms)
    var1 = relu_second(h1, torch.ones_like(h1)) - relu_mean(h1, torch.ones_like(h1)) ** 2
    var2 = relu_second(h2, torch.ones_like(h2)) - relu_mean(h2, torch.ones_like(h2)) ** 2
    # tails of the series; the slack covers the rounding of the subtraction
    tail1 = (var1 - (c1 * c1).sum(0)).clamp(min=0) + 1e-15
    tail2 = (var2 - (c2 * c2).sum(0)).clamp(min=0) + 1e-15
    power = 0.5 / (terms + 1)  # exact iff |rho| > (tol / tail1)^power (tol / tail2)^power
    limit1 = (_SERIES_TOL / tail1) ** power
    limit2 = (_SERIES_TOL / tail2) ** power
    c1 = c1 * torch.where(on1, s1, 0.0)
    c2 = c2 * torch.where(on2, s2, 0.0)
    mu1, mu2 = relu_mean(m1, s1), relu_mean(m2, s2)
    rows, cols = cov.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    step = max(1, _SERIES_CHUNK // max(1, cols))
    found = []  # (rows, cols, rho) of the exact pairs, with one_exact_call
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        first = start if symmetric else 0  # upper triangle (and a little more) only
        r, c = slice(start, stop), slice(first, cols)
        rho = _corr(cov[r, c], s1[r], s2[c])
        acc = torch.outer(c1[terms - 1, r], c2[terms - 1, c])
        for j in range(terms - 2, -1, -1):  # Horner in rho
            acc.mul_(rho).addr_(c1[j, r], c2[j, c])
        acc.mul_(rho)
        exact = (rho.abs() > limit1[r, None] * limit2[None, c]).nonzero()
        if exact.numel():
            i, j = exact[:, 0] + start, exact[:, 1] + first
            pair_rho = rho[exact[:, 0], exact[:, 1]]
            if one_exact_call:
                found.append((i, j, pair_rho))
            else:
                acc[exact[:, 0], exact[:, 1]] = (
                    relu_cross(m1[i], s1[i], m2[j], s2[j], pair_rho) - mu1[i] * mu2[j]
                )
        out[r, c] = acc
    if found:
        i, j, pair_rho = (torch.cat(parts) for parts in zip(*found, strict=True))  # (P,)
        out[i, j] = relu_cross(m1[i], s1[i], m2[j], s2[j], pair_rho) - mu1[i] * mu2[j]
    if symmetric:
        out = out.triu(1)
        out = out + out.T
        out.diagonal().copy_(relu_second(m1, s1) - mu1 * mu1)
    return out


def _relu_moments(model: UnitModel, one_exact_call: bool = False) -> ActivationMoments:
    s = _std(model.cov)
    s_new = _std(model.new_cov)
    mean = relu_mean(model.mean, s)
    new_mean = relu_mean(model.new_mean, s_new)
    one = one_exact_call
    cross = relu_cov_pairs(model.new_mean, s_new, model.mean, s, model.cross, False, one)  # (k, n)
    new_cov = relu_cov_pairs(model.new_mean, s_new, model.new_mean, s_new, model.new_cov, True, one)
    return ActivationMoments(mean, new_mean, cross, new_cov)


def _sampled_moments(
    model: UnitModel, activation: str, samples: int, generator: torch.Generator | None
) -> ActivationMoments:
    n, k = model.mean.numel(), model.new_mean.numel()
    count = samples or max(8192, 4 * (n + k))
    evals, evecs = torch.linalg.eigh(model.cov)
    root = evecs * evals.clamp(min=0).sqrt()  # (n, n): cov = root root^T
    g = torch.randn(count, n, dtype=torch.float64, generator=generator)
    dz = g @ root.T  # (S, n) centred pre-activations
    act = ACTIVATIONS[activation]
    a = act(dz + model.mean)
    dz_new = model.map_new(dz)
    a_new = act(dz_new + model.new_mean)
    mean, new_mean = a.mean(0), a_new.mean(0)
    ac, anc = a - mean, a_new - new_mean
    cross = anc.T @ ac / count
    new_cov = anc.T @ anc / count
    return ActivationMoments(mean, new_mean, cross, 0.5 * (new_cov + new_cov.T))


# ---------------------------------------------------------------------------------------
# Clustering kernel and merged rows from the model


def activation_correlation(
    weight: Tensor, bn: dict[str, Tensor] | None, sigma: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Correlation (n, n) of the units' ReLU activations under the block's model (unit
    diagonal; a unit without variance is uncorrelated with the others) and their stds (n,).

    Two units whose activations are positive multiples of each other have correlation 1,
    so clustering on this kernel groups units by what they compute where the inputs are,
    not by the geometry of their weights alone.
    """
    mean, cov = block_statistics(weight, bn, sigma)
    s = _std(cov)
    act_cov = relu_cov_pairs(mean, s, mean, s, cov, symmetric=True)
    sd = act_cov.diagonal().clamp(min=0).sqrt()
    corr = _corr(act_cov, sd, sd)
    corr.diagonal().fill_(1.0)
    return corr, sd


def moment_rows(
    weight: Tensor, bn: dict[str, Tensor] | None, assignment: Tensor, k: int, sigma: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Merged rows (k, d+1) whose pre-activations keep their members' mean mean and mean std.

    For cluster c: u_bar = mean_i w_i / s_i (unit-variance directions), v_c = Var(u_bar.x)
    = mean_ij rho_ij, u_c = (s_bar / sqrt(v_c)) u_bar and the bias chosen so that the mean
    is m_bar. With BN and the cosine correlation this is Model Folding's data-free repair;
    the model makes it available without BN. Members without variance are left out of the
    direction; a cluster with none keeps the members' mean row. Also returns the shares
    (n,) s_i / s_bar of the members' consumer slices in the merged unit's (1 where s_bar = 0).
    """
    mean, cov = block_statistics(weight, bn, sigma)
    s = _std(cov)
    n = mean.numel()
    live = assignment >= 0
    has = live & (s > 0)
    a = assignment.clamp(min=0)
    inv = torch.where(has, 1.0 / torch.where(s > 0, s, 1.0), 0.0)
    count = torch.zeros(k, dtype=torch.float64).index_add_(0, a, has.double())
    w = weight.double()
    unit = torch.zeros(k, w.shape[1], dtype=torch.float64).index_add_(0, a, w * inv[:, None])
    unit = unit / count.clamp(min=1)[:, None]  # (k, d+1) mean of w_i / s_i (bias included)
    corr = _corr(cov, s, s)
    # v_c = (1/n_c^2) sum_{i,j in c} rho_ij: cluster sums of the correlation matrix
    onehot = torch.zeros(k, n, dtype=torch.float64)
    onehot[a[has], has.nonzero().squeeze(1)] = 1.0
    v = (onehot @ corr @ onehot.T).diagonal() / count.clamp(min=1) ** 2
    s_bar = torch.zeros(k, dtype=torch.float64).index_add_(0, a, torch.where(has, s, 0.0))
    s_bar = s_bar / count.clamp(min=1)
    m_bar = torch.zeros(k, dtype=torch.float64).index_add_(0, a, torch.where(has, mean, 0.0))
    m_bar = m_bar / count.clamp(min=1)
    ok = (count > 0) & (v > 0)
    gain = torch.where(ok, s_bar / torch.where(ok, v, 1.0).sqrt(), 0.0)
    rows = unit * gain[:, None]
    # mean of u_c.x + e_c must be m_bar: E[w_i.x] = m_i - b_i, so E[u_bar.x] = mean (m_i - b_i)/s_i
    shift = torch.zeros(k, dtype=torch.float64).index_add_(
        0, a, torch.where(has, (mean - w[:, -1]) * inv, 0.0)
    ) / count.clamp(min=1)
    rows[:, -1] = m_bar - gain * shift
    fallback = torch.zeros(k, w.shape[1], dtype=torch.float64).index_add_(
        0, a, torch.where(live[:, None], w, 0.0)
    )
    members = torch.zeros(k, dtype=torch.float64).index_add_(0, a, live.double())
    fallback = fallback / members.clamp(min=1)[:, None]
    rows = torch.where(ok[:, None], rows, fallback).to(weight.dtype)
    own = s_bar[a]
    shares = torch.where(has & (own > 0), s / torch.where(own > 0, own, 1.0), 1.0)
    return rows, torch.where(live, shares, 0.0)
