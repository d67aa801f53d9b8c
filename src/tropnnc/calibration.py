"""Calibration data for data-driven methods: what the consumer reads, and least-squares refits.

Only ``thinet`` and the optional ``calibration=`` refit use data; everything else in the
library is data-free. A *read* is one value the consumer multiplies by one of its weights:
for sample s (an input, or an (input, output position) pair for a Conv2d consumer) and
unit i, ``reads[s, i, :]`` are the r values that meet ``block.out[i, j, :]`` for every
output j, so the consumer's output (minus bias) is ``einsum('sir,ijr->sj', reads, out)``.
A channel group is read at every consumer, over the range of its input the group fills
(:func:`capture_group`), and refit consumer by consumer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block import Block, Merge
from .graph import BlockSpec, GroupSpec, layer_width
from .surgery import get_module, read_range


def as_batches(calibration: Tensor | Iterable[Tensor]) -> list[Tensor]:
    """Calibration inputs as a list of batches (a tensor is one batch; (x, y) pairs give x)."""
    if isinstance(calibration, Tensor):
        batches = [calibration]
    else:
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calibration]
    if not batches or not all(isinstance(b, Tensor) for b in batches):
        raise TypeError(
            "calibration must be a tensor or an iterable of tensors (or of (input, label) pairs)"
        )
    if sum(b.shape[0] if b.dim() else 0 for b in batches) == 0:
        raise ValueError(
            "calibration holds no inputs (0 samples): pass at least one input, "
            "batched along the first dimension"
        )
    for i, b in enumerate(batches):
        if b.is_floating_point() and not bool(torch.isfinite(b).all()):
            raise ValueError(
                f"calibration batch {i} contains NaN or inf values: remove or replace them first"
            )
    return batches


def capture_reads(
    model: nn.Module,
    site: BlockSpec | str,
    batches: list[Tensor],
    positions: Tensor | None,
    generator: torch.Generator,
    per_input: int = 10,
    channels: tuple[int, int, int] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Reads (S, n, r) of one consumer over ``batches``, in float64.

    ``site``: a block (its consumer reads all n of its producer's units) or a consumer
    layer's name with ``channels`` = (first, n, reads per channel), the range of its input
    to read (:func:`tropnnc.surgery.read_range` for a channel group). For a Conv2d
    consumer, ``per_input`` output positions are drawn per input (or the given
    ``positions`` (N, P) reused, so that a second capture after surgery reads the same
    places); returns the reads and the positions used (None for Linear consumers).
    """
    if isinstance(site, str):
        if channels is None:
            raise ValueError(f"capture_reads: name the channels {site} reads (first, n, reads)")
        layer = site
    else:
        layer = site.consumer
        if channels is None:
            channels = _block_channels(model, site)
    reads, used = capture_many(
        model, [(layer, channels)], batches, [positions], generator, per_input
    )
    return reads[0], used[0]


