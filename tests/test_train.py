"""Tests for tropnnc.experiments.train on tiny synthetic problems (fast, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from tropnnc.experiments.train import TrainReport, evaluate, split_train_val, train

# Tiny models: one thread avoids OpenMP spin-waiting when the other cores are busy (train()
# restores the previous thread count afterwards).
FAST = {"num_threads": 1}


def blobs(n_per_class: int = 100, n_classes: int = 3, dim: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[4.0 * c, 4.0 * ((c * 7) % 3)] for c in range(n_classes)])
    centers = torch.cat([centers, torch.zeros(n_classes, dim - 2)], 1) if dim > 2 else centers
    x = torch.cat(
        [centers[c] + 0.5 * torch.randn(n_per_class, dim, generator=g) for c in range(n_classes)]
    )
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return TensorDataset(x, y)


def mlp(d_in: int = 2, d_out: int = 3, hidden: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def test_multiclass_reaches_high_accuracy():
    ds = blobs()
    model = mlp()
    report = train(model, ds, seed=0, epochs=30, batch_size=32, lr=1e-2, patience=5, **FAST)
    assert isinstance(report, TrainReport)
    assert report.best_val_accuracy >= 0.95
    assert evaluate(model, ds) >= 0.95
    assert report.n_train + report.n_val == len(ds) and report.n_val == 30
    assert report.epochs_run == len(report.history) >= 1
    # the whole run's time covers its epochs' (a sum, not a speed target)
    assert report.seconds >= sum(h["seconds"] for h in report.history)
    assert not model.training
    assert set(report.history[0]) == {
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "seconds",
    }


@pytest.mark.parametrize("float_labels", [True, False])
def test_single_output_binary(float_labels):
    ds = blobs(n_classes=2)
    x, y = ds.tensors
    target = y.float().unsqueeze(1) if float_labels else y
    model = mlp(d_out=1)
    report = train(
        model,
        TensorDataset(x, target),
        seed=1,
        epochs=30,
        batch_size=32,
        lr=1e-2,
        patience=5,
        **FAST,
    )
    assert report.best_val_accuracy >= 0.95
    assert evaluate(model, TensorDataset(x, target)) >= 0.95


def test_same_seed_same_weights_and_rng_untouched():
    ds = blobs(n_per_class=40)

    def run(seed):
        model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
        torch.manual_seed(0)
        for p in model.parameters():
            nn.init.normal_(p, std=0.3)
        state_before = torch.random.get_rng_state()
        report = train(model, ds, seed=seed, epochs=3, batch_size=16)
        assert torch.equal(torch.random.get_rng_state(), state_before)
        return model.state_dict(), report

    a, ra = run(7)
    b, rb = run(7)
    c, _ = run(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val_loss"] for h in ra.history] == [h["val_loss"] for h in rb.history]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_early_stopping_restores_best_weights():
    # random labels: validation accuracy cannot keep improving, so training stops early
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = torch.randint(0, 2, (200,), generator=g)
    ds = TensorDataset(x, y)
    model = mlp(d_in=5, d_out=2, hidden=64)
    report = train(model, ds, seed=0, epochs=50, batch_size=16, lr=5e-2, patience=2, **FAST)
    assert report.stopped_early and report.epochs_run < 50
    hist = report.history
    best = hist[report.best_epoch - 1]
    assert best["val_accuracy"] == report.best_val_accuracy
    assert report.best_val_accuracy == max(h["val_accuracy"] for h in hist)
    assert all(h["val_accuracy"] <= best["val_accuracy"] for h in hist[report.best_epoch :])
    assert report.epochs_run - report.best_epoch == 2  # patience epochs without improvement
    # the model holds the best epoch's weights: its validation loss/accuracy are the best's
    _, val = split_train_val(ds, 0.1, seed=0)
    assert evaluate(model, val) == report.best_val_accuracy
    with torch.no_grad():
        xv = torch.stack([val[i][0] for i in range(len(val))])
        yv = torch.stack([val[i][1] for i in range(len(val))])
        loss = nn.functional.cross_entropy(model(xv), yv).item()
    assert loss == pytest.approx(best["val_loss"], rel=1e-5)
    assert loss != pytest.approx(hist[-1]["val_loss"], rel=1e-5)


def test_no_validation_keeps_last_weights():
    ds = blobs(n_per_class=20)
    threads = torch.get_num_threads()
    report = train(mlp(), ds, epochs=2, val_fraction=0.0, **FAST)
    assert torch.get_num_threads() == threads
    assert report.n_val == 0 and report.epochs_run == 2 and report.best_epoch == 2
    assert math.isnan(report.best_val_accuracy)


def test_evaluate_hand_computed():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])  # predictions 0, 1, 0, 1
    assert evaluate(lin, TensorDataset(x, y), batch_size=3) == 0.75

    one = nn.Linear(1, 1)
    with torch.no_grad():
        one.weight.fill_(1.0)
        one.bias.fill_(0.0)
    x1 = torch.tensor([[-1.0], [2.0], [3.0], [-0.5], [0.5]])  # predictions 0, 1, 1, 0, 1
    assert (
        evaluate(one, TensorDataset(x1, torch.tensor([[0.0], [1.0], [0.0], [0.0], [1.0]]))) == 0.8
    )
    assert evaluate(one, TensorDataset(x1, torch.tensor([1, 1, 1, 0, 1]))) == 0.8
    one.train()
    evaluate(one, TensorDataset(x1, torch.tensor([1, 1, 1, 0, 1])))
    assert one.training  # mode restored


def test_generic_dataset_path():
    class Pairs(Dataset):
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            return self.base[i]

    ds = Pairs(blobs(n_per_class=30))
    model = mlp()
    report = train(model, ds, epochs=15, batch_size=16, lr=1e-2, patience=None, **FAST)
    assert report.best_val_accuracy >= 0.9 and evaluate(model, ds) >= 0.9


def test_argument_checks():
    with pytest.raises(ValueError, match="val_fraction"):
        train(mlp(), blobs(), val_fraction=1.0)
    with pytest.raises(ValueError, match="float labels"):
        x, y = blobs().tensors
        train(mlp(), TensorDataset(x, y.float()), epochs=1)
