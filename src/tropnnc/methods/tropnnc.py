"""TropNNC: merge units whose input vectors point the same way (the paper's algorithm).

Each unit is a generator direction d_i = w_i / ||w_i|| with mass m_i = ||w_i|| ||c_i||.
Weighted spherical k-means groups the directions; cluster k becomes one unit of direction
u_k, and member i hands its output slices to it with share lambda_i = max(0, <w_i, u_k>).
The error of output j is then at most rho * sum_i |c_ji| ||w_i - lambda_i u_k||, which is
zero for units that are positive multiples of one another, whatever their output slices.

Cost: one Gram product of the rows per block (:func:`tropnnc.cluster.cosine_gram`, float32
for large blocks), shared by the sign groups and, through :func:`tropnnc.cluster.merged_gram`,
by later ``steps``; clustering in Gram space; when the Gram has the rows' dtype, the
shares and the new rows' norms come from it too (:func:`tropnnc.cluster.member_cosines`,
O(n^2)), so the only pass over the (n, d) rows after the product combines them into the new
rows (chunked, on the block's device and dtype).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from .. import _memory
from ..block import MASS_NORMS, Block, Merge, compose, merge_by_shares
from ..cluster import combine_rows, cosine_gram, member_cosines, merged_gram, spherical_kmeans_gram
from ..moments import activation_correlation, moment_rows
from . import register
from ._base import Method, is_single_output, split_by_sign

KERNELS = ("weights", "activations")
ROWS = ("directions", "moments")


@register
class TropNNC(Method):
    """Multi-output TropNNC, with the sign-split form on single-output blocks.

    Options: ``norm`` of c_i in the mass m_i (l1, l2, max); ``refine`` rank-1 refinement
    iterations; ``steps`` > 1 reaches the width in several re-clusterings; ``split_signs``
    (None = automatic: on for single-output blocks); ``restarts`` and ``iters`` of k-means.
    ``kernel``: what the k-means compares, the paper's "weights" (cosines of the units'
    input vectors, masses ||w_i|| ||c_i||) or "activations" (correlations of the units'
    ReLU outputs under the block's Gaussian input model, masses ||c_i|| std(a_i); see
    :mod:`tropnnc.moments`). ``rows``: the merged units' rows, the paper's "directions"
    (unit vectors, members hand over their slices with shares <w_i, u>) or "moments" (rows
    that keep the members' mean pre-activation mean and std under the model; shares 1).
    """

    name = "tropnnc"
    #: merges blocks on their own device and dtype (see :func:`tropnnc.surgery.extract`)
    device_aware = True

    def __init__(
        self,
        *,
        norm: str = "l2",
        refine: int = 0,
        steps: int = 1,
        split_signs: bool | None = None,
        restarts: int = 4,
        iters: int = 100,
        kernel: str = "weights",
        rows: str = "directions",
    ) -> None:
        self.norm = norm
        self.refine = refine
        self.steps = steps
        self.split_signs = split_signs
        self.restarts = restarts
        self.iters = iters
        self.kernel = kernel
        self.rows = rows
        if norm not in MASS_NORMS:
            raise ValueError(f"tropnnc: norm must be one of {MASS_NORMS}, got {norm!r}")
        if steps < 1 or refine < 0:
            raise ValueError("tropnnc: steps must be >= 1 and refine >= 0")
        if kernel not in KERNELS or rows not in ROWS:
            raise ValueError(
                f"tropnnc: kernel must be one of {KERNELS} and rows one of "
                f"{ROWS}, got {kernel!r} and {rows!r}"
            )
        if (kernel, rows) != ("weights", "directions") and steps != 1:
            raise ValueError("tropnnc: steps > 1 needs kernel='weights', rows='directions'")

    def curve_norm(self) -> str:
        """Budgets weigh units as this method does: with its ``norm``."""
        return self.norm

    def own_allocation(self) -> str:
        """The certificate curves (with this method's norm) are its own allocator."""
        return "tropnnc"

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        split = is_single_output(block) if self.split_signs is None else self.split_signs
        if split and not is_single_output(block):
            raise ValueError(
                f"tropnnc: split_signs=True needs a single-output block; "
                f"{block.name!r} has {block.m} outputs"
            )
        merge: Merge | None = None
        current = block
        gram = None
        for width in _step_widths(block.n, k, self.steps):
            step, gram = self._merge_once(
                current, width, split, generator, gram, want_gram=width != k
            )
            merge = step if merge is None else compose(merge, step)
            current = replace(block, weight=step.rows, out=step.out, bn=None, reads=None)
        assert merge is not None
        return merge

    def _merge_once(
        self,
        block: Block,
        k: int,
        split: bool,
        generator: torch.Generator,
        gram: Tensor | None = None,
        want_gram: bool = False,
    ) -> tuple[Merge, Tensor | None]:
        """One clustering to width k. ``gram``: the cosine Gram of ``block``'s rows when
        already known; returns the merge and, with ``want_gram``, the merged rows' Gram."""
        weight = block.weight
        device = weight.device
        norms = block.row_norms  # (n,)
        if self.kernel == "activations":
            gram, std = activation_correlation(weight.cpu(), block.bn)  # float64
            c_norm = block.unit_mass(self.norm) / torch.where(norms > 0, norms, 1.0)
            gram, mass = gram.to(device), (c_norm.cpu().double() * std).to(device)
        else:
            if gram is None:
                gram = cosine_gram(weight, norms)  # (n, n) the one product over d
            mass = block.unit_mass(self.norm)  # (n,)
        groups = [(None, k)]
        if split:
            pos = block.out[:, 0, 0] > 0  # P's generators; the rest are Q's
            n_pos = int(pos.sum())
            if k >= 2 or n_pos in (0, block.n):  # k = 1 with both signs: one joint cluster
                k_pos, k_neg = split_by_sign(k, n_pos, block.n - n_pos)
                groups = [(pos.nonzero().squeeze(1), k_pos), ((~pos).nonzero().squeeze(1), k_neg)]
        assignment = torch.empty(block.n, dtype=torch.long, device=device)
        alpha = gram.new_zeros(block.n)  # u_c ~ sum_{a(i)=c} alpha_i d_i
        offset = 0
        for idx, width in groups:
            if width == 0:
                continue
            if idx is None:
                sub_gram, sub_mass = gram, mass
            else:
                sub_gram, sub_mass = gram[idx][:, idx], mass[idx]
            res = spherical_kmeans_gram(
                sub_gram,
                sub_mass,
                width,
                generator=generator,
                restarts=self.restarts,
                iters=self.iters,
                refine=self.refine,
            )
            if idx is None:
                assignment, alpha = res.assignment + offset, res.coefficients
            else:
                assignment[idx] = res.assignment + offset
                alpha[idx] = res.coefficients
            offset += width
        # unit directions u_c = r_c / ||r_c||, r_c = sum_{a(i)=c} alpha_i d_i, combined from
        # the raw rows (d_i = w_i / ||w_i||), and the shares lambda_i = <w_i, u_a(i)>
        inv_norms = torch.where(norms > 0, 1.0 / norms, 0.0)  # zero rows have no direction
        product = None  # A G (k, n), shared by member_cosines and merged_gram
        if self.rows == "moments":
            rows, shares = moment_rows(weight.cpu(), block.bn, assignment.cpu(), k)
            rows, shares = rows.to(device), shares.to(device=device, dtype=weight.dtype)
        elif gram.dtype == weight.dtype and self.kernel == "weights":  # the Gram is as precise
            # as the rows: ||r_c|| and lambda_i = ||w_i|| cos(d_i, r_a(i)) from it, O(n^2),
            # instead of two O(n d) passes
            product = combine_rows(gram, assignment, alpha.to(gram.dtype), k)
            cos_own, r_norm = member_cosines(
                gram, assignment, alpha, k, product=product
            )  # (n,), (k,)
            r_own = r_norm[assignment]
            coef = torch.where(r_own > 0, alpha / r_own, 0.0).to(weight.dtype) * inv_norms
            rows = combine_rows(weight, assignment, coef, k)  # (k, d+1)
            shares = (norms * cos_own).clamp(min=0)
        else:  # float64 rows, float32 Gram: point-space values keep exact collapses exact
            rows = combine_rows(weight, assignment, alpha.to(weight.dtype) * inv_norms, k)
            rows /= torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(
                torch.finfo(rows.dtype).tiny
            )
            shares = _row_dots(weight, rows, assignment).clamp(min=0)
        next_gram = merged_gram(gram, assignment, alpha, k, product=product) if want_gram else None
        merge = merge_by_shares(block, assignment, shares, rows)
        if self.kernel == "weights":  # the rows' cosines: the reconstruction reuses them
            merge = replace(merge, gram=gram)
        return merge, next_gram


def _row_dots(weight: Tensor, rows: Tensor, a: Tensor) -> Tensor:
    """<w_i, rows[a(i)]> (the projection that minimises ||w_i - lambda u||), (n,), in
    ``weight``'s dtype, in row chunks of at most ``_memory.CHUNK_BYTES``."""
    n, width = weight.shape
    out = torch.empty(n, dtype=weight.dtype, device=weight.device)
    step = _memory.rows_per_chunk(width * weight.element_size(), _memory.CHUNK_BYTES)
    for s in range(0, n, step):
        u = rows.index_select(0, a[s : s + step])
        out[s : s + step] = torch.einsum("ij,ij->i", weight[s : s + step], u)
    return out


def _step_widths(n: int, k: int, steps: int) -> list[int]:
    """Widths of a geometric schedule from n down to k in ``steps`` re-clusterings."""
    ratio = (k / n) ** (1.0 / steps)
    widths = [max(k, min(n - 1, math.ceil(n * ratio ** (s + 1)))) for s in range(steps - 1)]
    return sorted(set(widths), reverse=True) + [k]
