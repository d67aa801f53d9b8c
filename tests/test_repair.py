"""Data-free repair from BatchNorm statistics (tropnnc.repair, compress(repair="bn"))."""

from __future__ import annotations

import pytest
import torch
from conftest import ball_points
from torch import nn

import tropnnc
from tropnnc import zoo
from tropnnc.api import compress_block
from tropnnc.block import Block, certificate
from tropnnc.graph import discover
from tropnnc.methods import get_method
from tropnnc.repair import (
    bias_correction,
    bn_repair,
    gaussian_relu_mean,
    gaussian_relu_var,
    merged_stats,
)
from tropnnc.surgery import extract


def test_gaussian_relu_moments_match_monte_carlo():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400_000, generator=g, dtype=torch.float64)
    for m, s in [(0.0, 1.0), (1.5, 0.7), (-0.8, 2.0), (-2.0, 0.8), (2.0, 3.0)]:
        r = torch.relu(m + s * z)
        se = r.std() / len(z) ** 0.5
        assert (
            abs(float(gaussian_relu_mean(torch.tensor(m), torch.tensor(s))) - float(r.mean()))
            < 5 * se + 1e-9
        )
        assert float(gaussian_relu_var(torch.tensor(m), torch.tensor(s))) == pytest.approx(
            float(r.var()), rel=0.02, abs=1e-6
        )
    # s = 0: a constant
    assert torch.allclose(
        gaussian_relu_mean(torch.tensor([-1.0, 0.0, 2.0]), torch.zeros(3)),
        torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64),
    )
    assert torch.all(gaussian_relu_var(torch.tensor([-1.0, 2.0]), torch.zeros(2)) == 0)


