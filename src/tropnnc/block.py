"""The unit of compression: one hidden layer seen as producer rows and consumer slices.

A block is producer -> ReLU -> [channel-wise positively homogeneous ops] ->
consumer. Hidden unit i owns

* ``weight[i]``: its input vector w_i = (incoming weights, bias) in R^{d+1}
  (a conv unit's flattened filter C_in*kh*kw followed by its bias), and
* ``out[i]``: its output slices c_i, shaped (m, r): for each of the consumer's m outputs the
  r weights through which it reads unit i (r = 1 for Linear, kh*kw for Conv2d, H*W for a
  Linear after Flatten).

Every method turns a block into a :class:`Merge`: K new producer rows and K new consumer
slices. Methods whose slices are share-weighted sums of the originals (all data-free ones)
also return the shares, from which :func:`certificate` bounds the output error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import Tensor

from . import _memory
from .tropical import share_errors

_ABS_SUM_MIN_READS = 4  # consumer views with this many reads keep sum_t |c_jit| (m, n)
#: norms of a unit's output slices c_i allowed in its mass m_i = ||w_i|| ||c_i||
MASS_NORMS = ("l1", "l2", "max")
_MASS_ORDS = {"l1": 1, "max": math.inf}


@dataclass(frozen=True)
class Member:
    """One layer's columns in a channel group's joined rows: ``weight[:, start:stop]`` are
    its incoming weights then its bias (BatchNorm folded); ``bn`` its BatchNorm statistics
    per channel (as :attr:`Block.bn`, without ``raw``) or None; ``channelwise`` marks a
    depthwise member, which reads the group's own channels."""

    start: int
    stop: int
    bn: dict[str, Tensor] | None = None
    channelwise: bool = False


