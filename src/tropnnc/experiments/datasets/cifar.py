"""CIFAR-10 and CIFAR-100 from the official "python version" folders (pickled batches).

The batch files are pickles: they are only ever read from the dataset folder, with a restricted
unpickler (:class:`_DatasetUnpickler`) that allows nothing but plain containers and numpy
arrays, and ``encoding='bytes'`` as the format requires. Never point the loader at pickles
from an untrusted source anyway.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .common import (
    ENV_VAR,
    DatasetError,
    DatasetNotFoundError,
    check_split,
    data_dir,
    download_file,
    file_md5,
    sources_text,
    unique,
)

__all__ = ["load_cifar"]

log = logging.getLogger(__name__)


class _DatasetUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batch files: only containers and numpy arrays are allowed."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if module.startswith("numpy.core"):  # pickles written by numpy < 2
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file ({e})") from e
    try:
        obj = _DatasetUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a bad file
        raise DatasetError(
            f"{path}: corrupt or unsupported pickle ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


_CIFAR = {
    10: {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
    },
    100: {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
    },
}


def _find_cifar(bases: Sequence[Path], spec: dict, split: str) -> Path | None:
    names = spec[split]
    for base in bases:
        for d in (base / spec["folder"], base):
            if all((d / n).is_file() for n in names):
                return d
    return None


def _extract_tar(archive: Path, target: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter="data")
        else:  # pragma: no cover - Python < 3.10.12
            for m in tar.getmembers():
                if m.name.startswith(("/", "..")) or ".." in Path(m.name).parts:
                    raise DatasetError(f"{archive}: unsafe path {m.name!r} in archive")
            tar.extractall(target)


def load_cifar(
    split: str = "train",
    root: str | Path | None = None,
    num_classes: int = 10,
    *,
    download: bool = False,
) -> TensorDataset:
    """CIFAR-10 / CIFAR-100 from the official python-pickle folders.

    ``root`` is the folder that contains ``cifar-10-batches-py`` (``data_batch_1`` ..
    ``data_batch_5``, ``test_batch``) or ``cifar-100-python`` (``train``, ``test``; the 100
    fine labels are used), or that folder itself.  Without ``root`` the data cache
    (``$TROPNNC_DATA`` / ``data_dir()``, also ``.../cifar10`` / ``.../cifar100``) is searched.
    Images: float32 ``(N, 3, 32, 32)`` in ``[0, 1]``.  ``download=True`` fetches and extracts the
    official archive (MD5-checked) into ``root`` (or the data cache) when missing.

    The batch files are pickles: they are read with a restricted unpickler (plain containers
    and numpy arrays only, ``encoding='bytes'``) and only from the dataset folder.
    """
    check_split(split)
    if num_classes not in _CIFAR:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    spec = _CIFAR[num_classes]
    alias = f"cifar{num_classes}"
    cands: list[Path] = []
    if root is not None:
        cands.append(Path(root).expanduser())
    env = os.environ.get(ENV_VAR)
    for base in ([Path(env).expanduser()] if env else []) + [data_dir()]:
        cands += [base, base / alias]
    cands = unique(cands)
    folder = _find_cifar(cands, spec, split)
    if folder is None and download:
        target = Path(root).expanduser() if root is not None else data_dir()
        archive = target / Path(spec["url"]).name
        if not (archive.is_file() and file_md5(archive) == spec["md5"]):
            log.info("downloading %s -> %s", spec["url"], archive)
            download_file(spec["url"], archive, spec["md5"])
        _extract_tar(archive, target)
        folder = _find_cifar([target], spec, split)
    if folder is None:
        files = ", ".join(spec[split])
        raise DatasetNotFoundError(
            f"CIFAR-{num_classes} ({split}) not found: need {spec['folder']}/{{{files}}} in one "
            f"of:\n{sources_text(cands)}\n"
            f"Download {spec['url']}, extract it and pass the folder containing "
            f"{spec['folder']} as root=... (or use download=True with internet access)."
        )
    xs, ys = [], []
    for name in spec[split]:
        path = folder / name
        batch = _load_pickle(path)
        if "data" not in batch or spec["label_key"] not in batch:
            raise DatasetError(
                f"{path}: missing key b'data' or b'{spec['label_key']}' "
                f"(keys: {sorted(map(str, batch))})"
            )
        data = np.asarray(batch["data"])
        labels = np.asarray(batch[spec["label_key"]])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(
                f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(data):
            raise DatasetError(f"{path}: {labels.size} labels for {len(data)} images")
        if not np.issubdtype(labels.dtype, np.integer) or (
            len(labels) and (labels.min() < 0 or labels.max() >= num_classes)
        ):
            raise DatasetError(f"{path}: labels must be integers in 0..{num_classes - 1}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels.astype(np.int64))
    x = torch.from_numpy(np.concatenate(xs)).to(torch.float32).div_(255.0)
    y = torch.from_numpy(np.concatenate(ys))
    return TensorDataset(x, y)