def capture_many(
    model: nn.Module,
    sites: Sequence[tuple[str, tuple[int, int, int]]],
    batches: list[Tensor],
    positions: Sequence[Tensor | None],
    generator: torch.Generator,
    per_input: int = 10,
) -> tuple[list[Tensor], list[Tensor | None]]:
    """The reads of several consumers in one pass over ``batches``: for each site
    (layer, (first, n, reads per channel)) and its ``positions`` (None: drawn), what
    :func:`capture_reads` returns for it, as two lists in the order of ``sites``."""
    readers = [
        _Reader(get_module(model, layer), channels, pos, generator, per_input)
        for (layer, channels), pos in zip(sites, positions, strict=True)
    ]
    handles = [r.module.register_forward_pre_hook(r.hook) for r in readers]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        with torch.no_grad():
            for batch in batches:
                model(batch.to(dtype=param.dtype, device=param.device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [r.reads() for r in readers], [r.positions() for r in readers]


def _block_channels(model: nn.Module, spec: BlockSpec) -> tuple[int, int, int]:
    """(0, n, reads per unit) of a block's consumer: all n units of its producer."""
    consumer = get_module(model, spec.consumer)
    n = layer_width(get_module(model, spec.producer))
    if isinstance(consumer, nn.Linear):
        return 0, n, consumer.in_features // n
    return 0, n, math.prod(consumer.kernel_size)


class _Reader:
    """A forward pre-hook keeping one consumer's reads of a channel range, batch by batch
    (a convolution's at ``per_input`` drawn, or given, positions per input)."""

    def __init__(
        self,
        module: nn.Module,
        channels: tuple[int, int, int],
        positions: Tensor | None,
        generator: torch.Generator,
        per_input: int,
    ) -> None:
        self.module = module
        self.first, self.n, self.r = channels
        self.given = positions
        self.generator = generator
        self.per_input = per_input
        self.seen: list[Tensor] = []
        self.drawn: list[Tensor] = []
        self.offset = 0  # inputs seen so far (rows of the given positions)

    def hook(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach()
        if isinstance(module, nn.Linear):  # features (..., in): every leading index a sample
            lo, hi = self.first * self.r, (self.first + self.n) * self.r
            flat = x.reshape(-1, module.in_features)[:, lo:hi]  # (S_b, n*r)
            self.seen.append(flat.reshape(-1, self.n, self.r).to(torch.float64).cpu())
            return
        patches = F.unfold(
            x[:, self.first : self.first + self.n],
            module.kernel_size,
            module.dilation,
            module.padding,
            module.stride,
        )  # (N_b, n*kh*kw, L)
        count, size, places = patches.shape
        if self.given is None:
            p = min(self.per_input, places)
            pos = torch.rand(count, places, generator=self.generator).argsort(1)[:, :p]
            self.drawn.append(pos)  # (N_b, P)
        else:
            pos = self.given[self.offset : self.offset + count]
            self.offset += count
        picked = patches.gather(2, pos.to(patches.device)[:, None, :].expand(-1, size, -1))
        reads = picked.permute(0, 2, 1).reshape(-1, self.n, self.r)  # (N_b*P, n, kh*kw)
        self.seen.append(reads.to(torch.float64).cpu())

    def reads(self) -> Tensor:
        return torch.cat(self.seen)  # (S, n, r)

    def positions(self) -> Tensor | None:
        if isinstance(self.module, nn.Linear):
            return None
        return self.given if self.given is not None else torch.cat(self.drawn)  # (N, P)


def capture_group(
    model: nn.Module,
    spec: GroupSpec,
    batches: list[Tensor],
    positions: Sequence[Tensor | None] | None,
    generator: torch.Generator,
    per_input: int = 10,
) -> tuple[list[Tensor], list[Tensor | None]]:
    """Every consumer's reads of the group's channels, as they are now in ``model`` (their
    range from :func:`tropnnc.surgery.read_range`), in one pass; positions as in
    :func:`capture_reads`, one per consumer."""
    sites = [(c.layer, read_range(model, c)) for c in spec.consumers]
    given = [None] * len(sites) if positions is None else positions
    return capture_many(model, sites, batches, given, generator, per_input)


def consumer_targets(block: Block, reads: Tensor) -> Tensor:
    """The consumer's outputs minus bias (S, m) for the original block's reads (S, n, r)."""
    return torch.einsum("sir,ijr->sj", reads, block.out)


def group_targets(block: Block, reads: Sequence[Tensor], outputs: Sequence[int]) -> list[Tensor]:
    """What each consumer's slices of a group contribute to its outputs, (S_c, m_c) per
    consumer, for its reads (S_c, n, r_c): ``block`` (from
    :func:`tropnnc.surgery.extract_group`) joins the consumers' slices over outputs, in
    order, ``outputs`` = (m_c) of each, reads zero-padded to the most of any."""
    parts = block.out.split(list(outputs), dim=1)  # (n, m_c, most) each
    return [
        torch.einsum("sir,ijr->sj", x, part[:, :, : x.shape[2]].to(x.dtype))
        for x, part in zip(reads, parts, strict=True)
    ]


def least_squares(
    new_reads: Tensor, targets: Tensor, ridge: float = 1e-6, prior: Tensor | None = None
) -> Tensor:
    """Consumer slices (K, m, r) reproducing ``targets`` (S, m) from ``new_reads`` (S, K, r):
    min ||R~ C - T||^2 + ridge * ||R~||^2/S * ||C - C0||^2, in float64, with C0 the slices
    ``prior`` (K, m, r) (None: zero). A prior the data cannot tell from the best fit is
    kept: slices that already reproduce the targets come back unchanged, and directions
    the calibration reads hardly excite keep the prior's slices instead of shrinking."""
    s, k, r = new_reads.shape
    a = new_reads.reshape(s, k * r)  # (S, K*r)
    gram = a.T @ a
    lam = ridge * gram.diagonal().mean().clamp(min=1e-12)
    rhs = a.T @ targets  # (K*r, m)
    if prior is not None:
        rhs = rhs + lam * prior.to(a.dtype).permute(0, 2, 1).reshape(k * r, -1)
    coef = torch.linalg.solve(gram + lam * torch.eye(k * r, dtype=a.dtype), rhs)
    return coef.reshape(k, r, -1).permute(0, 2, 1).contiguous()  # (K, m, r)


def refit(merge: Merge, new_reads: Tensor, targets: Tensor, ridge: float = 1e-6) -> Merge:
    """Least-squares consumer slices for the merged units so they reproduce ``targets``
    (:func:`least_squares` over the new reads (S, K, r)); the certificate no longer applies
    (shares are dropped)."""
    out = least_squares(new_reads, targets, ridge)  # (K, m, r)
    return Merge(merge.rows, out, merge.assignment, None, merge.kept)