@dataclass(frozen=True)
class Block:
    """One hidden layer, in float64, detached from any module.

    ``radius`` bounds the norm of the block's input (a whole input, or one conv patch), so
    every bound holds for ||(x, 1)|| <= rho = sqrt(radius^2 + 1).
    """

    name: str
    weight: Tensor  # (n, d+1) producer rows, bias last
    out: Tensor  # (n, m, r) consumer slices
    consumer_bias: Tensor | None = None  # (m,) unchanged by compression
    radius: float = 1.0
    kind: str = "linear"  # "linear" or "conv" producer
    unit_shape: tuple[int, ...] = ()  # shape of one unit's incoming weights, bias excluded
    # BN statistics per unit when BN was folded (weight, bias, running_mean, running_var, eps)
    # plus 'raw', the unfolded rows (n, d+1)
    bn: dict[str, Tensor] | None = field(default=None, compare=False)
    reads: Tensor | None = field(default=None, compare=False)  # (S, n, r) calibration reads
    #: what each unit applies before the consumer reads it: "relu", "identity", "relu6",
    #: "gelu", "silu", "hardswish", "leaky_relu:<slope>", or for a channel group the
    #: channel-wise ops joined by "+" (e.g. "relu6+depthwise"); see :func:`certificate`
    activation: str = "relu"
    #: a channel group's member layers, in the order of their columns in ``weight``
    members: tuple[Member, ...] | None = field(default=None, compare=False)

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def m(self) -> int:
        return self.out.shape[1]

    @property
    def rho(self) -> float:
        return math.sqrt(self.radius**2 + 1.0)

    def out_abs(self) -> Tensor:
        """|c_ji| summed over reads: (n, m) absolute weight of unit i in output j."""
        return torch.linalg.vector_norm(self.out, ord=1, dim=2)  # no |out| copy

    def _consumer_layout(self) -> Tensor | None:
        """``out`` as the consumer's own (m, n * r) matrix when that is a view (``out`` is
        then a permuted view of a large consumer weight, see :func:`tropnnc.surgery.extract`),
        else None."""
        n, m, r = self.out.shape
        cols = self.out.permute(1, 0, 2)  # (m, n, r)
        return cols.view(m, n * r) if cols.is_contiguous() else None

    def weighted_out_abs(self, weights: Tensor) -> Tensor:
        """sum_i weights_i |c_ji| (reads summed): (m,) float64, without an (n, m) matrix.

        From the read-summed |c| that :attr:`out_norms` keeps for consumer views with several
        reads (one small product); otherwise matrix-vector products over chunks of the slices
        in their memory order (consumer rows for a view of a consumer weight, units
        otherwise), converted to float64.
        """
        n, m, r = self.out.shape
        f64 = {"dtype": torch.float64, "device": self.out.device}
        abs_sums = self._slice_sums[1]
        if abs_sums is not None:
            return abs_sums @ weights.to(**f64)
        cols = self._consumer_layout()
        if cols is not None:
            e = weights.to(**f64).repeat_interleave(r)  # (n * r,)
            total = torch.empty(m, **f64)
            step = _memory.rows_per_chunk(n * r * 8, _memory.SLICE_BYTES)
            for s in range(0, m, step):
                total[s : s + step] = cols[s : s + step].to(**f64, copy=True).abs_() @ e
            return total
        total = torch.zeros(m, **f64)
        step = _memory.rows_per_chunk(m * r * 8, _memory.SLICE_BYTES)
        for s in range(0, n, step):
            c = self.out[s : s + step].permute(1, 0, 2).reshape(m, -1)  # (m, units * r)
            c = c.to(**f64, copy=True).abs_()  # a private float64 copy
            total += c @ weights[s : s + step].to(**f64).repeat_interleave(r)
        return total

    @cached_property
    def row_norms(self) -> Tensor:
        """||w_i||_2 of each row (weights and bias), (n,), in the rows' dtype (computed once)."""
        return torch.linalg.vector_norm(self.weight, dim=1)

    def unit_mass(self, norm: str = "l2") -> Tensor:
        """m_i = ||w_i||_2 ||c_i|| (n,): c_i over outputs and reads in ``norm`` (one of
        :data:`MASS_NORMS`); the weight of each generator in TropNNC's clustering."""
        if norm not in MASS_NORMS:
            raise ValueError(f"norm must be one of {MASS_NORMS}, got {norm!r}")
        c = (
            self.out_norms
            if norm == "l2"
            else torch.linalg.vector_norm(self.out, ord=_MASS_ORDS[norm], dim=(1, 2))
        )
        return self.row_norms * c

    @property
    def out_norms(self) -> Tensor:
        """||c_i||_2 over each unit's (m, r) slices, (n,), in ``out``'s dtype (computed once,
        in the slices' memory order)."""
        return self._slice_sums[0]

    @cached_property
    def _slice_sums(self) -> tuple[Tensor, Tensor | None]:
        """One pass over the slices: :attr:`out_norms` and, when ``out`` is a view of a
        consumer weight with at least ``_ABS_SUM_MIN_READS`` reads, the (m, n) float64 matrix
        sum_t |c_jit| (at most 2 / r of the slices' float32 bytes) that certificates reuse
        instead of a second float64 pass over the consumer (else None)."""
        n, m, r = self.out.shape
        cols = self._consumer_layout()
        if cols is None or n == 0:
            return torch.linalg.vector_norm(self.out.reshape(n, -1), dim=1), None
        acc = torch.zeros(n * r, dtype=self.out.dtype, device=self.out.device)
        abs_sums = (
            torch.empty(m, n, dtype=torch.float64, device=self.out.device)
            if r >= _ABS_SUM_MIN_READS
            else None
        )
        step = _memory.rows_per_chunk(n * r * self.out.element_size(), _memory.SLICE_BYTES)
        for s in range(0, m, step):  # column sums of squares over consumer-row chunks
            c = cols[s : s + step]
            acc += (c * c).sum(dim=0)
            if abs_sums is not None:
                abs_sums[s : s + step] = c.abs().view(-1, n, r).sum(dim=2, dtype=torch.float64)
        return acc.view(n, r).sum(dim=1).sqrt(), abs_sums

    def live(self) -> Tensor:
        """(n,) bool: units with w_i != 0 and c_i != 0 (the others are dead).

        From 2-norms (fast reductions); units whose norm is 0, possibly by underflow of
        tiny entries, are checked exactly.
        """
        live = (self.row_norms > 0) & (self.out_norms > 0)
        zero = (~live).nonzero().squeeze(1)
        if zero.numel():
            live[zero] = (self.weight[zero] != 0).any(dim=1) & (self.out[zero] != 0).flatten(1).any(
                dim=1
            )
        return live

    def subset(self, index: Tensor) -> Block:
        """The block restricted to the units in ``index`` (same outputs)."""
        bn = None if self.bn is None else {k: v[index] for k, v in self.bn.items()}
        reads = None if self.reads is None else self.reads[:, index]
        members = None
        if self.members is not None:
            members = tuple(
                replace(m, bn=None if m.bn is None else {k: v[index] for k, v in m.bn.items()})
                for m in self.members
            )
        return replace(
            self,
            weight=self.weight[index],
            out=self.out[index],
            bn=bn,
            reads=reads,
            members=members,
        )


