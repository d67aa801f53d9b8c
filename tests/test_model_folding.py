"""The Model Folding baseline (k-means fold with data-free REPAIR)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import ball_points, forward, random_block
from torch import nn

import tropnnc
from tropnnc import zoo
from tropnnc.block import Block, Member, certificate
from tropnnc.graph import GroupSpec, discover
from tropnnc.methods import get_method, methods
from tropnnc.methods.model_folding import fold_repair, robust_scale
from tropnnc.surgery import extract


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def duplicate_block(
    k: int = 4, per: int = 3, d: int = 6, m: int = 5, same_out: bool = True
) -> Block:
    g = gen(3)
    rows = torch.randn(k, d + 1, generator=g, dtype=torch.float64).repeat_interleave(per, 0)
    out = torch.randn(k if same_out else k * per, m, 1, generator=g, dtype=torch.float64)
    if same_out:
        out = out.repeat_interleave(per, 0)
    perm = torch.randperm(k * per, generator=g)
    return Block(
        "fc", rows[perm], out[perm], torch.zeros(m, dtype=torch.float64), 2.0, "linear", (d,)
    )


@pytest.mark.parametrize("features,same_out", [("both", True), ("producer", False)])
def test_exact_on_duplicate_channels(features, same_out):
    assert "model-folding" in methods()
    block = duplicate_block(same_out=same_out)
    merge = get_method("model-folding", features=features).merge(block, 4, gen())
    assert merge.k == 4 and merge.rows.shape == (4, 7) and merge.out.shape == (4, 5, 1)
    x = ball_points(300, 6, 2.0)
    assert torch.allclose(
        forward(block, merge.rows, merge.out, x),
        forward(block, block.weight, block.out, x),
        atol=1e-10,
    )
    assert float(certificate(block, merge).max()) < 1e-9
    assert torch.all(merge.shares == 1)


@pytest.mark.parametrize("approx_repair", [True, False])
def test_measured_error_never_exceeds_certificate(approx_repair):
    for seed in range(3):
        block = random_block(20, 5, 4, seed=seed, radius=1.5)
        merge = get_method("model-folding", approx_repair=approx_repair).merge(block, 7, gen(seed))
        x = ball_points(2000, 5, 1.5, seed=seed + 7)
        err = (
            (forward(block, merge.rows, merge.out, x) - forward(block, block.weight, block.out, x))
            .abs()
            .amax(0)
        )
        assert torch.all(err <= certificate(block, merge) + 1e-9)


def test_rows_are_cluster_means_and_slices_sums_without_repair():
    block = random_block(12, 4, 3, seed=5)
    merge = get_method("model-folding", approx_repair=False).merge(block, 5, gen())
    for c in range(5):
        members = merge.assignment == c
        assert members.any()
        assert torch.allclose(merge.rows[c], block.weight[members].mean(0))
        assert torch.allclose(merge.out[c], block.out[members].sum(0))


def test_fold_repair_restores_member_std():
    """Two orthogonal members of equal std: the mean row has std s / sqrt(2); repaired: s."""
    w = torch.tensor([[2.0, 0.0, 0.3], [0.0, 2.0, -0.1]], dtype=torch.float64)
    bn = {
        "weight": torch.tensor([1.5, -1.5], dtype=torch.float64),
        "bias": torch.tensor([0.3, -0.1], dtype=torch.float64),
        "running_mean": torch.zeros(2, dtype=torch.float64),
        "running_var": torch.ones(2, dtype=torch.float64),
        "eps": torch.zeros(2, dtype=torch.float64),
    }
    block = Block(
        "fc", w, torch.ones(2, 1, 1, dtype=torch.float64), None, 1.0, "linear", (2,), bn=bn
    )
    mean_row = w.mean(0, keepdim=True)
    fixed = fold_repair(block, torch.tensor([0, 0]), mean_row)
    assert torch.allclose(fixed[0, :2], mean_row[0, :2] * math.sqrt(2))
    # the mean is kept: the predicted mean of the repaired row is mean(beta) = 0.1
    assert float(fixed[0, 2]) == pytest.approx(math.sqrt(2) * 0.1 + (1 - math.sqrt(2)) * 0.1)
    # no BN: the whole row is scaled (members' norms 2 and 2, mean row norm sqrt(2))
    plain = fold_repair(
        Block("fc", w, block.out, None, 1.0, "linear", (2,)), torch.tensor([0, 0]), mean_row
    )
    assert torch.allclose(plain, mean_row * math.sqrt(2))


def test_robust_scale():
    x = torch.tensor(
        [[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0], [5.0, 5.0]], dtype=torch.float64
    )
    y = robust_scale(x)
    assert torch.allclose(y[:, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64))
    assert torch.all(y[:, 1] == 0)


def test_conv_widths_and_same_seed_same_result():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12 * 16, 10),
    ).eval()
    shape = {"example_inputs": torch.zeros(1, 1, 8, 8)}  # for the input domain
    a = tropnnc.compress(model, 0.5, "model-folding", seed=3, **shape)
    b = tropnnc.compress(model, 0.5, "model-folding", seed=3, **shape)
    assert [blk.units_after for blk in a.blocks] == [4, 6]
    assert a.model[0].out_channels == 4 and a.model[4].in_channels == 4
    assert a.model[8].in_features == 6 * 16
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert a.model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert all(math.isfinite(blk.certificate) for blk in a.blocks)
    with pytest.raises(ValueError, match="features"):
        tropnnc.compress(model, 0.5, "model-folding", features="all")


def test_fold_repair_of_a_group_repairs_each_member_with_its_own_batchnorm():
    """Joined rows [A | B]: A's two rows point the same way (mean row already has its
    members' std: scale 1), B's are orthogonal (scale sqrt(2)); each member's bias moves
    about its own BN beta. The whole-row repair would use one scale for both."""
    a = torch.tensor([[1.0, 1.0, 0.2], [2.0, 2.0, -0.4]], dtype=torch.float64)
    b = torch.tensor([[3.0, 0.0, 0.5], [0.0, 3.0, 0.1]], dtype=torch.float64)

    def stats(gamma: list[float], beta: list[float]) -> dict[str, torch.Tensor]:
        f64 = {"dtype": torch.float64}
        return {
            "weight": torch.tensor(gamma, **f64),
            "bias": torch.tensor(beta, **f64),
            "running_mean": torch.zeros(2, **f64),
            "running_var": torch.ones(2, **f64),
            "eps": torch.zeros(2, **f64),
        }

    members = (
        Member(0, 3, stats([1.0, 1.0], [0.2, -0.4])),
        Member(3, 6, stats([2.0, -2.0], [0.5, 0.1])),
    )
    w = torch.cat([a, b], dim=1)
    block = Block(
        "g", w, torch.ones(2, 1, 1, dtype=torch.float64), None, 1.0, "conv", (5,), members=members
    )
    mean_row = w.mean(0, keepdim=True)
    fixed = fold_repair(block, torch.tensor([0, 0]), mean_row)
    torch.testing.assert_close(fixed[0, :3], mean_row[0, :3])  # A: cos 1, std kept
    torch.testing.assert_close(fixed[0, 3:5], mean_row[0, 3:5] * math.sqrt(2))
    beta = 0.3  # mean of B's betas: the repaired bias keeps the members' mean
    assert float(fixed[0, 5]) == pytest.approx(math.sqrt(2) * 0.3 + (1 - math.sqrt(2)) * beta)
    whole = fold_repair(replace(block, members=None), torch.tensor([0, 0]), mean_row)
    assert not torch.allclose(whole, fixed)


def test_group_members_cover_the_joined_rows_with_their_batchnorms():
    torch.manual_seed(0)
    model = zoo.build("resnet-mini").eval()
    spec = next(s for s in discover(model)[0] if isinstance(s, GroupSpec))
    block = extract(model, spec)
    assert [(m.start, m.stop, m.channelwise) for m in block.members] == [
        (0, 10, False),
        (10, 83, False),
    ]  # the stem reads 1 x 3 x 3 pixels (+ bias), the block's conv2 8 x 3 x 3 channels
    bn = model.get_submodule("layer1.0.bn2")
    torch.testing.assert_close(block.members[1].bn["running_var"], bn.running_var.double())
    sub = block.subset(torch.tensor([3, 1]))
    torch.testing.assert_close(sub.members[1].bn["weight"], bn.weight.double()[[3, 1]])


def test_residual_group_duplicates_collapse_exactly_with_model_folding():
    """Every producer of the stage-1 stream duplicates channels (0, 1) and (2, 3):
    k-means on the rows pairs them, the per-member repair keeps scale 1: exact."""
    torch.manual_seed(0)
    model = zoo.build("resnet-mini").eval().double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
                mod.bias.copy_(torch.rand(n, generator=g, dtype=torch.float64) - 0.5)
        for layer, bn in [("conv1", "bn1"), ("layer1.0.conv2", "layer1.0.bn2")]:
            b = model.get_submodule(bn)
            for t in (model.get_submodule(layer).weight, b.weight, b.bias, b.running_var):
                t[1], t[3] = t[0], t[2]
    result = tropnnc.compress(model, {"conv1": 6}, "model-folding", features="producer", radius=1.0)
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-10, atol=1e-10)
    assert result.model.layer1[0].conv1.in_channels == 6
