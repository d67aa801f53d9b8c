"""The calibration refit of channel groups: every consumer of a residual stream, a
concatenation or an expansion with its depthwise conv gets its group columns refit."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from test_groups import duplicate, randomize_bn
from torch import nn

import tropnnc
from tropnnc import zoo
from tropnnc.graph import GroupSpec, discover


class Residual(nn.Module):
    """stem conv-BN-ReLU, one basic block (conv-BN-ReLU-conv-BN plus the stem), ReLU,
    global mean, Linear: the stream is read by the block's first conv and by the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(6)
        self.conv1 = nn.Conv2d(6, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        h = F.relu(h + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h))))))
        return self.head(h.mean((2, 3)))


def test_residual_duplicates_merge_exactly_with_the_refit():
    torch.manual_seed(0)
    model = Residual().eval()
    randomize_bn(model)
    model = model.double()
    groups = [s for s in discover(model)[0] if isinstance(s, GroupSpec)]
    assert [g.producer for g in groups] == ["stem"]
    assert [c.layer for c in groups[0].consumers] == ["conv1", "head"]
    duplicate(model, [("stem", "bn0"), ("conv2", "bn2")], [(0, 1), (2, 3)])
    x = torch.rand(64, 1, 8, 8, dtype=torch.float64)
    result = tropnnc.compress(model, {"stem": 4}, "tropnnc", calibration=x)
    assert [(b.layer, b.units_after, b.data_driven) for b in result.blocks] == [("stem", 4, True)]
    assert math.isnan(result.blocks[0].certificate)
    y = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(result.model(y), model(y), rtol=1e-7, atol=1e-7)
    assert result.model.conv1.in_channels == 4 == result.model.head.in_features


def test_concatenation_duplicates_merge_exactly_with_the_refit():
    torch.manual_seed(0)
    model = zoo.build("densenet-mini", growth=6).eval()
    randomize_bn(model)
    model = model.double()
    duplicate(model, [("stem.0", "stem.1")], [(0, 5)])
    duplicate(model, [("dense.0.0", "dense.0.1")], [(1, 4)])
    duplicate(model, [("dense.1.0", "dense.1.1")], [(0, 2), (3, 5)])
    keep = {"stem.0": 7, "dense.0.0": 5, "dense.1.0": 4}
    x = torch.rand(64, *model.input_shape, dtype=torch.float64)
    result = tropnnc.compress(model, keep, "tropnnc", calibration=x)
    assert all(b.data_driven and math.isnan(b.certificate) for b in result.blocks)
    y = torch.rand(8, *model.input_shape, dtype=torch.float64)
    torch.testing.assert_close(result.model(y), model(y), rtol=1e-7, atol=1e-7)
    assert result.model.transition[0].in_channels == 7 + 5 + 4 + 6
    assert result.model.dense[2][0].in_channels == 7 + 5 + 4


def test_full_width_with_calibration_keeps_the_outputs():
    """Every group of resnet-mini and mobilenetv2-mini at full width, refit on data: the
    refit's ridge shrinks towards the merged slices, which already fit, so nothing moves
    (blocks, not named here, shrink towards zero and move by about 1e-5)."""
    for name in ("resnet-mini", "mobilenetv2-mini"):
        torch.manual_seed(0)
        model = zoo.build(name).eval()
        randomize_bn(model)
        model = model.double()
        groups = [s.producer for s in discover(model)[0] if isinstance(s, GroupSpec)]
        x = torch.rand(128, *model.input_shape, dtype=torch.float64)
        result = tropnnc.compress(model, dict.fromkeys(groups, 1.0), calibration=x)
        assert [b.layer for b in result.blocks] == groups
        assert all(b.data_driven for b in result.blocks)
        y = torch.rand(16, *model.input_shape, dtype=torch.float64)
        torch.testing.assert_close(result.model(y), model(y), rtol=1e-9, atol=1e-9)


def mse(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((model(x) - reference(x)) ** 2).mean())


def test_refit_groups_of_resnet_and_mobilenet():
    for name, output in (("resnet-mini", "fc"), ("mobilenetv2-mini", "classifier")):
        torch.manual_seed(0)
        model = zoo.build(name).eval()
        randomize_bn(model)
        x = torch.rand(256, *model.input_shape)
        held_out = torch.rand(256, *model.input_shape)
        specs, _ = discover(model)
        refit = tropnnc.compress(model, 0.5, calibration=x)
        free = tropnnc.compress(model, 0.5)
        assert [s.layer for s in refit.skipped] == [output]
        assert [b.layer for b in refit.blocks] == [s.producer for s in specs]
        assert any(isinstance(s, GroupSpec) for s in specs)
        assert all(b.data_driven and math.isnan(b.certificate) for b in refit.blocks)
        assert [b.units_after for b in refit.blocks] == [b.units_after for b in free.blocks]
        assert refit.macs_after == free.macs_after
        assert mse(refit.model, model, held_out) < 0.1 * mse(free.model, model, held_out)


def test_thinet_leaves_groups_with_a_reason():
    torch.manual_seed(0)
    model = zoo.build("resnet-mini").eval()
    x = torch.rand(16, *model.input_shape)
    result = tropnnc.compress(model, 0.5, "thinet", calibration=x)
    why = "is not compressed by thinet (a data-driven method selects units from one consumer"
    assert sum(why in s.reason for s in result.skipped) == 2
    assert [b.layer for b in result.blocks] == ["layer1.0.conv1", "layer2.0.conv1"]


def test_budget_with_calibration_sizes_and_refits_groups():
    torch.manual_seed(0)
    model = zoo.build("resnet-mini").eval()
    x = torch.rand(32, *model.input_shape)
    result = tropnnc.compress(model, budget=0.5, calibration=x)
    every = ["conv1", "layer1.0.conv1", "layer2.0.downsample.0", "layer2.0.conv1"]
    assert [b.layer for b in result.blocks] == every
    assert all(b.data_driven for b in result.blocks)
    assert result.model(x).shape == (32, 10)


def test_token_mlp_refit_reads_every_token():
    """A Linear on (B, T, C) tokens reads each token as one sample (it failed before:
    the reads were shaped (B, C, T))."""
    torch.manual_seed(0)
    model = zoo.build("vit-mini").eval()
    x = torch.rand(64, *model.input_shape)
    held_out = torch.rand(64, *model.input_shape)
    refit = tropnnc.compress(model, {"blocks.0.fc1": 0.5, "blocks.1.fc1": 0.5}, calibration=x)
    free = tropnnc.compress(model, {"blocks.0.fc1": 0.5, "blocks.1.fc1": 0.5})
    assert [b.data_driven for b in refit.blocks] == [True, True]
    assert mse(refit.model, model, held_out) < mse(free.model, model, held_out)