@dataclass(frozen=True)
class Merge:
    """A compressed block: ``rows`` (K, d+1) and ``out`` (K, m, r).

    ``assignment[i]`` is the new unit that absorbed original unit i (-1: dropped without
    compensation). ``shares[i] = lambda_i >= 0`` when ``out[k] = sum_{a(i)=k} lambda_i c_i``
    holds exactly; ``shares`` is None for merges not of that form (no certificate then).
    ``kept[k]`` is the original unit that new unit k copies, -1 where it is a true merge.
    """

    rows: Tensor
    out: Tensor
    assignment: Tensor
    shares: Tensor | None
    kept: Tensor | None = None
    # new consumer bias (m,) written by surgery.apply (data-free repair); None: unchanged
    consumer_bias: Tensor | None = None
    # (K, n) P with out[k] = sum_i P_ki c_i (a reconstruction, :mod:`tropnnc.reconstruct`);
    # certifies merges that are not of share form
    projection: Tensor | None = None
    # (n, n) cosines of the block's rows (bias included) when the method computed them;
    # the reconstruction reuses them instead of a second product over the rows
    gram: Tensor | None = None

    @property
    def k(self) -> int:
        return self.rows.shape[0]


def merge_by_shares(block: Block, assignment: Tensor, shares: Tensor, rows: Tensor) -> Merge:
    """Build the merge whose new slices are share-weighted sums: out[k] = sum lambda_i c_i.

    When ``block.out`` is a view of a consumer weight, the new slices are written in that
    layout too (``out`` is then a permuted view of a (m, K, r) tensor, which
    :func:`tropnnc.surgery.apply` adopts as the new consumer weight without a copy), a
    chunk of consumer rows at a time so that the transposes stay in cache; otherwise unit
    chunks are summed into a contiguous (K, m, r) tensor.
    """
    k = rows.shape[0]
    src = block.out
    n, m, r = src.shape
    lam = shares.to(src.dtype)
    a = assignment
    if not bool((a >= 0).all()):  # dropped units (-1) add nothing
        lam = torch.where(a >= 0, lam, 0.0)
        a = a.clamp(min=0)
    like = {"dtype": src.dtype, "device": src.device}
    cols = block._consumer_layout()
    if cols is not None and k > 0:
        new = torch.empty(m, k, r, **like)  # the consumer's layout
        step = _memory.rows_per_chunk(n * r * src.element_size(), _memory.CACHE_BYTES)
        t = torch.empty(n, min(step, m), r, **like)
        acc = torch.empty(k, min(step, m), r, **like)
        lam3 = lam[:, None, None]
        for s in range(0, m, step):  # consumer-row chunks: (n, rows, r) -> (K, rows, r)
            e = min(m, s + step)
            tc, ac = t[:, : e - s], acc[:, : e - s]
            torch.mul(cols[s:e].view(e - s, n, r).permute(1, 0, 2), lam3, out=tc)
            ac.zero_().index_add_(0, a, tc)
            new[s:e].copy_(ac.permute(1, 0, 2))
        return Merge(rows, new.permute(1, 0, 2), assignment, shares)
    out = torch.zeros(k, m, r, **like)
    step = _memory.rows_per_chunk(m * r * src.element_size(), _memory.SLICE_BYTES)
    for s in range(0, n, step):  # unit chunks: temporaries stay small
        c = src[s : s + step]
        t = torch.empty(c.shape, **like)  # contiguous, whatever the layout of ``out``
        torch.mul(c, lam[s : s + step, None, None], out=t)
        out.index_add_(0, a[s : s + step], t)
    return Merge(rows, out, assignment, shares)


