"""The Gaussian input model and activation moments against exact and Monte Carlo oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm

from tropnnc import moments
from tropnnc.moments import (
    activation_moments,
    block_statistics,
    bvn_upper,
    member_maps,
    relu_cov_pairs,
    relu_cross,
    relu_mean,
    relu_second,
    unit_model,
)

F64 = torch.float64


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


@pytest.mark.parametrize(
    "r",
    [
        -1.0,
        -0.999999,
        -0.95,
        -0.925,
        -0.924,
        -0.6,
        0.0,
        0.3,
        0.74,
        0.76,
        0.925,
        0.99,
        0.9999999,
        1.0,
    ],
)
def test_bivariate_normal_upper_orthant_matches_scipy(r):
    rng = np.random.default_rng(7)
    for h, k in rng.normal(0.0, 1.5, size=(12, 2)):
        ours = float(bvn_upper(_t(h), _t(k), _t(r)))
        if abs(r) < 1:
            ref = multivariate_normal(mean=[0, 0], cov=[[1, r], [r, 1]]).cdf([-h, -k])
        else:  # Y = +-X
            ref = norm.sf(max(h, k)) if r > 0 else max(0.0, norm.sf(h) - norm.cdf(k))
        assert ours == pytest.approx(ref, abs=2e-7)


CASES = [
    (0.0, 1.0, 0.0, 1.0, 0.3),
    (0.5, 2.0, -1.0, 0.7, -0.6),
    (1.0, 1.0, 1.0, 1.0, 0.999),
    (-1.0, 1.0, 2.0, 3.0, -0.999),
    (0.3, 1.0, 0.2, 2.0, 1.0),
    (0.3, 1.0, 0.2, 2.0, -1.0),
    (2.0, 0.5, -3.0, 1.0, 0.95),
    (-0.4, 1.3, 0.1, 0.2, 0.0),
]


@pytest.mark.parametrize("m1,s1,m2,s2,rho", CASES)
def test_relu_moments_match_monte_carlo(m1, s1, m2, s2, rho):
    g = torch.Generator().manual_seed(0)
    count = 1_000_000
    x = torch.randn(count, generator=g, dtype=F64)
    y = torch.randn(count, generator=g, dtype=F64)
    z1 = m1 + s1 * x
    z2 = m2 + s2 * (rho * x + math.sqrt(max(0.0, 1 - rho * rho)) * y)
    a1, a2 = z1.relu(), z2.relu()
    prod = a1 * a2
    tol = 5 * float(prod.std()) / math.sqrt(count) + 1e-12
    assert float(relu_cross(_t(m1), _t(s1), _t(m2), _t(s2), _t(rho))) == pytest.approx(
        float(prod.mean()), abs=tol
    )
    assert float(relu_mean(_t(m1), _t(s1))) == pytest.approx(
        float(a1.mean()), abs=5 * float(a1.std()) / math.sqrt(count)
    )
    sq = a1 * a1
    assert float(relu_second(_t(m1), _t(s1))) == pytest.approx(
        float(sq.mean()), abs=5 * float(sq.std()) / math.sqrt(count)
    )


def test_relu_cross_at_zero_mean_is_the_arc_cosine_kernel():
    rho = torch.linspace(-1, 1, 41, dtype=F64)
    got = relu_cross(_t(0.0), _t(2.0), _t(0.0), _t(3.0), rho)
    q = (1 - rho * rho).clamp(min=0).sqrt()
    want = 6.0 * (q + rho * (math.pi - torch.arccos(rho))) / (2 * math.pi)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("symmetric", [False, True])
def test_relu_cov_pairs_series_equals_the_exact_formula(symmetric):
    """The Hermite series (with exact fallback for strongly correlated pairs) against the
    closed form for every pair: correlations over [-1, 1], means far in both tails, and
    constant units (std 0)."""
    g = torch.Generator().manual_seed(3)
    n = 40
    root = torch.randn(n, 6, generator=g, dtype=F64)
    cov = root @ root.T  # rank 6: many pairs with |rho| near 1
    cov[5], cov[:, 5] = 0.0, 0.0  # a constant unit
    m = 3.0 * torch.randn(n, generator=g, dtype=F64)
    m[:3] = torch.tensor([-9.0, 9.0, 0.0], dtype=F64)
    s = cov.diagonal().sqrt()
    m2, s2, cross = (m, s, cov) if symmetric else (m[:17] + 0.3, s[:17] * 1.5, cov[:, :17] * 1.5)
    got = relu_cov_pairs(m, s, m2, s2, cross, symmetric)
    den = torch.outer(s, s2)
    rho = torch.where(den > 0, cross / torch.where(den > 0, den, 1.0), 0.0).clamp(-1, 1)
    exact = relu_cross(m[:, None], s[:, None], m2[None, :], s2[None, :], rho)
    exact = exact - torch.outer(relu_mean(m, s), relu_mean(m2, s2))
    torch.testing.assert_close(got, exact, atol=1e-11 * float(den.max()), rtol=0)
    assert float(got[5].abs().max()) == 0.0  # a constant has no covariance


def test_relu_cross_with_a_constant_unit_factorises():
    got = relu_cross(_t(1.5), _t(0.0), _t(0.2), _t(1.0), _t(0.7))
    assert float(got) == pytest.approx(1.5 * float(relu_mean(_t(0.2), _t(1.0))), rel=1e-14)
    assert float(relu_cross(_t(-1.0), _t(0.0), _t(0.2), _t(1.0), _t(0.7))) == 0.0


def test_relu_cross_of_a_unit_with_itself_is_its_second_moment():
    m, s = _t(-0.3), _t(1.7)
    assert float(relu_cross(m, s, m, s, _t(1.0))) == pytest.approx(
        float(relu_second(m, s)), rel=1e-12
    )


def test_block_statistics_from_batchnorm_and_isotropic():
    w = torch.tensor([[1.0, 0.0, 0.5], [1.0, 1.0, -1.0], [0.0, -2.0, 0.0]], dtype=F64)
    mean, cov = block_statistics(w, None, sigma=2.0)
    torch.testing.assert_close(mean, w[:, -1])
    torch.testing.assert_close(cov, 4.0 * w[:, :-1] @ w[:, :-1].T)
    bn = {
        "weight": torch.tensor([2.0, -1.0, 0.5], dtype=F64),
        "bias": torch.tensor([0.1, 0.2, 0.3], dtype=F64),
        "running_var": torch.tensor([1.0, 4.0, 0.25], dtype=F64),
        "eps": torch.zeros(3, dtype=F64),
    }
    mean, cov = block_statistics(w, bn)
    torch.testing.assert_close(mean, bn["bias"])
    torch.testing.assert_close(cov.diagonal().sqrt(), bn["weight"].abs())  # stds |gamma|
    cos01 = 1.0 / math.sqrt(2.0)  # cos((1, 0), (1, 1))
    assert float(cov[0, 1]) == pytest.approx(2.0 * 1.0 * cos01)


def test_member_maps_reproduce_rows_in_the_span_and_handle_duplicates():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, generator=g, dtype=F64)
    w[1] = w[0]  # a duplicate: the members' Gram is singular
    assignment = torch.tensor([0, 0, 1, 1, 1, -1])
    rows = torch.zeros(2, 5, dtype=F64)
    rows[0, :-1] = 3.0 * w[0, :-1]
    rows[1, :-1] = w[2, :-1] - 0.5 * w[4, :-1]
    alpha = member_maps(w, rows, assignment, 2)
    torch.testing.assert_close(alpha[:2], torch.tensor([1.5, 1.5], dtype=F64))  # min norm
    torch.testing.assert_close(alpha[2:5], torch.tensor([1.0, 0.0, -0.5], dtype=F64))
    assert alpha[5] == 0


def test_unit_model_of_a_copied_unit_equals_the_original():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, generator=g, dtype=F64)
    rows = w[[2]].clone()
    rows[0, -1] += 0.25  # a new bias: the mean moves by exactly that much
    model = unit_model(w, None, rows, torch.tensor([-1, -1, 0, -1]))
    assert float(model.new_mean[0]) == pytest.approx(float(w[2, -1]) + 0.25)
    torch.testing.assert_close(model.cross[0], model.cov[2])
    assert float(model.new_cov[0, 0]) == pytest.approx(float(model.cov[2, 2]))


@pytest.mark.parametrize("bn", [False, True])
def test_relu_moments_closed_form_match_the_sampled_path(bn):
    g = torch.Generator().manual_seed(5)
    n, d = 7, 4
    w = torch.randn(n, d + 1, generator=g, dtype=F64)
    stats = None
    if bn:
        stats = {
            "weight": torch.rand(n, generator=g, dtype=F64) + 0.5,
            "bias": torch.randn(n, generator=g, dtype=F64),
            "running_var": torch.rand(n, generator=g, dtype=F64) + 0.5,
            "eps": torch.full((n,), 1e-5, dtype=F64),
        }
    assignment = torch.tensor([0, 0, 1, 1, 1, 2, -1])
    rows = torch.stack([w[0] + w[1], 0.5 * w[2] - w[3] + w[4], w[5]])
    model = unit_model(w, stats, rows, assignment)
    exact = activation_moments(model)
    sampled = activation_moments(model, samples=400_000, generator=torch.Generator().manual_seed(0))
    scale = float(exact.new_cov.diagonal().max())
    for a, b in [
        (exact.mean, sampled.mean),
        (exact.new_mean, sampled.new_mean),
        (exact.cross, sampled.cross),
        (exact.new_cov, sampled.new_cov),
    ]:
        torch.testing.assert_close(a, b, atol=0.02 * scale, rtol=0.02)


def test_activation_moments_reject_unknown_activations():
    model = unit_model(
        torch.ones(2, 3, dtype=F64), None, torch.ones(1, 3, dtype=F64), torch.tensor([0, 0])
    )
    with pytest.raises(ValueError, match="activation must be one of"):
        activation_moments(model, "tanh")


@pytest.mark.parametrize("n", [1, 7, 8, 29])
def test_float32_sandwich_is_the_symmetric_product(n):
    """The float32 W S W^T, computed for the row blocks above the diagonal and mirrored,
    is exactly symmetric and the plain product up to float32 rounding."""
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, 5, generator=g, dtype=torch.float64)
    root = torch.randn(5, 5, generator=g, dtype=torch.float64)
    s = root @ root.T
    got = moments._sandwich(w.float(), s)
    assert got.dtype == torch.float64 and torch.equal(got, got.T)
    torch.testing.assert_close(got, w @ s @ w.T, atol=1e-4, rtol=1e-5)
    assert torch.equal(moments._sandwich(w, s), 0.5 * ((w @ s) @ w.T + ((w @ s) @ w.T).T))


@pytest.mark.parametrize("symmetric", [False, True])
def test_one_exact_call_agrees_with_one_call_per_chunk(symmetric, monkeypatch):
    """The exact pairs of all chunks in one relu_cross call: the same covariances up to the
    last bits (many chunks, near-duplicate units so that some pairs are exact)."""
    monkeypatch.setattr(moments, "_SERIES_CHUNK", 40)  # a few rows a chunk
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 6, generator=g, dtype=torch.float64)
    w[6:] = w[:6] + 1e-3 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = w @ w.T
    m = torch.randn(12, generator=g, dtype=torch.float64)
    s = cov.diagonal().sqrt()
    per_chunk = moments.relu_cov_pairs(m, s, m, s, cov, symmetric)
    one = moments.relu_cov_pairs(m, s, m, s, cov, symmetric, one_exact_call=True)
    torch.testing.assert_close(one, per_chunk, atol=1e-14, rtol=1e-12)
