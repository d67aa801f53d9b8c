"""Unit features of a block as column chunks, and their centred Gram matrix.

The Euclidean baselines (neural-path-kmeans, model-folding) cluster each unit's parameters:
its producer row w_i and, optionally, its output slices c_i flattened. Concatenating them
copies the whole consumer (400 MB for VGG-16's conv5_3 -> fc6 block); instead the features
are produced a column chunk at a time (scaled and centred per column, as the whole matrix
would be) and only their Gram matrix is kept, from which k-means runs
(:func:`tropnnc.cluster.kmeans_gram`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .. import _memory
from ..block import Block
from ..cluster import gram_dtype, gram_of_chunks


def feature_chunks(block: Block, with_out: bool) -> Iterator[Tensor]:
    """Column chunks (n, f) of [w_i | c_i flattened] (``with_out``) or of w_i alone, in the
    column order of ``torch.cat([block.weight, block.out.flatten(1)], 1)``."""
    n = block.n
    step = _memory.rows_per_chunk(n * block.weight.element_size(), _memory.CHUNK_BYTES)  # columns
    for s in range(0, block.weight.shape[1], step):
        yield block.weight[:, s : s + step]
    if with_out:
        r = block.out.shape[2]
        rows = max(1, step // r)  # consumer outputs per chunk
        for s in range(0, block.m, rows):
            yield block.out[:, s : s + rows].reshape(n, -1)


def centred_feature_gram(
    block: Block, with_out: bool, transform: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Gram matrix (n, n) of the unit features after ``transform`` (a per-column map, applied
    to each chunk) and centring each column on its mean.

    In the dtype :func:`tropnnc.cluster.gram_dtype` picks for the whole feature matrix
    (float64 for small blocks, float32 for large ones), on the block's device.
    """
    n = block.n
    width = block.weight.shape[1] + (block.out[0].numel() if with_out else 0)
    shape = torch.empty(n, width, dtype=block.weight.dtype, device="meta")
    dtype = gram_dtype(shape)

    def centred() -> Iterator[Tensor]:
        for x in feature_chunks(block, with_out):
            if transform is not None:
                x = transform(x)
            yield x - x.mean(dim=0)

    return gram_of_chunks(centred(), n, dtype, block.weight.device)
