"""Sweeps on Ray: each row a Ray task, the same CSV as the local executor.

The Ray test starts a local Ray instance (seconds); it is skipped when the optional extra
``ray`` is not installed. The error paths run without Ray.
"""

from __future__ import annotations

import csv
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

from tropnnc.experiments import sweep
from tropnnc.experiments.train_cache import register_dataset

TINY_MLP = {"sizes": [16, 12, 8, 3], "input_shape": [1, 4, 4]}


def _tiny(split: str) -> TensorDataset:
    g = torch.Generator().manual_seed(4 if split == "train" else 5)
    x = torch.rand(200 if split == "train" else 80, 1, 4, 4, generator=g)
    teacher = torch.randn(16, 3, generator=torch.Generator().manual_seed(8))
    return TensorDataset(x, (x.flatten(1) @ teacher).argmax(1))


register_dataset("ray-tiny", _tiny, 3)


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _sweep(out, **kw):
    return sweep.run_sweep(
        "mlp",
        ["l1", "tropnnc", "tropnnc+refit", "srinivas-babu"],
        [0.5, 0.25],
        [0, 1],
        "ray-tiny",
        out,
        calibration_size=40,
        progress=False,
        cache_dir=out.parent / "models",
        configs={"mlp": TINY_MLP},
        train_kw={"epochs": 2},
        **kw,
    )


def test_ray_sweep_equals_local_row_for_row(tmp_path):
    pytest.importorskip("ray")
    local = _rows(_sweep(tmp_path / "local"))
    assert len(local) == 2 * (1 + 4 * 2)
    distributed = _sweep(tmp_path / "ray", executor="ray")
    rows = _rows(distributed)
    assert [r["label"] for r in rows] == [r["label"] for r in local]  # same order
    for a, b in zip(rows, local, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }
    # resumable like the local CSV: lost rows are redone, the others are not
    lines = distributed.read_text().splitlines(keepends=True)
    distributed.write_text("".join(lines[:6]))
    _sweep(tmp_path / "ray", executor="ray")
    again = _rows(distributed)
    assert [(r["label"], r["keep"], r["seed"], r["accuracy"]) for r in again] == [
        (r["label"], r["keep"], r["seed"], r["accuracy"]) for r in rows
    ]
    assert (tmp_path / "ray" / "table.md").read_text() == (
        tmp_path / "local" / "table.md"
    ).read_text()


def test_executor_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="executor must be one of local, ray, got 'dask'"):
        _sweep(tmp_path / "a", executor="dask")
    with pytest.raises(ValueError, match="address applies to executor='ray' only"):
        _sweep(tmp_path / "b", address="auto")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(
        ValueError,
        match=r"needs the optional package ray: pip install "
        r"'tropnnc\[ray\]'",
    ):
        _sweep(tmp_path / "c", executor="ray")
