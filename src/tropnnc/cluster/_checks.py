"""Input validation shared by the clustering entry points (one clear error per bad input)."""

from __future__ import annotations

import torch
from torch import Tensor


def _all_finite(x: Tensor) -> bool:
    """Whether every entry is finite, from its min and max (no boolean copy of ``x``)."""
    if x.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())


def _as_matrix(x: Tensor, name: str) -> Tensor:
    """Check that ``x`` is a finite floating (n, d) matrix."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if not _all_finite(x):
        raise ValueError(f"{name} must be finite")
    return x


def _as_weights(weights: Tensor | None, n: int, like: Tensor) -> Tensor:
    """Weights as a non-negative finite (n,) tensor in ``like``'s dtype (ones when None)."""
    if weights is None:
        return torch.ones(n, dtype=like.dtype, device=like.device)
    if not isinstance(weights, Tensor):
        weights = torch.as_tensor(weights)
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    w = weights.to(dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    return w


def _check_k(k: int) -> int:
    """Validate the number of clusters."""
    if isinstance(k, bool) or int(k) != k:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def _check_counts(restarts: int, iters: int, refine: int = 0) -> None:
    """Validate iteration counts."""
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")


def _check_gram(gram: Tensor, x: Tensor) -> Tensor:
    """Validate a precomputed Gram matrix for the rows of ``x`` (kept in its own float dtype)."""
    n = x.shape[0]
    if not isinstance(gram, Tensor) or gram.shape != (n, n):
        shape = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
        raise ValueError(f"gram must have shape ({n}, {n}), got {shape}")
    dtype = gram.dtype if gram.is_floating_point() else x.dtype
    return gram.to(dtype=dtype, device=x.device)


def _check_square(gram: Tensor) -> Tensor:
    """A finite floating square matrix."""
    if not isinstance(gram, Tensor):
        raise TypeError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must have shape (n, n), got {tuple(gram.shape)}")
    if not gram.is_floating_point():
        raise ValueError(f"gram must be a floating tensor, got {gram.dtype}")
    if not _all_finite(gram):
        raise ValueError("gram must be finite")
    return gram


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _check_points_call(
    points: Tensor,
    name: str,
    weights: Tensor | None,
    k: int,
    counts: tuple[int, int, int],
    gram: Tensor | None,
) -> tuple[Tensor, Tensor, int, Tensor | None]:
    """The arguments of a clustering of points, checked in order: the points (named
    ``name``), their weights, k, the (restarts, iters, refine) counts and an optional
    precomputed Gram. Returns (points, weights, k, gram)."""
    x = _as_matrix(points, name)
    w = _as_weights(weights, x.shape[0], x)
    k = _check_k(k)
    _check_counts(*counts)
    return x, w, k, None if gram is None else _check_gram(gram, x)


def _check_gram_call(
    gram: Tensor, weights: Tensor | None, k: int, counts: tuple[int, int, int]
) -> tuple[Tensor, Tensor, int]:
    """The arguments of a clustering from a Gram matrix alone, checked in order: the Gram,
    the weights (in the Gram's dtype), k and the (restarts, iters, refine) counts."""
    g = _check_square(gram)
    w = _as_weights(weights, g.shape[0], g)
    k = _check_k(k)
    _check_counts(*counts)
    return g, w, k