def test_merged_stats_and_bias_correction_formulas():
    mu = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64)
    sd = torch.tensor([1.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    a = torch.tensor([0, 0, 1, -1])
    lam = torch.tensor([1.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    m, s = merged_stats(mu, sd, a, lam, 2)
    assert torch.allclose(m, torch.tensor([1.0, 3.0], dtype=torch.float64))  # (1+2)/(1+2)
    assert torch.allclose(s, torch.tensor([1.0, 1.0], dtype=torch.float64))
    kept = torch.tensor([-1, 2])
    m2, _ = merged_stats(mu, sd, a, lam, 2, kept)
    assert float(m2[1]) == 3.0
    out = torch.ones(4, 3, 2, dtype=torch.float64)
    new = torch.zeros(2, 3, 2, dtype=torch.float64)
    delta = bias_correction(out, torch.arange(4.0), new, torch.ones(2))
    assert torch.allclose(delta, torch.full((3,), 2 * 6.0, dtype=torch.float64))


def bn_mlp(n: int = 24, d: int = 10, m: int = 6, seed: int = 0, clustered: bool = False):
    """Linear -> BN1d -> ReLU -> Linear whose BN statistics are exact for x ~ N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, n), nn.BatchNorm1d(n), nn.ReLU(), nn.Linear(n, m))
    model = model.double().eval()
    with torch.no_grad():
        if clustered:  # units near positive multiples of n // 4 directions
            dirs = torch.randn(n // 4, d, generator=g, dtype=torch.float64)
            w = dirs.repeat_interleave(4, 0) * (torch.rand(n, 1, generator=g) + 0.5)
            w = w + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
            model[0].weight.copy_(w)
        else:
            model[0].weight.copy_(torch.randn(n, d, generator=g, dtype=torch.float64))
        model[0].bias.copy_(torch.randn(n, generator=g, dtype=torch.float64))
        bn = model[1]
        bn.running_mean.copy_(model[0].bias)  # pre-BN value a_i x + b_i: mean b_i
        bn.running_var.copy_(model[0].weight.pow(2).sum(1))  # and variance ||a_i||^2
        bn.weight.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.7)
        model[3].weight.copy_(torch.randn(m, n, generator=g, dtype=torch.float64) + 0.3)
    return model


def paired_mean_error(model, small, x):
    """Per-output mean of y - y~ over x and its standard error."""
    with torch.no_grad():
        diff = model(x) - small(x)
    return diff.mean(0), diff.std(0) / len(x) ** 0.5


def test_bias_correction_restores_mean_output_of_pruned_block():
    """l1 pruning keeps units exactly: the correction is then exact up to sampling error."""
    model = bn_mlp()
    x = torch.randn(100_000, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    plain = tropnnc.compress(model, 0.5, "l1").model
    fixed_res = tropnnc.compress(model, 0.5, "l1", repair="bn")
    assert fixed_res.blocks[0].repaired and fixed_res.blocks[0].repair_note is None
    err0, _ = paired_mean_error(model, plain, x)
    err1, se = paired_mean_error(model, fixed_res.model, x)
    assert torch.all(err1.abs() < 5 * se + 1e-9)
    assert err1.abs().sum() < 0.1 * err0.abs().sum()


@pytest.mark.parametrize("method", ["tropnnc", "model-folding", "neural-path-kmeans"])
def test_bias_correction_improves_mean_output_of_merged_block(method):
    model = bn_mlp(clustered=True, seed=1)
    x = torch.randn(50_000, 10, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    err0, _ = paired_mean_error(model, tropnnc.compress(model, 0.25, method).model, x)
    err1, se = paired_mean_error(model, tropnnc.compress(model, 0.25, method, repair="bn").model, x)
    assert err1.abs().sum() < 0.5 * err0.abs().sum()
    assert torch.all(err1.abs() < 0.1 * err0.abs().max() + 5 * se)


def test_repair_is_recorded_no_op_without_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double().eval()
    a = tropnnc.compress(model, 0.5, "tropnnc")
    b = tropnnc.compress(model, 0.5, "tropnnc", repair="bn")
    assert not b.blocks[0].repaired
    assert "no BatchNorm" in b.blocks[0].repair_note
    assert not a.blocks[0].repaired and a.blocks[0].repair_note is None
    x = torch.randn(20, 8, dtype=torch.float64)
    assert torch.equal(a.model(x), b.model(x))
    assert b.blocks[0].certificate == a.blocks[0].certificate
    with pytest.raises(ValueError, match="repair"):
        tropnnc.compress(model, 0.5, repair="stats")


def test_certificate_includes_bias_shift_and_holds():
    model = bn_mlp(n=16, d=6, m=5, seed=3)
    spec = discover(model)[0][0]
    block = extract(model, spec, radius=2.0)
    merge = compress_block(get_method("tropnnc"), block, 6, torch.Generator().manual_seed(0))
    fixed, note = bn_repair(block, merge)
    assert note is None
    delta = fixed.consumer_bias - block.consumer_bias
    assert torch.allclose(certificate(block, fixed), certificate(block, merge) + delta.abs())
    x = ball_points(3000, 6, 2.0)
    xe = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    y = torch.relu(xe @ block.weight.T) @ block.out[:, :, 0] + block.consumer_bias
    yt = torch.relu(xe @ fixed.rows.T) @ fixed.out[:, :, 0] + fixed.consumer_bias
    assert torch.all((y - yt).abs().amax(0) <= certificate(block, fixed) + 1e-9)


def test_bn_repair_no_op_for_merges_without_shares():
    block = Block(
        "fc",
        torch.randn(4, 3, dtype=torch.float64),
        torch.randn(4, 2, 1, dtype=torch.float64),
        None,
        1.0,
        "linear",
        (2,),
        bn={
            "weight": torch.ones(4),
            "bias": torch.zeros(4),
            "running_mean": torch.zeros(4),
            "running_var": torch.ones(4),
            "eps": torch.full((4,), 1e-5),
        },
    )
    from tropnnc.block import Merge

    merge = Merge(block.weight[:2], block.out[:2], torch.tensor([0, 1, -1, -1]), None)
    same, note = bn_repair(block, merge)
    assert same is merge and "share" in note


def test_conv_repair_adds_bias_to_biasless_consumer():
    """ResNet conv2 has no bias: the repair creates one; every conv block is repaired."""
    torch.manual_seed(0)
    model = zoo.build("resnet20", width=4, in_channels=1, input_size=8).eval()
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_var.uniform_(0.5, 2.0)
                mod.bias.uniform_(-0.5, 0.5)
    res = tropnnc.compress(model, 0.5, "tropnnc", repair="bn")
    assert res.blocks and all(b.repaired for b in res.blocks)
    conv2 = res.model.layer1[0].conv2
    assert conv2.bias is not None and model.layer1[0].conv2.bias is None
    assert res.model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_variance_repair_keeps_share_form_and_certificate():
    model = bn_mlp(n=16, d=6, m=5, seed=4, clustered=True)
    spec = discover(model)[0][0]
    block = extract(model, spec, radius=2.0)
    merge = compress_block(get_method("tropnnc"), block, 4, torch.Generator().manual_seed(0))
    fixed, note = bn_repair(block, merge, variance=True)
    assert note is None and fixed.shares is not None
    # out stays the share-weighted sum of the original slices
    rebuilt = torch.zeros_like(fixed.out).index_add_(
        0, fixed.assignment, fixed.shares[:, None, None] * block.out
    )
    assert torch.allclose(rebuilt, fixed.out)
    x = ball_points(2000, 6, 2.0)
    xe = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    y = torch.relu(xe @ block.weight.T) @ block.out[:, :, 0] + block.consumer_bias
    yt = torch.relu(xe @ fixed.rows.T) @ fixed.out[:, :, 0] + fixed.consumer_bias
    assert torch.all((y - yt).abs().amax(0) <= certificate(block, fixed) + 1e-9)
    res = tropnnc.compress(model, 0.25, "tropnnc", repair="bn-var")
    assert res.blocks[0].repaired


def test_span_stats_mean_exact_for_any_input_mean():
    """Merged rows in the members' span: the merged mean follows from the BN means exactly."""
    from tropnnc.repair import span_stats

    g = torch.Generator().manual_seed(2)
    d, n = 7, 9
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    weight = torch.cat([a, b[:, None]], 1)
    ex = torch.randn(d, generator=g, dtype=torch.float64) * 3  # anisotropic, nonzero mean
    mu = a @ ex + b
    sigma = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    assignment = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    coef = torch.rand(n, generator=g, dtype=torch.float64)
    rows = torch.zeros(3, d + 1, dtype=torch.float64).index_add_(
        0, assignment, coef[:, None] * weight
    )
    rows[:, -1] += torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    m, s = span_stats(mu, sigma, weight, assignment, rows)
    assert torch.allclose(m, rows[:, :-1] @ ex + rows[:, -1])
    # a single member: the merged unit is t * member (plus a bias): std t * sigma
    m1, s1 = span_stats(mu, sigma, weight, torch.tensor([0] + [-1] * (n - 1)), 2 * weight[:1])
    assert float(s1[0]) == pytest.approx(2 * float(sigma[0]))
