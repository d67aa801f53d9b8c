"""Training and evaluation of the experiment networks (Adam, early stopping, seeded).

* Multi-class models (``C > 1`` outputs, integer labels) use cross-entropy; single-output
  models (one logit, labels 0/1 as ints or float32 ``(N, 1)`` as made by
  :func:`tropnnc.experiments.datasets.binary_pair`) use ``BCEWithLogitsLoss`` and predict
  class 1 when the logit is > 0.
* Everything random is seeded from ``seed``: the train/validation split (:func:`split_train_val`)
  and the shuffling use private :class:`torch.Generator` objects, and dropout etc. run under
  :func:`torch.random.fork_rng` re-seeded with ``seed``, so the caller's global RNG state is left
  untouched.  Weight initialisation happens when the caller builds the model: seed it there
  (``torch.manual_seed``) to make whole runs reproducible.
* The number of torch threads is left alone (pass ``num_threads`` to change it for the duration
  of one call only).

This module does not depend on the compression code.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

__all__ = ["TrainReport", "evaluate", "split_train_val", "train"]

log = logging.getLogger(__name__)

# Offset between the split seed and the shuffling seed, so that the split depends on ``seed``
# alone (and can be recomputed with split_train_val) while shuffling uses a different stream.
_SHUFFLE_SEED_OFFSET = 1_000_003


@dataclass
class TrainReport:
    """What :func:`train` did.

    ``history`` has one dict per epoch: ``epoch`` (1-based), ``train_loss``, ``train_accuracy``,
    ``val_loss``, ``val_accuracy`` (NaN without a validation split) and ``seconds``.
    ``best_epoch`` is the epoch whose weights the model holds on return.
    """

    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    n_train: int = 0
    n_val: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# data plumbing
# --------------------------------------------------------------------------------------------


def split_train_val(dataset: Dataset, val_fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """Random train/validation split used by :func:`train` (depends only on ``seed``).

    ``round(val_fraction * N)`` examples go to validation (at least one when
    ``val_fraction > 0``, and at least one example is always left for training).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    n_val = int(round(val_fraction * n))
    if val_fraction > 0:
        n_val = max(1, n_val)
    n_val = min(n_val, n - 1)
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g).tolist()
    return Subset(dataset, perm[n_val:]), Subset(dataset, perm[:n_val])


def _as_tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(inputs, labels)`` tensors for (Subsets of) TensorDatasets, else ``None``."""
    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        return ds.tensors[0], ds.tensors[1]
    if isinstance(ds, Subset):
        inner = _as_tensors(ds.dataset)
        if inner is not None:
            idx = torch.as_tensor(list(ds.indices), dtype=torch.long)
            return inner[0][idx], inner[1][idx]
    return None


class _Batches:
    """Mini-batches of a dataset: fast tensor indexing for TensorDatasets, else a DataLoader."""

    def __init__(self, ds: Dataset, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.ds = ds
        self.batch_size = batch_size
        self.tensors = _as_tensors(ds)
        self.n = len(ds)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def iterate(
        self, generator: torch.Generator | None = None, drop_single: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = self.batch_size
        if self.tensors is not None:
            x, y = self.tensors
            order = torch.randperm(self.n, generator=generator) if generator is not None else None
            for start in range(0, self.n, bs):
                if drop_single and start > 0 and self.n - start == 1:
                    return
                if order is None:
                    yield x[start : start + bs], y[start : start + bs]
                else:
                    idx = order[start : start + bs]
                    yield x[idx], y[idx]
        else:
            loader = DataLoader(
                self.ds, batch_size=bs, shuffle=generator is not None, generator=generator
            )
            for i, (xb, yb) in enumerate(loader):
                if drop_single and i > 0 and len(xb) == 1:
                    return
                yield xb, yb


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _is_binary(out: torch.Tensor, y: torch.Tensor) -> bool:
    single = out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)
    if y.is_floating_point() and not single:
        raise ValueError(
            f"float labels need a single-output model (one logit), got outputs of shape "
            f"{tuple(out.shape)}; use integer class labels for multi-class models"
        )
    return single


def _loss_correct(
    out: torch.Tensor, y: torch.Tensor, binary: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and number of correct predictions of a batch."""
    if binary:
        logits = out.reshape(-1)
        target = y.reshape(-1).to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        correct = ((logits > 0) == (target > 0.5)).sum()
    else:
        target = y.reshape(-1).long()
        loss = F.cross_entropy(out, target)
        correct = (out.argmax(dim=1) == target).sum()
    return loss, correct


