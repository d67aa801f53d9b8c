"""Calibration data for data-driven methods: what the consumer reads, and least-squares refits.

Only ``thinet`` and the optional ``calibration=`` refit use data; everything else in the
library is data-free. A *read* is one value the consumer multiplies by one of its weights:
for sample s (an input, or an (input, output position) pair for a Conv2d consumer) and
unit i, ``reads[s, i, :]`` are the r values that meet ``block.out[i, j, :]`` for every
output j, so the consumer's output (minus bias) is ``einsum('sir,ijr->sj', reads, out)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block import Block, Merge
from .graph import BlockSpec
from .surgery import get_module


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
    spec: BlockSpec,
    batches: list[Tensor],
    positions: Tensor | None,
    generator: torch.Generator,
    per_input: int = 10,
) -> tuple[Tensor, Tensor | None]:
    """Reads (S, n, r) of ``spec``'s consumer over ``batches``, in float64.

    For a Conv2d consumer, ``per_input`` output positions are drawn per input (or the given
    ``positions`` (N, P) reused, so that a second capture after surgery reads the same
    places); returns the reads and the positions used (None for Linear consumers).
    """
    consumer = get_module(model, spec.consumer)
    seen: list[Tensor] = []
    handle = consumer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        with torch.no_grad():
            for batch in batches:
                model(batch.to(dtype=param.dtype, device=param.device))
    finally:
        handle.remove()
        model.train(was_training)
    x = torch.cat(seen).to(torch.float64).cpu()
    if isinstance(consumer, nn.Linear):
        n = get_module(model, spec.producer).weight.shape[0]
        return x.reshape(x.shape[0], n, -1), None  # (N, n, H*W or 1)
    patches = F.unfold(
        x, consumer.kernel_size, consumer.dilation, consumer.padding, consumer.stride
    )  # (N, n*kh*kw, L)
    count, _, places = patches.shape
    if positions is None:
        p = min(per_input, places)
        positions = torch.rand(count, places, generator=generator).argsort(1)[:, :p]  # (N, P)
    picked = patches.gather(2, positions[:, None, :].expand(-1, patches.shape[1], -1))
    reads = picked.permute(0, 2, 1).reshape(-1, x.shape[1], patches.shape[1] // x.shape[1])
    return reads, positions  # (N*P, n, kh*kw)


def consumer_targets(block: Block, reads: Tensor) -> Tensor:
    """The consumer's outputs minus bias (S, m) for the original block's reads (S, n, r)."""
    return torch.einsum("sir,ijr->sj", reads, block.out)


def refit(merge: Merge, new_reads: Tensor, targets: Tensor, ridge: float = 1e-6) -> Merge:
    """Least-squares consumer slices for the merged units so they reproduce ``targets``.

    Solves min ||R~ C - T||^2 + ridge * ||R~||^2/S * ||C||^2 in float64 over the new reads
    R~ (S, K, r); the certificate no longer applies (shares are dropped).
    """
    s, k, r = new_reads.shape
    a = new_reads.reshape(s, k * r)  # (S, K*r)
    gram = a.T @ a
    lam = ridge * gram.diagonal().mean().clamp(min=1e-12)
    coef = torch.linalg.solve(gram + lam * torch.eye(k * r, dtype=a.dtype), a.T @ targets)
    out = coef.reshape(k, r, -1).permute(0, 2, 1).contiguous()  # (K, m, r)
    return Merge(merge.rows, out, merge.assignment, None, merge.kept)
