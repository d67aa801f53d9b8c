"""Experiment tooling: cached training, resumable sweeps, the demo, and the E5/E6 data paths."""

from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import tropnnc
from tropnnc.experiments import datasets, demo, sweep, train_cache
from tropnnc.experiments.train import evaluate, train
from tropnnc.experiments.train_cache import register_dataset, trained_model

TINY_MLP = {"sizes": [16, 12, 8, 3], "input_shape": [1, 4, 4]}


def _tiny(split: str) -> TensorDataset:
    """A 3-class problem on 4x4 images, labelled by a fixed random linear teacher."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    x = torch.rand(240 if split == "train" else 90, 1, 4, 4, generator=g)
    teacher = torch.randn(16, 3, generator=torch.Generator().manual_seed(7))
    return TensorDataset(x, (x.flatten(1) @ teacher).argmax(1))


def _tiny28(split: str) -> TensorDataset:
    g = torch.Generator().manual_seed(2 if split == "train" else 3)
    return TensorDataset(torch.rand(40, 1, 28, 28, generator=g), torch.randint(0, 4, (40,)))


register_dataset("tiny", _tiny, 3)
register_dataset("tiny28", _tiny28, 4)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_trained_model_caches_and_reloads_identically(tmp_path, monkeypatch):
    a = trained_model("mlp", "tiny", 3, tmp_path, config=TINY_MLP, epochs=2)
    folder = train_cache.cache_path("mlp", "tiny", 3, tmp_path, TINY_MLP, epochs=2)
    meta = json.loads((folder / "meta.json").read_text())
    assert (folder / "model.safetensors").is_file()
    assert meta["zoo_name"] == "mlp" and meta["seed"] == 3 and meta["dataset"] == "tiny"
    assert 0 <= meta["test_accuracy"] <= 1 and meta["train_report"]["epochs_run"] >= 1

    def fail(*args, **kwargs):
        raise AssertionError("retrained a cached model")

    monkeypatch.setattr(train_cache, "train", fail)
    b = trained_model("mlp", "tiny", 3, tmp_path, config=TINY_MLP, epochs=2)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.train_meta["test_accuracy"] == meta["test_accuracy"]
    x = torch.rand(5, 1, 4, 4)
    torch.testing.assert_close(a(x), b(x))


def test_trained_model_num_classes_from_dataset(tmp_path):
    model = trained_model("lenet-300-100", "tiny28", 0, tmp_path, epochs=1, train_size=30)
    assert model.zoo_config["num_classes"] == 4
    assert model.train_meta["train_options"]["train_size"] == 30
    assert (
        model.train_meta["train_report"]["n_train"] + model.train_meta["train_report"]["n_val"]
        == 30
    )


def test_parse_method_and_keep_mapping():
    spec = sweep.parse_method("tropnnc+refit:norm=l1,refine=5")
    assert (spec.name, spec.refit, spec.options) == ("tropnnc", True, {"norm": "l1", "refine": 5})
    assert spec.data_driven and spec.method == "tropnnc+refit"
    assert sweep.parse_method("thinet").data_driven
    assert not sweep.parse_method("l1").data_driven
    with pytest.raises(ValueError, match="unknown method"):
        sweep.parse_method("nope")
    ls = sweep.parse_method("model-folding+ls:restarts=2,ls.shrink=0.5")
    assert (ls.name, ls.options, ls.reconstruct) == (
        "model-folding",
        {"restarts": 2},
        {"shrink": 0.5},
    )
    assert ls.method == "model-folding+ls" and not ls.data_driven
    assert ls.reconstruction().shrink == 0.5
    with pytest.raises(ValueError, match="needs the '\\+ls' suffix"):
        sweep.parse_method("tropnnc:ls.shrink=0.5")
    with pytest.raises(ValueError, match="shrink must be in"):
        sweep.parse_method("tropnnc+ls:ls.shrink=2")
    default = sweep.parse_method("default")
    assert (default.label, default.name) == ("default", tropnnc.api.DEFAULT_PIPELINE[0])
    assert default.reconstruction() == tropnnc.api.DEFAULT_PIPELINE[2]
    torch.manual_seed(0)
    cnn = tropnnc.zoo.build("e2-cnn")
    assert sweep.keep_mapping(cnn, "fc", 0.5) == {"classifier.1": 0.5}
    assert set(sweep.keep_mapping(cnn, "conv", 0.5)) == {"features.0", "features.3"}
    assert len(sweep.keep_mapping(cnn, None, 0.5)) == 3
    with pytest.raises(ValueError, match="not compressible"):
        sweep.keep_mapping(cnn, "classifier.3", 0.5)


def test_sweep_writes_outputs_and_resumes(tmp_path, monkeypatch):
    calls = []
    real = sweep.compress

    def counting(*args, **kwargs):
        calls.append(kwargs.get("seed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "compress", counting)
    methods = ["random", "tropnnc:norm=l1", "thinet", "tropnnc+refit", "zonotope-kmeans"]
    kw = {
        "layers": None,
        "calibration_size": 60,
        "progress": False,
        "cache_dir": tmp_path / "models",
        "configs": {"mlp": TINY_MLP},
        "train_kw": {"epochs": 2},
    }
    out = tmp_path / "sweep"
    csv_path = sweep.run_sweep("mlp", methods, [0.5, 0.25], [0, 1], "tiny", out, **kw)
    rows = _rows(csv_path)
    assert len(rows) == 2 * (1 + 4 * 2) and len(calls) == 16  # zonotope-kmeans skipped
    assert set(sweep.FIELDS) <= set(rows[0])
    by = {(r["label"], r["keep"], r["seed"]): r for r in rows}
    assert by[("thinet", "0.5", "0")]["data_driven"] == "True"
    assert by[("tropnnc+refit", "0.5", "0")]["method"] == "tropnnc+refit"
    assert by[("tropnnc:norm=l1", "0.5", "0")]["data_driven"] == "False"
    assert json.loads(by[("tropnnc:norm=l1", "0.5", "0")]["options"])["norm"] == "l1"
    assert float(by[("tropnnc:norm=l1", "0.5", "0")]["certificate"]) >= 0
    assert int(by[("random", "0.25", "1")]["parameters"]) == (16 * 3 + 3) + (3 * 2 + 2) + 2 * 3 + 3
    assert int(by[("random", "0.25", "1")]["macs"]) == 16 * 3 + 3 * 2 + 2 * 3
    payload = json.loads((out / "results.json").read_text())
    assert len(payload["rows"]) == len(rows) and "zonotope-kmeans" in payload["notes"][0]
    table = (out / "table.md").read_text()
    assert "Uncompressed" in table and "| thinet | yes |" in table and "+-" in table
    assert list(out.glob("*.png"))

    calls.clear()
    sweep.run_sweep("mlp", methods, [0.5, 0.25], [0, 1], "tiny", out, **kw)
    assert calls == [] and len(_rows(csv_path)) == len(rows)

    lines = csv_path.read_text().splitlines(keepends=True)
    csv_path.write_text("".join(lines[:7]))  # header + 6 rows: 12 of 18 rows lost
    sweep.run_sweep("mlp", methods, [0.5, 0.25], [0, 1], "tiny", out, **kw)
    again = _rows(csv_path)
    assert len(calls) == 16 - 5 and len(again) == len(rows)
    assert {(r["label"], r["keep"], r["seed"]) for r in again} == set(by)
    same = {(r["label"], r["keep"], r["seed"]): r["accuracy"] for r in again}
    assert all(same[k] == by[k]["accuracy"] for k in by)  # deterministic reruns


def test_demo_quick(tmp_path):
    table = demo.run_demo(
        tmp_path / "demo",
        quick=True,
        network="mlp",
        dataset="tiny",
        config=TINY_MLP,
        cache_dir=tmp_path / "models",
        calibration_size=50,
        progress=False,
    )
    text = table.read_text()
    rows = _rows(tmp_path / "demo" / "results.csv")
    labels = {r["label"] for r in rows}
    assert {"tropnnc", "tropnnc+refit", "thinet", "l1", "random"} <= labels
    assert "zonotope-kmeans" not in labels and "zonotope-kmeans left out" in text
    assert {r["keep"] for r in rows if r["label"] != "uncompressed"} == {"0.5", "0.1"}
    assert list((tmp_path / "demo").glob("*.png"))


def _write_cifar(root, n_per_batch=8):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n_per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_e5_path_cifar_pickles(tmp_path):
    _write_cifar(tmp_path / "cifar")
    cfg = {"sizes": [3072, 24, 16, 10], "input_shape": [3, 32, 32]}
    out = sweep.run_sweep(
        "mlp",
        ["tropnnc", "thinet"],
        [0.5],
        [0],
        "cifar10",
        tmp_path / "e5",
        calibration_size=20,
        progress=False,
        cache_dir=tmp_path / "models",
        configs={"mlp": cfg},
        train_kw={"epochs": 1},
        data_root=tmp_path / "cifar",
    )
    rows = _rows(out)
    assert [r["label"] for r in rows] == ["uncompressed", "tropnnc", "thinet"]
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert int(rows[1]["parameters"]) == 3072 * 12 + 12 + 12 * 8 + 8 + 8 * 10 + 10


def test_e6_path_imagenet_folder(tmp_path):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            folder = tmp_path / "imagenet" / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                arr = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                image.fromarray(arr).save(folder / f"img{i}.png")
    ds = datasets.load_imagenet("train", tmp_path / "imagenet", image_size=16)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1]
    torch.manual_seed(0)
    model = tropnnc.zoo.build("mlp", sizes=[768, 20, 12, 2], input_shape=[3, 16, 16])
    train(model, TensorDataset(x, y), epochs=1, val_fraction=0)
    result = tropnnc.compress(model, 0.5, "thinet", calibration=x)
    assert 0 <= evaluate(result.model, TensorDataset(x, y)) <= 1
    assert result.params_after < result.params_before