def select(block: Block, kept: Tensor, scale: Tensor | None = None) -> Merge:
    """Keep the units ``kept`` unchanged (optionally scale their slices); drop the rest."""
    n = block.n
    device = block.weight.device
    kept = kept.to(device)
    assignment = torch.full((n,), -1, dtype=torch.long, device=device)
    assignment[kept] = torch.arange(kept.numel(), device=device)
    shares = torch.zeros(n, dtype=block.weight.dtype, device=device)
    shares[kept] = 1.0 if scale is None else scale.to(shares.dtype)
    merge = merge_by_shares(block, assignment, shares, block.weight[kept].clone())
    certified = scale is None or bool((scale >= 0).all())
    return Merge(merge.rows, merge.out, assignment, shares if certified else None, kept.clone())


def compose(first: Merge, second: Merge) -> Merge:
    """A merge of the original block equal to applying ``first`` then ``second``.

    Shares multiply along the path i -> a1(i) -> a2(a1(i)); the result keeps the exact
    share form, so its certificate is measured against the original units.
    """
    a1 = first.assignment
    live = a1 >= 0
    assignment = torch.full_like(a1, -1)
    assignment[live] = second.assignment[a1[live]]
    shares = None
    if first.shares is not None and second.shares is not None:
        shares = torch.zeros_like(first.shares)
        shares[live] = first.shares[live] * second.shares[a1[live]]
    kept = None
    if first.kept is not None and second.kept is not None:
        kept = torch.where(second.kept >= 0, first.kept[second.kept.clamp(min=0)], -1)
    return Merge(second.rows, second.out, assignment, shares, kept)


def homogeneous(activation: str) -> bool:
    """True when s(lambda z) = lambda s(z) for lambda >= 0 (ReLU, identity, LeakyReLU): a
    merged unit's scale can then sit in its row or in its slices alike."""
    return activation in ("relu", "identity") or activation.startswith("leaky_relu:")


def rescale_units(merge: Merge) -> Merge:
    """The same share-form merge with each new unit k's scale moved from its slices into its
    row: rows_k * s_k and slices / s_k, s_k the mean share of its members (1 when 0).

    For positively homogeneous activations this changes nothing; for the others (ReLU6,
    GELU, SiLU, depthwise chains) it keeps a unit at the scale of the units it replaces,
    so merged duplicates reproduce them exactly and shares stay near 1. Merges without
    shares are returned as they are.
    """
    if merge.shares is None or merge.k == 0:
        return merge
    a = merge.assignment
    live = a >= 0
    lam = merge.shares.to(merge.rows.dtype)
    total = torch.zeros(merge.k, dtype=lam.dtype, device=lam.device).index_add_(
        0, a[live], lam[live]
    )
    count = torch.zeros_like(total).index_add_(0, a[live], torch.ones_like(lam[live]))
    scale = torch.where(total > 0, total / count.clamp(min=1), 1.0)
    shares = torch.where(
        live, merge.shares / scale[a.clamp(min=0)].to(merge.shares.dtype), merge.shares
    )
    return replace(
        merge,
        rows=merge.rows * scale[:, None],
        out=merge.out / scale.to(merge.out.dtype)[:, None, None],
        shares=shares,
    )


#: smooth activations s = relu - r with 0 <= r <= R: (Lipschitz constant of s, R), rounded up
#: from their exact values (GELU, erf or tanh form: 1.12899, 0.17004; SiLU: 1.09984, 0.27846;
#: hard-swish: 1.5, 0.375; tests/test_groups.py checks them on a fine grid)
SMOOTH = {"gelu": (1.1290, 0.1701), "silu": (1.0999, 0.2785), "hardswish": (1.5, 0.375)}


def lipschitz(activation: str) -> float | None:
    """The Lipschitz constant of an activation the certificate covers: positively
    homogeneous piecewise-linear ones (ReLU, identity, LeakyReLU), ReLU6, and the smooth
    ones of :data:`SMOOTH`; None for any other (no certificate)."""
    if activation in ("relu", "identity", "relu6"):
        return 1.0
    if activation.startswith("leaky_relu:"):
        return max(1.0, abs(float(activation.partition(":")[2])))
    if activation in SMOOTH:
        return SMOOTH[activation][0]
    return None