@torch.no_grad()
def _measure(
    model: nn.Module, batches: _Batches, device: torch.device, binary: bool | None = None
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` (in its current mode) over ``batches``."""
    total_loss, correct, n = 0.0, 0, 0
    for xb, yb in batches.iterate():
        xb, yb = xb.to(device), yb.to(device)
        out = model(xb)
        is_bin = _is_binary(out, yb) if binary is None else binary
        loss, c = _loss_correct(out, yb, is_bin)
        total_loss += float(loss) * len(xb)
        correct += int(c)
        n += len(xb)
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return total_loss / n, correct / n


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 1000) -> float:
    """Accuracy in ``[0, 1]`` of ``model`` on ``dataset`` (evaluated in eval mode).

    Multi-output models predict the arg-max class; single-output models predict class 1 when
    the logit is > 0 (labels 0/1, integer or float).  The model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        _, acc = _measure(model, _Batches(dataset, batch_size), _device_of(model))
    finally:
        model.train(was_training)
    return acc


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(
    model: nn.Module,
    train_set: Dataset,
    *,
    seed: int = 0,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    val_fraction: float = 0.1,
    patience: int | None = 2,
    progress: bool = False,
    weight_decay: float = 0.0,
    num_threads: int | None = None,
) -> TrainReport:
    """Train ``model`` in place with Adam and early stopping; return a :class:`TrainReport`.

    ``val_fraction`` of ``train_set`` (split by :func:`split_train_val` with ``seed``) is held
    out; after every epoch the validation accuracy is measured (ties broken by lower validation
    loss) and training stops once it has not improved for ``patience`` consecutive epochs
    (``patience=None``: never stop early).  The best epoch's weights are restored.  With
    ``val_fraction=0`` all data is used for training and the last weights are kept.

    A trailing mini-batch of a single example is skipped (BatchNorm cannot train on it).  On
    return the model is in eval mode.  ``progress=True`` shows a tqdm bar when stderr is a
    terminal; per-epoch summaries go to the ``tropnnc.experiments.train`` logger (INFO).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if patience is not None and patience < 0:
        raise ValueError(f"patience must be >= 0 or None, got {patience}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")

    start_time = time.perf_counter()
    tr_subset, val_subset = split_train_val(train_set, val_fraction, seed)
    train_batches = _Batches(tr_subset, batch_size)
    val_batches = _Batches(val_subset, max(batch_size, 1000)) if len(val_subset) else None
    device = _device_of(model)
    shuffle_gen = torch.Generator().manual_seed(int(seed) + _SHUFFLE_SEED_OFFSET)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_acc, best_loss, best_epoch = -math.inf, math.inf, 0
    stale = 0
    stopped_early = False
    binary: bool | None = None

    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    bar = tqdm(
        total=epochs * len(train_batches),
        desc="train",
        unit="batch",
        leave=False,
        disable=not (progress and sys.stderr.isatty()),
    )
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(int(seed))
            for epoch in range(1, epochs + 1):
                t0 = time.perf_counter()
                model.train()
                sum_loss, sum_correct, seen = 0.0, 0, 0
                for xb, yb in train_batches.iterate(shuffle_gen, drop_single=True):
                    xb, yb = xb.to(device), yb.to(device)
                    out = model(xb)
                    if binary is None:
                        binary = _is_binary(out, yb)
                    loss, correct = _loss_correct(out, yb, binary)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    batch_loss = float(loss.detach())
                    sum_loss += batch_loss * len(xb)
                    sum_correct += int(correct)
                    seen += len(xb)
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{batch_loss:.4f}", refresh=False)
                train_loss = sum_loss / max(seen, 1)
                train_acc = sum_correct / max(seen, 1)

                if val_batches is not None:
                    model.eval()
                    val_loss, val_acc = _measure(model, val_batches, device, binary)
                else:
                    val_loss, val_acc = math.nan, math.nan
                history.append(
                    {
                        "epoch": epoch,
                        "train_loss": train_loss,
                        "train_accuracy": train_acc,
                        "val_loss": val_loss,
                        "val_accuracy": val_acc,
                        "seconds": time.perf_counter() - t0,
                    }
                )
                log.info(
                    "epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f (%.1fs)",
                    epoch,
                    epochs,
                    train_loss,
                    train_acc,
                    val_loss,
                    val_acc,
                    history[-1]["seconds"],
                )

                if val_batches is None:
                    best_epoch = epoch
                    continue
                if val_acc > best_acc or (val_acc == best_acc and val_loss < best_loss):
                    best_acc, best_loss, best_epoch = val_acc, val_loss, epoch
                    best_state = _snapshot(model)
                    stale = 0
                else:
                    stale += 1
                    if patience is not None and stale >= patience and epoch < epochs:
                        stopped_early = True
                        log.info(
                            "early stopping after epoch %d (best epoch %d, val acc %.4f)",
                            epoch,
                            best_epoch,
                            best_acc,
                        )
                        break
    finally:
        bar.close()
        if num_threads is not None:
            torch.set_num_threads(old_threads)

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainReport(
        epochs_run=len(history),
        best_epoch=best_epoch,
        best_val_accuracy=best_acc if best_state is not None else math.nan,
        seconds=time.perf_counter() - start_time,
        history=history,
        stopped_early=stopped_early,
        n_train=len(tr_subset),
        n_val=len(val_subset),
    )
