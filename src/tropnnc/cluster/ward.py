"""Ward agglomerative clustering (scipy's linkage on distances from one Gram product)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _memory
from ._checks import _as_matrix, _check_k
from .gram import gram_of_chunks


def _ward_linkage(points: Tensor):
    """scipy Ward linkage matrix of the rows of ``points``.

    scipy's own distance pass (``pdist``) is a plain loop; the pairwise Euclidean distances
    come instead from one float64 Gram product of the centred points (symmetric strips,
    column chunks: no float64 copy of the points), as scipy's condensed matrix.
    """
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    x = _as_matrix(points, "points").detach()
    n = x.shape[0]
    center = x.mean(dim=0)
    step = _memory.rows_per_chunk(n * 8, _memory.CHUNK_BYTES)  # float64 columns per chunk
    chunks = (
        x[:, s : s + step].double() - center[s : s + step].double()
        for s in range(0, x.shape[1], step)
    )
    g = gram_of_chunks(chunks, n, torch.float64, x.device)
    sq = g.diagonal().clone()
    dist = g.mul_(-2.0).add_(sq[:, None]).add_(sq[None, :]).clamp_(min=0.0).sqrt_()
    dist.fill_diagonal_(0.0)
    return linkage(squareform(dist.cpu().numpy(), checks=False), method="ward")


def _relabel(labels, device: torch.device) -> Tensor:
    """Map arbitrary labels to 0..K-1 (ordered by label value) as a long tensor."""
    import numpy as np

    _, inverse = np.unique(np.asarray(labels).reshape(-1), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long, device=device)


def ward(points: Tensor, k: int) -> Tensor:
    """Ward agglomerative clustering into exactly k clusters: (n,) long labels 0..k-1.

    The tree is cut after n - k merges (as scipy's ``cut_tree``), so ties in merge heights
    (e.g. duplicate points) cannot change the count. k >= n: identity labels.
    """
    x = _as_matrix(points, "points")
    k = _check_k(k)
    n = x.shape[0]
    if k >= n:
        return torch.arange(n, device=x.device)
    return torch.as_tensor(_cut(_ward_linkage(x), k), dtype=torch.long, device=x.device)


def _cut(z, k: int):
    """Labels (n,) after the first n - k merges of linkage ``z``: the same as scipy's
    ``cut_tree(z, n_clusters=k)`` (clusters numbered by their smallest member), without its
    Python loop over the merges: each node's parent, then pointer jumping to the roots."""
    import numpy as np

    n = z.shape[0] + 1
    parent = np.arange(2 * n - 1)
    merged = z[: n - k, :2].astype(np.int64)  # (n - k, 2) children of nodes n .. 2n - k - 1
    parent[merged[:, 0]] = parent[merged[:, 1]] = n + np.arange(n - k)
    root = parent[:n]
    while True:
        up = parent[root]
        if np.array_equal(up, root):
            break
        root = up
    first = np.full(2 * n - 1, n, dtype=np.int64)
    np.minimum.at(first, root, np.arange(n))  # smallest member of each cluster
    return np.unique(first[root], return_inverse=True)[1].reshape(-1)


def ward_threshold(points: Tensor, threshold: float) -> Tensor:
    """Ward clustering cut at linkage distance ``threshold`` (scipy fcluster 'distance').

    Returns (n,) long labels relabelled to 0..K-1.
    """
    from scipy.cluster.hierarchy import fcluster

    x = _as_matrix(points, "points")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be finite and >= 0, got {threshold}")
    n = x.shape[0]
    if n <= 1:
        return torch.zeros(n, dtype=torch.long, device=x.device)
    return _relabel(fcluster(_ward_linkage(x), t=threshold, criterion="distance"), x.device)
