"""Trained experiment networks, cached on disk as safetensors + JSON (no pickle).

``trained_model(network, dataset, seed)`` builds a :mod:`tropnnc.zoo` network, trains it on
the dataset's train split with :func:`tropnnc.experiments.train.train` (Adam, early stopping on a
validation split) and caches it under ``cache_dir/<network>/<dataset>/seed<seed>[-<tag>]``
(``tag``: a hash of non-default zoo config / training options). A cached model reloads from
``model.safetensors`` and ``meta.json`` (zoo name, config, seed, dataset, test accuracy, the
training report) without retraining.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from .. import zoo
from . import datasets
from .train import evaluate, train

log = logging.getLogger(__name__)

#: CPU-fast training defaults (overridable per call through ``train_kw``)
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 128,
    "lr": 1e-3,
    "val_fraction": 0.1,
    "patience": 2,
}


@dataclass(frozen=True)
class _Custom:
    loader: Callable[[str], Dataset]
    num_outputs: int


_CUSTOM: dict[str, _Custom] = {}


def register_dataset(name: str, loader: Callable[[str], Dataset], num_outputs: int) -> None:
    """Make ``loader(split)`` available under ``name`` (e.g. a synthetic set for tests)."""
    _CUSTOM[name] = _Custom(loader, int(num_outputs))


def load_split(dataset: str, split: str, root: str | Path | None = None) -> Dataset:
    """The ``split`` ("train"/"test") of a registered dataset or one of
    :mod:`tropnnc.experiments.datasets`."""
    if dataset in _CUSTOM:
        return _CUSTOM[dataset].loader(split)
    return datasets.get_dataset(dataset, split, root)


def outputs_of(dataset: str) -> int:
    """Number of network outputs for ``dataset`` (1 for binary pairs)."""
    if dataset in _CUSTOM:
        return _CUSTOM[dataset].num_outputs
    return datasets.num_outputs(dataset)


def default_cache_dir() -> Path:
    """``$TROPNNC_MODELS`` or ``data_dir()/models``."""
    env = os.environ.get("TROPNNC_MODELS")
    return Path(env).expanduser() if env else datasets.data_dir() / "models"


def _config_for(network: str, dataset: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The zoo config: the caller's, plus ``num_classes`` when the builder takes it."""
    cfg = dict(config or {})
    if network not in zoo.names():
        raise ValueError(f"unknown zoo network {network!r}; valid: {', '.join(zoo.names())}")
    params = inspect.signature(zoo._ZOO[network]).parameters
    if "num_classes" in params and "num_classes" not in cfg:
        cfg["num_classes"] = outputs_of(dataset)
    return cfg


def cache_path(
    network: str,
    dataset: str,
    seed: int,
    cache_dir: str | Path | None = None,
    config: Mapping[str, Any] | None = None,
    **train_kw: Any,
) -> Path:
    """The folder that holds (or will hold) this trained model."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    extra = {"config": dict(config or {}), "train": dict(sorted(train_kw.items()))}
    tag = ""
    if extra["config"] or extra["train"]:
        blob = json.dumps(extra, sort_keys=True, default=str).encode()
        tag = "-" + hashlib.sha1(blob).hexdigest()[:8]
    return base / network / dataset / f"seed{int(seed)}{tag}"


def load_cached(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a cached model from ``folder`` (weights + meta); no pickle involved."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    model = zoo.build(meta["zoo_name"], **meta["zoo_config"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    model.eval()
    model.train_meta = meta
    return model, meta


def trained_model(
    network: str,
    dataset: str,
    seed: int,
    cache_dir: str | Path | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    data_root: str | Path | None = None,
    retrain: bool = False,
    train_size: int | None = None,
    **train_kw: Any,
) -> nn.Module:
    """The zoo ``network`` trained on ``dataset`` with ``seed`` (cached; see module doc).

    ``config`` overrides zoo constructor arguments; ``train_kw`` go to
    :func:`tropnnc.experiments.train.train` over :data:`TRAIN_DEFAULTS`. The returned model is
    in eval mode and carries ``train_meta`` (the JSON metadata, including ``test_accuracy``).
    ``train_size`` trains on a seeded random subset of the train split (for slow networks).
    """
    sized = {} if train_size is None else {"train_size": int(train_size)}
    folder = cache_path(network, dataset, seed, cache_dir, config, **train_kw, **sized)
    cached = (folder / "meta.json").is_file() and (folder / "model.safetensors").is_file()
    if cached and not retrain:
        log.info("loading cached %s/%s seed %d from %s", network, dataset, seed, folder)
        return load_cached(folder)[0]
    cfg = _config_for(network, dataset, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = zoo.build(network, **cfg)
    kw = {**TRAIN_DEFAULTS, **train_kw}
    train_set = load_split(dataset, "train", data_root)
    if train_size is not None and train_size < len(train_set):
        idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
        train_set = torch.utils.data.Subset(train_set, idx[:train_size].tolist())
    log.info("training %s on %s (seed %d, %d examples)", network, dataset, seed, len(train_set))
    report = train(model, train_set, seed=int(seed), **kw)
    accuracy = evaluate(model, load_split(dataset, "test", data_root))
    meta = {
        "zoo_name": network,
        "zoo_config": model.zoo_config,
        "seed": int(seed),
        "dataset": dataset,
        "test_accuracy": accuracy,
        "train_options": {**{k: v for k, v in kw.items() if k != "progress"}, **sized},
        "train_report": report.to_dict(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / "model.safetensors")
    _atomic_write(folder / "meta.json", json.dumps(meta, indent=2, default=float))
    log.info(
        "%s/%s seed %d: test accuracy %.4f (cached in %s)", network, dataset, seed, accuracy, folder
    )
    model.train_meta = meta
    return model


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
