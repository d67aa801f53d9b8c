"""Per-restart cluster bookkeeping in Gram space, batched over restarts.

Assignments of R restarts are one (R, n) long tensor; per-cluster values are (R, K). These
helpers sum, count and gather along the assignment without a Python loop over restarts or
clusters, and split the restarts into chunks whose buffers fit the memory budget.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _memory


def _flat_labels(a: Tensor, k: int) -> Tensor:
    """Labels (R, n) made unique across restarts: restart r's cluster c becomes r * k + c."""
    return a + k * torch.arange(a.shape[0], device=a.device)[:, None]


def _cluster_sum(values: Tensor, a: Tensor, k: int) -> Tensor:
    """Per-restart cluster sums: out[r, c] = sum_{i: a[r, i] = c} values[r, i]."""
    out = values.new_zeros(a.shape[0], k)  # (R, K)
    return out.scatter_add_(1, a, values)


def _cluster_counts(a: Tensor, k: int) -> Tensor:
    """Per-restart cluster sizes, (R, K) long."""
    out = torch.zeros(a.shape[0], k, dtype=torch.long, device=a.device)  # (R, K)
    return out.scatter_add_(1, a, torch.ones_like(a))


def _gather(values: Tensor, a: Tensor) -> Tensor:
    """Broadcast per-cluster values (R, K) back to the units: (R, n)."""
    return values.gather(1, a)


def _one_hot_coeffs(a: Tensor, alpha: Tensor, k: int) -> Tensor:
    """Sparse (R*K, n) matrix with alpha[r, i] at (r*K + a[r, i], i): rows are centroids."""
    r, n = a.shape
    rows = _flat_labels(a, k).reshape(-1)  # (R*n,)
    cols = torch.arange(n, device=a.device).repeat(r)  # (R*n,)
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), alpha.reshape(-1), (r * k, n), check_invariants=False
    )


def _scatter_columns(gram: Tensor, a: Tensor, alpha: Tensor, k: int) -> Tensor:
    """T[r, c, j] = <x_j, u_{r,c}> = sum_{i: a[r,i]=c} alpha[r, i] G[i, j]; (R, K, n), O(R n^2)."""
    r, n = a.shape
    return torch.sparse.mm(_one_hot_coeffs(a, alpha, k), gram).view(r, k, n)  # (R, K, n)


def _restart_chunks(r: int, bytes_per_restart: int) -> list[slice]:
    """Split restarts into contiguous chunks whose temporaries fit the memory budget."""
    size = _memory.rows_per_chunk(bytes_per_restart, _memory.RESTART_BUFFER_BYTES)
    return [slice(s, min(r, s + size)) for s in range(0, r, size)]