def certificate(block: Block, merge: Merge) -> Tensor:
    """Per-output bound (m,) on |y_j - y~_j| over ||(x,1)|| <= rho; NaN if unknown.

    Unit i merged with share lambda_i into row u errs by at most
    L ||w_i - lambda_i u|| rho when its activation s is positively homogeneous with Lipschitz
    constant L (s(lambda z) = lambda s(z)). Otherwise s(w.x) - lambda s(u.x) is split into
    s(w.x) - s(lambda u.x) (at most L ||w - lambda u|| rho) and the failure of homogeneity
    s(lambda z) - lambda s(z), added per unit: at most 6 |1 - lambda| for ReLU6 (it clips at
    6; a dropped unit errs by at most min(6, ||w_i|| rho)); at most R max(1, lambda), and 0
    at lambda 0 or 1, for s = relu - r with 0 <= r <= R (GELU, SiLU, hard-swish:
    :data:`SMOOTH`). Merges with a ``projection`` P (a reconstruction) use
    :func:`projection_errors` per unit instead, with lambda = P's own coefficient (not for
    ReLU6). Other activations: NaN. Plus the change of the consumer bias.
    """
    factor = lipschitz(block.activation)
    nan = torch.full((block.m,), math.nan, dtype=torch.float64, device=block.out.device)
    if factor is None:
        return nan
    if merge.shares is not None:
        err = share_errors(block.weight, merge.assignment, merge.shares, merge.rows)  # (n,)
        own = torch.where(merge.assignment >= 0, merge.shares.to(err.dtype), 0.0)
    elif merge.projection is not None and block.activation != "relu6":
        err = projection_errors(block.weight, merge.assignment, merge.projection, merge.rows)
        own = own_coefficients(merge.assignment, merge.projection)
    else:
        return nan
    err = err * (block.rho * factor)
    if block.activation == "relu6":
        lam = merge.shares.to(err.dtype)
        err = torch.where(merge.assignment >= 0, err + 6.0 * (1.0 - lam).abs(), err.clamp(max=6.0))
    if block.activation in SMOOTH:
        r = SMOOTH[block.activation][1]
        err = err + torch.where((own == 0) | (own == 1), 0.0, r * own.clamp(min=1.0))
    bound = block.weighted_out_abs(err)
    if merge.consumer_bias is not None:  # plus |beta_j - beta~_j| (no consumer bias: 0)
        base = (
            block.consumer_bias
            if block.consumer_bias is not None
            else torch.zeros(block.m, dtype=torch.float64, device=bound.device)
        )
        bound = bound + (merge.consumer_bias.to(bound.dtype) - base.to(bound.dtype)).abs()
    return bound


def own_coefficients(assignment: Tensor, projection: Tensor) -> Tensor:
    """Per unit (n,), float64: P[a(i), i], the coefficient of unit i's own new unit in the
    projection, where it is >= 0 (0 for dropped units and negative coefficients: the
    bound of :func:`projection_errors` then treats the unit as dropped)."""
    p = projection.to(torch.float64)
    a = assignment.to(p.device)
    diag = torch.where(a >= 0, p[a.clamp(min=0), torch.arange(p.shape[1], device=p.device)], 0.0)
    return diag.clamp(min=0.0)


def projection_errors(
    weight: Tensor, assignment: Tensor, projection: Tensor, rows: Tensor
) -> Tensor:
    """Per unit (n,), float64: how far unit i's output can move when its consumer slices are
    spread over the new units as out~[k] = sum_i P_ki c_i (see docs/expected-error.md).

    relu(w_i.x) - sum_k P_ki relu(u_k.x) is at most, in units of rho,
    ||w_i - p u_a|| + sum_{k != a} |P_ki| ||u_k|| with a = a(i), p = P_ai, when p >= 0
    (positive homogeneity and 1-Lipschitz ReLU), and ||w_i|| + sum_k |P_ki| ||u_k||
    otherwise. (The bound with ||w_i - p u_a|| for a negative p is false: w = -u, p = -1
    gives 0 while relu(-u.x) + relu(u.x) = |u.x|.)
    """
    p = projection.to(torch.float64)
    a = assignment.to(p.device)
    own = own_coefficients(a, p)  # p = P_ai where used, else 0
    u_norms = torch.linalg.vector_norm(rows.to(torch.float64), dim=1)  # (K,)
    spread = p.abs().T @ u_norms  # (n,) sum_k |P_ki| ||u_k||
    err = share_errors(weight, torch.where(own > 0, a, -1), own, rows)
    return err + spread - own * u_norms[a.clamp(min=0)]
