"""The Torch-Pruning anchor of the sweeps (skipped without the optional torch-pruning)."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tropnnc.counting import count_macs, count_params
from tropnnc.experiments import sweep
from tropnnc.experiments.anchor import torch_pruning
from tropnnc.experiments.train_cache import register_dataset

pytest.importorskip("torch_pruning")


def tiny_net() -> nn.Sequential:
    """8 -> 6 hidden units -> 5 hidden units -> 3, with units 1 and 4 of the first hidden
    layer and unit 2 of the second 10x larger (producer row and consumer column)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)
    ).eval()
    with torch.no_grad():
        for i in (1, 4):
            net[0].weight[i] *= 10
            net[0].bias[i] *= 10
            net[2].weight[:, i] *= 10
        net[2].weight[2] *= 10
        net[2].bias[2] *= 10
        net[4].weight[:, 2] *= 10
    net.input_shape = (8,)
    return net


def test_prunes_named_layers_to_the_compress_widths_by_magnitude():
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = torch_pruning(net, {"0": 0.34})  # K = round(0.34 * 6) = 2, layer "2" untouched
    small = result.model
    assert small[0].out_features == 2 and small[2].in_features == 2
    assert small[2].out_features == 5 and small[4].in_features == 5
    torch.testing.assert_close(small[0].weight, net[0].weight[[1, 4]])  # the large units
    torch.testing.assert_close(small[2].weight, net[2].weight[:, [1, 4]])
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # unchanged
    x = torch.zeros(1, 8)
    assert result.params_before == count_params(net)
    assert result.params_after == count_params(small) == 2 * 9 + 5 * 3 + 3 * 6
    assert (result.macs_before, result.macs_after) == (count_macs(net, x), count_macs(small, x))
    assert result.blocks == [] and result.method == "torch-pruning"

    both = torch_pruning(net, {"0": 3, "2": 0.2}).model  # widths too: 3 and round(1.0) = 1
    assert (both[0].out_features, both[2].out_features) == (3, 1)
    torch.testing.assert_close(both[2].bias, net[2].bias[[2]])  # the large unit of "2"
    kept = [i for i in range(6) if any(torch.equal(net[0].weight[i], r) for r in both[0].weight)]
    assert len(kept) == 3 and {1, 4} <= set(kept)


def _tiny(split: str) -> TensorDataset:
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    x = torch.rand(120 if split == "train" else 60, 1, 4, 4, generator=g)
    teacher = torch.randn(16, 3, generator=torch.Generator().manual_seed(7))
    return TensorDataset(x, (x.flatten(1) @ teacher).argmax(1))


register_dataset("tiny-anchor", _tiny, 3)


def test_sweep_runs_the_anchor_like_any_method(tmp_path):
    kw = {
        "layers": None,
        "progress": False,
        "cache_dir": tmp_path / "models",
        "configs": {"mlp": {"sizes": [16, 12, 8, 3], "input_shape": [1, 4, 4]}},
        "train_kw": {"epochs": 1},
        "calibration_size": 20,
    }
    path = sweep.run_sweep(
        "mlp", ["torch-pruning", "l1"], [0.5], [0], "tiny-anchor", tmp_path / "out", **kw
    )
    with open(path, newline="") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    tp_row, l1 = rows["torch-pruning"], rows["l1"]
    assert tp_row["data_driven"] == "False" and tp_row["certificate"] == "nan"
    assert tp_row["parameters"] == l1["parameters"] and tp_row["macs"] == l1["macs"]
    assert 0 <= float(tp_row["accuracy"]) <= 1
    with pytest.raises(ValueError, match="external anchor, no \\+refit"):
        sweep.parse_method("torch-pruning+refit")
