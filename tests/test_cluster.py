"""Tests of the clustering kernels: spherical k-means (+ refinement), k-means and Ward."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import fcluster, linkage

import tropnnc._memory as memory
import tropnnc.cluster as cl
import tropnnc.cluster._restarts as cl_restarts
import tropnnc.cluster.degenerate as cl_degenerate
import tropnnc.cluster.gram as cl_gram
import tropnnc.cluster.lloyd as cl_lloyd
import tropnnc.cluster.refine as cl_refine
import tropnnc.cluster.seeding as cl_seeding
from tropnnc.cluster import (
    Clustering,
    cosine_residual,
    kmeans,
    spherical_kmeans,
    ward,
    ward_threshold,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to relabelling: the label pairs form a bijection."""
    pairs = {(int(x), int(y)) for x, y in zip(a.tolist(), b.tolist(), strict=True)}
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def direct_residual(d: torch.Tensor, w: torch.Tensor, a: torch.Tensor, u: torch.Tensor):
    """r_i recomputed in point space, independently of the library."""
    cos = torch.einsum("ij,ij->i", d.double(), u.double()[a])
    sin = (1 - cos**2).clamp_min(0).sqrt()
    return torch.where(cos >= 0, w.double() * sin, w.double())


def planted(seed: int, n: int = 60, k: int = 5, d: int = 20, dtype=F64):
    """Points that are positive multiples of k random directions, with random weights."""
    g = gen(seed)
    dirs = unit(torch.randn(k, d, generator=g, dtype=F64))
    labels = torch.randperm(n, generator=g) % k
    scale = torch.rand(n, 1, generator=g, dtype=F64) * 3 + 0.1
    points = (dirs[labels] * scale).to(dtype)
    weights = (torch.rand(n, generator=g, dtype=F64) + 0.05).to(dtype)
    return unit(points), weights, labels


def random_dirs(seed: int, n: int, d: int, dtype=F64):
    g = gen(seed)
    d_ = unit(torch.randn(n, d, generator=g, dtype=F64)).to(dtype)
    return d_, (torch.rand(n, generator=g, dtype=F64) + 0.1).to(dtype)


def check_valid(c: Clustering, n: int, k: int, d: int) -> None:
    assert c.assignment.shape == (n,) and c.assignment.dtype == torch.long
    assert int(c.assignment.min()) >= 0 and int(c.assignment.max()) < k
    assert bool((torch.bincount(c.assignment, minlength=k) > 0).all()), "empty cluster"
    assert c.centroids.shape == (k, d)
    assert bool(torch.isfinite(c.centroids).all())
    assert isinstance(c.objective, float) and c.objective >= 0


# ------------------------------------------------------------------------------------------
# spherical k-means
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_spherical_recovers_planted_partition(seed):
    d, w, labels = planted(seed)
    for refine in (0, 3):
        c = spherical_kmeans(d, w, 5, generator=gen(100 + seed), refine=refine)
        check_valid(c, 60, 5, 20)
        assert same_partition(c.assignment, labels)
        assert c.objective < 1e-6 * float(w.sum())
        torch.testing.assert_close(c.centroids.norm(dim=1), torch.ones(5, dtype=F64))


def test_spherical_recovers_planted_partition_float32():
    d, w, labels = planted(7, dtype=torch.float32)
    c = spherical_kmeans(d, w, 5, generator=gen(0), refine=2)
    assert c.centroids.dtype == torch.float32
    assert same_partition(c.assignment, labels)
    assert c.objective < 1e-2 * float(w.sum())


def test_spherical_deterministic_per_seed_and_seed_dependent():
    d, w = random_dirs(0, 80, 6)
    a = spherical_kmeans(d, w, 10, generator=gen(3), restarts=2, refine=2)
    b = spherical_kmeans(d, w, 10, generator=gen(3), restarts=2, refine=2)
    assert torch.equal(a.assignment, b.assignment)
    assert torch.equal(a.centroids, b.centroids)
    assert a.objective == b.objective
    outs = {
        tuple(spherical_kmeans(d, w, 10, generator=gen(s), restarts=1).assignment.tolist())
        for s in range(8)
    }
    assert len(outs) > 1


def test_spherical_consumes_generator():
    d, w = random_dirs(1, 40, 5)
    g = gen(0)
    first = spherical_kmeans(d, w, 6, generator=g, restarts=1)
    second = spherical_kmeans(d, w, 6, generator=g, restarts=1)
    again = spherical_kmeans(d, w, 6, generator=gen(0), restarts=1)
    assert torch.equal(first.assignment, again.assignment)
    assert g.initial_seed() == 0 and not torch.equal(
        gen(0).get_state(), g.get_state()
    )  # the generator advanced
    check_valid(second, 40, 6, 5)


@pytest.mark.parametrize(
    "case", ["k_near_n", "k_is_n_minus_1", "duplicates", "zero_weights", "all_zero_weights"]
)
def test_spherical_no_empty_cluster_in_hard_cases(case):
    g = gen(11)
    n, d = 30, 4
    dirs, w = random_dirs(2, n, d)
    k = 12
    if case == "k_near_n":
        k = 27
    elif case == "k_is_n_minus_1":
        k = n - 1
    elif case == "duplicates":
        base = unit(torch.randn(3, d, generator=g, dtype=F64))
        dirs = base[torch.arange(n) % 3]  # 3 distinct directions, 12 clusters wanted
    elif case == "zero_weights":
        w = w * (torch.arange(n) % 2)
    else:
        w = torch.zeros(n, dtype=F64)
    for refine in (0, 4):
        for seed in range(3):
            c = spherical_kmeans(dirs, w, k, generator=gen(seed), refine=refine)
            check_valid(c, n, k, d)
            torch.testing.assert_close(c.centroids.norm(dim=1), torch.ones(k, dtype=F64))
            r = direct_residual(dirs, w, c.assignment, c.centroids)
            assert abs(float(r.sum()) - c.objective) <= 1e-9 + 1e-6 * float(w.sum())
    if case == "duplicates":
        assert c.objective < 1e-6 * float(w.sum())


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 25),
    k=st.integers(1, 25),
    d=st.integers(1, 5),
    distinct=st.integers(1, 25),
    zero_frac=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 10_000),
    refine=st.integers(0, 3),
)
def test_spherical_valid_and_consistent_random(n, k, d, distinct, zero_frac, seed, refine):
    g = gen(seed)
    base = unit(torch.randn(distinct, d, generator=g, dtype=F64))
    dirs = base[torch.randint(0, distinct, (n,), generator=g)]
    w = torch.rand(n, generator=g, dtype=F64) * (torch.rand(n, generator=g) >= zero_frac)
    c = spherical_kmeans(dirs, w, k, generator=gen(seed), restarts=2, refine=refine)
    kk = min(k, n)
    check_valid(c, n, kk, d)
    r = direct_residual(dirs, w, c.assignment, c.centroids)
    assert abs(float(r.sum()) - c.objective) <= 1e-9 + 1e-6 * float(w.sum())


@pytest.mark.parametrize("refine", [0, 3])
def test_spherical_objective_matches_direct_recomputation(refine):
    d, w = random_dirs(4, 120, 7)
    c = spherical_kmeans(d, w, 9, generator=gen(0), refine=refine)
    r = direct_residual(d, w, c.assignment, c.centroids)
    assert c.objective == pytest.approx(float(r.sum()), rel=1e-10, abs=1e-9)
    torch.testing.assert_close(cosine_residual(d, w, c.assignment, c.centroids), r)


def test_spherical_lloyd_fixed_point():
    """refine=0: centroids are normalised weighted sums and every unit has its nearest one."""
    d, w = random_dirs(5, 150, 5)
    c = spherical_kmeans(d, w, 8, generator=gen(1), iters=500)
    sums = torch.zeros(8, 5, dtype=F64).index_add_(0, c.assignment, w[:, None] * d)
    torch.testing.assert_close(c.centroids, unit(sums))
    cos = d @ c.centroids.T  # (n, K)
    own = cos.gather(1, c.assignment[:, None]).squeeze(1)
    assert bool((own >= cos.max(dim=1).values - 1e-12).all())


def test_gram_space_scores_match_direct_similarities():
    d, w = random_dirs(6, 50, 9)
    k = 6
    a = torch.stack([torch.arange(50) % k, torch.randperm(50, generator=gen(0)) % k])  # (2, n)
    alpha = torch.rand(2, 50, generator=gen(1), dtype=F64)
    g = d @ d.T
    t = cl_restarts._scatter_columns(g, a, alpha, k)
    used, own, new_a, new_own = cl_lloyd._spherical_step(g, a, alpha, k)
    for r in range(2):
        u = torch.zeros(k, 9, dtype=F64).index_add_(0, a[r], alpha[r][:, None] * d)
        torch.testing.assert_close(t[r], u @ d.T)
        cos = d @ unit(u).T  # (n, K)
        torch.testing.assert_close(own[r], cos.gather(1, a[r][:, None]).squeeze(1))
        torch.testing.assert_close(new_own[r], cos.max(dim=1).values)
        assert torch.equal(new_a[r], cos.argmax(dim=1))
        torch.testing.assert_close(cl_gram._combine(d, a[r], alpha[r], k), u)


def test_block_operator_matches_dense_masked_gram():
    d, _ = random_dirs(7, 30, 4)
    g = d @ d.T
    a = torch.stack([torch.arange(30) % 4, torch.zeros(30, dtype=torch.long)])  # K=4 / one big
    x = torch.randn(2, 30, generator=gen(2), dtype=F64)
    include = torch.tensor([[True, False, True, True], [True, False, False, False]])
    op = cl_refine._block_operator(g, a, 4, include)
    y = (op @ x.reshape(-1)).view(2, 30)
    for r in range(2):
        mask = (a[r][:, None] == a[r][None, :]) & include[r][a[r]][:, None]
        mask = mask.to(F64)
        torch.testing.assert_close(y[r], (g * mask) @ x[r])


@pytest.mark.parametrize("eigh_max", [64, 4, 0])  # exact eigh / mixed / power iteration only
def test_top_eigen_coeffs_are_cluster_eigenvectors(eigh_max, monkeypatch):
    monkeypatch.setattr(cl_refine, "_EIGH_MAX_SIZE", eigh_max)
    d, m = random_dirs(8, 40, 6)
    m[:5] = 0.0
    a = (torch.arange(40) % 5)[None]
    a[0, :5] = 4  # cluster 4 has extra zero-weight members
    a[0, 35:] = 3
    m[torch.nonzero(a[0] == 0)[:, 0]] = 0.0  # cluster 0: all weights zero -> fallback
    alpha, cos = cl_refine._top_eigen_coeffs(d @ d.T, a, m, 5)
    u = cl_gram._combine(d, a[0], alpha[0], 5)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(5, dtype=F64))
    torch.testing.assert_close(cos[0], torch.einsum("ij,ij->i", d, u[a[0]]))
    for k in range(1, 5):
        mem = a[0] == k
        b = (m[mem, None] ** 2 * d[mem]).T @ d[mem]  # sum m_i^2 d_i d_i^T
        v = torch.linalg.eigh(b).eigenvectors[:, -1]
        assert abs(float(u[k] @ v)) == pytest.approx(1.0, abs=1e-8)
        assert float((m[mem] * (d[mem] @ u[k])).sum()) > 0


@pytest.mark.parametrize("seed", range(4))
def test_more_restarts_never_worse(seed):
    d, w = random_dirs(20 + seed, 90, 5)
    one = spherical_kmeans(d, w, 9, generator=gen(seed), restarts=1)
    four = spherical_kmeans(d, w, 9, generator=gen(seed), restarts=4)
    eight = spherical_kmeans(d, w, 9, generator=gen(seed), restarts=8)
    assert eight.objective <= four.objective <= one.objective
    x = torch.randn(90, 3, generator=gen(seed), dtype=F64)
    k1 = kmeans(x, 7, generator=gen(seed), restarts=1)
    k8 = kmeans(x, 7, generator=gen(seed), restarts=8)
    assert k8.objective <= k1.objective


def test_refine_never_worse_and_sometimes_better():
    strictly = 0
    for seed in range(5):
        d, w = random_dirs(30 + seed, 100, 6)
        base = spherical_kmeans(d, w, 10, generator=gen(seed), restarts=2)
        for refine in (1, 3, 10):
            ref = spherical_kmeans(d, w, 10, generator=gen(seed), restarts=2, refine=refine)
            assert ref.objective <= base.objective
            strictly += ref.objective < base.objective - 1e-9
    assert strictly > 0


def test_chunked_restarts_equal_batched(monkeypatch):
    d, w = random_dirs(9, 70, 5)
    batched = spherical_kmeans(d, w, 8, generator=gen(2), restarts=5, refine=3)
    kb = kmeans(d, 8, generator=gen(2), restarts=5)
    monkeypatch.setattr(memory, "RESTART_BUFFER_BYTES", 1)
    chunked = spherical_kmeans(d, w, 8, generator=gen(2), restarts=5, refine=3)
    kc = kmeans(d, 8, generator=gen(2), restarts=5)
    assert torch.equal(batched.assignment, chunked.assignment)
    assert batched.objective == pytest.approx(chunked.objective, rel=1e-12)
    assert torch.equal(kb.assignment, kc.assignment)


def test_spherical_precomputed_gram_and_k_at_least_n():
    d, w = random_dirs(10, 40, 6)
    a = spherical_kmeans(d, w, 5, generator=gen(0))
    b = spherical_kmeans(d, w, 5, generator=gen(0), gram=d @ d.T)
    assert torch.equal(a.assignment, b.assignment)
    for k in (40, 55):
        c = spherical_kmeans(d, w, k, generator=gen(0))
        assert torch.equal(c.assignment, torch.arange(40)) and c.objective == 0.0
        assert torch.equal(c.centroids, d)


# ------------------------------------------------------------------------------------------
# Euclidean k-means
# ------------------------------------------------------------------------------------------


def direct_inertia(x, w, a, c):
    return float((w * ((x - c[a]) ** 2).sum(dim=1)).sum())


@pytest.mark.parametrize("seed", range(3))
def test_kmeans_recovers_blobs(seed):
    g = gen(seed)
    centers = torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]], dtype=F64) + 50
    labels = torch.randperm(100, generator=g) % 4
    x = centers[labels] + 0.1 * torch.randn(100, 3, generator=g, dtype=F64)
    w = torch.rand(100, generator=g, dtype=F64) + 0.5
    c = kmeans(x, 4, generator=gen(seed), weights=w)
    check_valid(c, 100, 4, 3)
    assert same_partition(c.assignment, labels)
    assert c.objective == pytest.approx(direct_inertia(x, w, c.assignment, c.centroids), rel=1e-9)
    means = torch.zeros(4, 3, dtype=F64).index_add_(0, c.assignment, w[:, None] * x)
    means /= torch.zeros(4, dtype=F64).index_add_(0, c.assignment, w)[:, None]
    torch.testing.assert_close(c.centroids, means)
    cg = kmeans(x, 4, generator=gen(seed), weights=w, gram=x @ x.T)
    assert torch.equal(cg.assignment, c.assignment)
    c32 = kmeans(x.float(), 4, generator=gen(seed))
    assert c32.centroids.dtype == torch.float32 and same_partition(c32.assignment, labels)


def brute_force_inertia(x: torch.Tensor, w: torch.Tensor) -> float:
    n = x.shape[0]
    best = float("inf")
    for bits in itertools.product([0, 1], repeat=n - 1):
        a = torch.tensor((0, *bits))
        if int(a.sum()) == 0:
            continue
        cost = 0.0
        for k in (0, 1):
            xs, ws = x[a == k], w[a == k]
            mean = (ws[:, None] * xs).sum(0) / ws.sum()
            cost += float((ws * ((xs - mean) ** 2).sum(1)).sum())
        best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_matches_brute_force_optimum(seed):
    g = gen(seed)
    x = torch.randn(8, 2, generator=g, dtype=F64)
    w = torch.rand(8, generator=g, dtype=F64) + 0.2 if seed % 2 else torch.ones(8, dtype=F64)
    opt = brute_force_inertia(x, w)
    c = kmeans(x, 2, generator=gen(seed), restarts=10, weights=w)
    assert c.objective == pytest.approx(opt, rel=1e-9)
    assert c.objective == pytest.approx(direct_inertia(x, w, c.assignment, c.centroids), rel=1e-9)


@pytest.mark.parametrize("case", ["k_near_n", "duplicates", "zero_weights"])
def test_kmeans_no_empty_cluster_in_hard_cases(case):
    g = gen(3)
    x = torch.randn(24, 3, generator=g, dtype=F64)
    w = None
    k = 10
    if case == "k_near_n":
        k = 23
    elif case == "duplicates":
        x = x[torch.arange(24) % 4]
    else:
        w = torch.rand(24, generator=g, dtype=F64) * (torch.arange(24) % 3 == 0)
    for seed in range(3):
        c = kmeans(x, k, generator=gen(seed), weights=w)
        check_valid(c, 24, k, 3)
        ww = torch.ones(24, dtype=F64) if w is None else w
        assert c.objective == pytest.approx(
            direct_inertia(x, ww, c.assignment, c.centroids), rel=1e-9, abs=1e-9
        )
    if case == "duplicates":
        assert c.objective < 1e-9


def test_kmeans_deterministic():
    x = torch.randn(60, 4, generator=gen(0), dtype=F64)
    a = kmeans(x, 6, generator=gen(5))
    b = kmeans(x, 6, generator=gen(5))
    assert torch.equal(a.assignment, b.assignment) and a.objective == b.objective


# ------------------------------------------------------------------------------------------
# seeding helpers
# ------------------------------------------------------------------------------------------


def test_sample_rows_never_picks_zero_probability():
    p = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0], dtype=F64).expand(5, 5)
    u = torch.tensor([0.0, 1 / 3 - 1e-12, 1 / 3 + 1e-12, 0.999, 1 - 2**-53], dtype=F64)
    assert cl_seeding._sample_rows(p, u).tolist() == [1, 1, 3, 3, 3]


@pytest.mark.parametrize("case", ["duplicates", "zero_weights"])
def test_kpp_seeds_distinct(case):
    d, w = random_dirs(3, 20, 3)
    if case == "duplicates":
        d = d[torch.arange(20) % 2]
    else:
        w[::2] = 0.0
    g = d @ d.T
    u = torch.rand(6, 15, generator=gen(0), dtype=F64)
    seeds = cl_seeding._kpp_seeds(w, 15, u, lambda idx: (1.0 - g[idx]).clamp_min(0))
    for row in seeds.tolist():
        assert len(set(row)) == 15
    if case == "zero_weights":  # positive-weight units are exhausted before zero-weight ones
        assert bool((w[seeds[:, :10]] > 0).all())


# ------------------------------------------------------------------------------------------
# repair helper
# ------------------------------------------------------------------------------------------


def test_repair_empty_moves_largest_residual_distinct_units():
    a = torch.tensor([[0, 0, 0, 1, 1, 3], [2, 2, 2, 2, 2, 2]])  # cluster 2 / clusters 0,1,3 empty
    own = torch.tensor([[0.9, 0.5, 0.7, 0.8, 0.2, 1.0], [1.0, 0.1, 0.2, 0.3, 0.4, 0.5]], dtype=F64)
    res = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8, 0.0], [0.0, 0.9, 0.8, 0.7, 0.6, 0.5]], dtype=F64)
    out = cl_degenerate._repair_empty(a, own, res, 4)
    assert bool((cl_restarts._cluster_counts(out, 4) > 0).all())
    assert out[0].tolist() == [0, 2, 0, 1, 1, 3]  # unit 1 (residual .9) fills cluster 2
    assert out[1].tolist() == [2, 0, 1, 3, 2, 2]  # the three largest residuals, anchor 0 kept


def test_one_member_fallback_takes_the_largest_unit_of_each_vanished_cluster():
    # clusters 0 (sum vanishes), 1 (fine), 2 (vanishes, padding entry -1), 3 (empty)
    alpha = torch.tensor([1.0, -1.0, 2.0, 0.5, 0.0, 0.0, 0.0], dtype=F64)
    cluster = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    unit = torch.tensor([5, 3, 2, 7, 4, 6, -1])
    norm2 = torch.tensor([0.0, 4.0, 1e-40, 0.0], dtype=F64)
    scale = torch.tensor([2.0, 2.5, 1.0, 0.0], dtype=F64)  # cluster 2: 1e-40 < (64 eps)^2
    nonempty = torch.tensor([True, True, True, False])
    one = cl_degenerate._one_member(alpha, cluster, unit, norm2, scale, 1e-16, nonempty)
    assert one.alpha.tolist() == [1.0, 0.0, 2.0, 0.5, 0.0, 1.0, 0.0]
    assert one.clusters.tolist() == [0, 2]
    assert one.units.tolist() == [5, 6]
    fine = torch.tensor([False, True, False, False])
    assert cl_degenerate._one_member(alpha, cluster, unit, norm2, scale, 1e-16, fine) is None


# ------------------------------------------------------------------------------------------
# Ward
# ------------------------------------------------------------------------------------------


def test_ward_exact_cluster_counts_with_duplicates():
    g = gen(0)
    x = torch.randn(12, 3, generator=g, dtype=F64)
    x = torch.cat([x, x[:6], x[:3]])  # duplicates -> tied merge heights
    n = x.shape[0]
    for k in range(1, n + 3):
        lab = ward(x, k)
        kk = min(k, n)
        assert lab.shape == (n,) and lab.dtype == torch.long
        assert sorted(set(lab.tolist())) == list(range(kk))


def test_ward_agrees_with_scipy_on_separated_set():
    g = gen(1)
    centers = torch.tensor([[0.0, 0], [20, 0], [0, 20], [20, 20], [40, 40]], dtype=F64)
    truth = torch.arange(50) % 5
    x = centers[truth] + torch.randn(50, 2, generator=g, dtype=F64)
    lab = ward(x, 5)
    ref = fcluster(linkage(x.numpy(), method="ward"), 5, criterion="maxclust")
    assert same_partition(lab, torch.as_tensor(ref)) and same_partition(lab, truth)


def test_ward_threshold_monotone():
    x = torch.randn(40, 3, generator=gen(2), dtype=F64)
    counts = [int(ward_threshold(x, t).max()) + 1 for t in (0.0, 0.5, 1.0, 2.0, 4.0, 1e6)]
    assert counts[0] == 40 and counts[-1] == 1
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))
    assert len(set(counts)) > 2
    lab = ward_threshold(x, 2.0)
    assert sorted(set(lab.tolist())) == list(range(counts[3]))
    heights = np.sort(linkage(x.numpy(), method="ward")[:, 2])
    assert counts[3] == 40 - int((heights <= 2.0).sum())


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


def test_value_errors():
    d, w = random_dirs(0, 10, 3)
    for k in (0, -2):
        with pytest.raises(ValueError, match="k must be >= 1"):
            spherical_kmeans(d, w, k, generator=gen(0))
        with pytest.raises(ValueError, match="k must be >= 1"):
            kmeans(d, k, generator=gen(0))
        with pytest.raises(ValueError, match="k must be >= 1"):
            ward(d, k)
    with pytest.raises(ValueError, match=r"weights must have shape \(10,\)"):
        spherical_kmeans(d, w[:9], 2, generator=gen(0))
    with pytest.raises(ValueError, match=r"weights must have shape \(10,\)"):
        kmeans(d, 2, generator=gen(0), weights=w[:, None])
    with pytest.raises(ValueError, match=r"gram must have shape \(10, 10\)"):
        spherical_kmeans(d, w, 2, generator=gen(0), gram=torch.eye(9, dtype=F64))
    with pytest.raises(ValueError, match=r"gram must have shape \(10, 10\)"):
        kmeans(d, 2, generator=gen(0), gram=torch.eye(11, dtype=F64))
    with pytest.raises(ValueError, match=r"directions must have shape \(n, d\)"):
        spherical_kmeans(d[0], w, 2, generator=gen(0))
    with pytest.raises(ValueError, match="unit-norm rows"):
        spherical_kmeans(2 * d, w, 2, generator=gen(0))
    with pytest.raises(ValueError, match="non-negative"):
        spherical_kmeans(d, -w, 2, generator=gen(0))
    with pytest.raises(ValueError, match="restarts must be >= 1"):
        kmeans(d, 2, generator=gen(0), restarts=0)
    with pytest.raises(ValueError, match=r"assignment must have shape \(10,\)"):
        cosine_residual(d, w, torch.zeros(9, dtype=torch.long), d[:2])
    with pytest.raises(ValueError, match="threshold must be finite"):
        ward_threshold(d, -1.0)


# ------------------------------------------------------------------------------------------
# Gram products, dtypes and the incremental Lloyd engine
# ------------------------------------------------------------------------------------------


def clustered(seed: int, n: int = 90, k: int = 6, d: int = 40, spread: float = 0.15):
    """Unit directions scattered around k random centres (angles ~ spread), random weights."""
    g = gen(seed)
    centres = unit(torch.randn(k, d, generator=g, dtype=F64))
    labels = torch.randperm(n, generator=g) % k
    dirs = unit(centres[labels] + spread * torch.randn(n, d, generator=g, dtype=F64) / d**0.5)
    return dirs, torch.rand(n, generator=g, dtype=F64) + 0.2, labels


@pytest.mark.parametrize("n", [5, 37, 100])
def test_gram_matrix_strips_and_column_chunks(n, monkeypatch):
    x = torch.randn(n, 23, generator=gen(n), dtype=F64)
    monkeypatch.setattr(cl_gram, "_GRAM_BLOCK", 8)  # several row strips
    g = cl.gram_matrix(x)
    assert g.dtype == F64
    torch.testing.assert_close(g, x @ x.T, rtol=1e-12, atol=1e-12)
    sc = torch.rand(n, generator=gen(0), dtype=F64)
    torch.testing.assert_close(cl.gram_matrix(x, scale=sc), sc[:, None] * (x @ x.T) * sc)
    monkeypatch.setattr(memory, "CHUNK_BYTES", 64)  # float32 conversion a few columns at a time
    g32 = cl.gram_matrix(x, torch.float32)
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32, (x @ x.T).float(), rtol=1e-5, atol=1e-5)
    mean = x.mean(dim=0)
    torch.testing.assert_close(cl.gram_matrix(x, center=mean), (x - mean) @ (x - mean).T)


def test_gram_dtype_policy(monkeypatch):
    small = torch.randn(10, 4, dtype=F64)
    assert cl.gram_dtype(small) == F64
    assert cl.gram_dtype(small.float()) == torch.float32
    assert cl.gram_dtype(small.half()) == torch.float32
    monkeypatch.setattr(cl_gram, "_FLOAT32_GRAM_MACS", 100)  # 10 * 10 * 4 > 100: a "big" product
    assert cl.gram_dtype(small) == torch.float32
    assert cl.gram_matrix(small).dtype == torch.float32


def test_cosine_gram_normalises_without_copy_and_flags_zero_rows():
    x = torch.randn(12, 5, generator=gen(1), dtype=F64) * torch.rand(12, 1, generator=gen(2))
    x[3] = 0.0
    g = cl.cosine_gram(x)
    d = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    torch.testing.assert_close(g, d @ d.T)
    assert g[3].abs().max() == 0 and g.diagonal()[3] == 0
    assert bool((g.diagonal()[torch.arange(12) != 3] == 1).all())
    with pytest.raises(ValueError, match="unit-norm rows"):  # a zero row has no direction
        cl.spherical_kmeans_gram(g, torch.ones(12, dtype=F64), 3, generator=gen(0))


@pytest.mark.parametrize("seed", range(3))
def test_float32_gram_agrees_with_float64_on_the_objective(seed):
    d, w, labels = clustered(seed)
    g64 = d @ d.T
    a = cl.spherical_kmeans_gram(g64, w, 6, generator=gen(seed), refine=0)
    b = cl.spherical_kmeans_gram(g64.float(), w, 6, generator=gen(seed), refine=0)
    assert a.coefficients.dtype == F64 and b.coefficients.dtype == torch.float32
    assert same_partition(a.assignment, labels) and same_partition(b.assignment, labels)
    assert b.objective == pytest.approx(a.objective, rel=1e-4)
    # the objective recomputed in float64 from the float32 run's centroids matches too
    u = unit(cl_gram._combine(d, b.assignment, b.coefficients.double(), 6))
    assert float(direct_residual(d, w, b.assignment, u).sum()) == pytest.approx(
        a.objective, rel=1e-6
    )


def test_spherical_kmeans_with_forced_float32_gram_is_exact_on_multiples(monkeypatch):
    d, w, labels = planted(3)
    monkeypatch.setattr(cl_gram, "_FLOAT32_GRAM_MACS", 0)  # every Gram in float32
    c = spherical_kmeans(d, w, 5, generator=gen(4))
    assert same_partition(c.assignment, labels)
    assert c.centroids.dtype == F64  # combined from the float64 directions
    assert float(direct_residual(d, w, c.assignment, c.centroids).sum()) < 1e-6


def test_spherical_kmeans_gram_matches_spherical_kmeans():
    d, w = random_dirs(12, 70, 6)
    a = spherical_kmeans(d, w, 9, generator=gen(5), refine=2)
    b = cl.spherical_kmeans_gram(d @ d.T, w, 9, generator=gen(5), refine=2)
    assert torch.equal(a.assignment, b.assignment) and a.objective == b.objective
    torch.testing.assert_close(
        a.centroids, unit(cl_gram._combine(d, b.assignment, b.coefficients, 9))
    )
    ident = cl.spherical_kmeans_gram(d @ d.T, w, 70, generator=gen(0))
    assert torch.equal(ident.assignment, torch.arange(70)) and ident.objective == 0.0


def test_merged_gram_is_the_gram_of_the_merged_directions():
    d, w = random_dirs(13, 40, 5)
    c = cl.spherical_kmeans_gram(d @ d.T, w, 7, generator=gen(1))
    u = unit(cl_gram._combine(d, c.assignment, c.coefficients, 7))
    torch.testing.assert_close(cl.merged_gram(d @ d.T, c.assignment, c.coefficients, 7), u @ u.T)
    ag = cl.combine_rows(d @ d.T, c.assignment, c.coefficients, 7)  # (7, 40) A G, given
    torch.testing.assert_close(
        cl.merged_gram(d @ d.T, c.assignment, c.coefficients, 7, product=ag), u @ u.T
    )
    cos, _ = cl.member_cosines(d @ d.T, c.assignment, c.coefficients, 7, product=ag)
    torch.testing.assert_close(cos, (d * u[c.assignment]).sum(dim=1))


@pytest.mark.parametrize("spherical", [True, False])
def test_incremental_lloyd_reaches_a_true_fixed_point(spherical, monkeypatch):
    """Only changed clusters are recomputed; the result must equal a from-scratch check."""
    monkeypatch.setattr(memory, "CHUNK_BYTES", 256)  # row chunks of a few rows
    x = torch.randn(120, 4, generator=gen(7), dtype=F64)
    w = torch.rand(120, generator=gen(8), dtype=F64) + 0.1
    if spherical:
        x = unit(x)
        c = spherical_kmeans(x, w, 9, generator=gen(9), iters=1000)
        sums = torch.zeros(9, 4, dtype=F64).index_add_(0, c.assignment, w[:, None] * x)
        torch.testing.assert_close(c.centroids, unit(sums))
        score = x @ c.centroids.T  # (n, K) cosines
    else:
        c = kmeans(x, 9, generator=gen(9), weights=w, iters=1000)
        score = -(torch.cdist(x, c.centroids) ** 2)
    own = score.gather(1, c.assignment[:, None]).squeeze(1)
    assert bool((own >= score.max(dim=1).values - 1e-12).all())


def test_row_chunk_size_does_not_change_results(monkeypatch):
    d, w = random_dirs(14, 80, 5)
    x = torch.randn(80, 3, generator=gen(3), dtype=F64)
    a = spherical_kmeans(d, w, 11, generator=gen(6))
    ka = kmeans(x, 7, generator=gen(6))
    monkeypatch.setattr(memory, "CHUNK_BYTES", 1)
    b = spherical_kmeans(d, w, 11, generator=gen(6))
    kb = kmeans(x, 7, generator=gen(6))
    assert torch.equal(a.assignment, b.assignment) and a.objective == b.objective
    assert torch.equal(ka.assignment, kb.assignment)  # (its Gram sums columns in chunks)
    assert ka.objective == pytest.approx(kb.objective, rel=1e-12)


def test_kpp_nearest_is_the_seeds_voronoi_assignment():
    d, w = random_dirs(15, 50, 3)
    d = d[torch.arange(50) % 25]  # duplicates: ties go to the earlier seed
    g = d @ d.T
    u = torch.rand(3, 12, generator=gen(0), dtype=F64)
    dis = lambda idx: (1.0 - g[idx]).clamp_min(0)  # noqa: E731
    seeds, near = cl_seeding._kpp_seeds(w, 12, u, dis, nearest=True)
    assert torch.equal(seeds, cl_seeding._kpp_seeds(w, 12, u, dis))
    for r in range(3):
        table = (1.0 - g[seeds[r]]).clamp_min(0)  # (k, n)
        best = table.min(dim=0).values
        first = (table == best).to(torch.int8).argmax(dim=0)  # first minimal seed
        assert torch.equal(near[r], first)


def test_spherical_kmeans_gram_value_errors():
    with pytest.raises(ValueError, match=r"gram must have shape \(n, n\)"):
        cl.spherical_kmeans_gram(torch.eye(3, 4, dtype=F64), torch.ones(3), 2, generator=gen(0))
    with pytest.raises(ValueError, match="gram must be finite"):
        cl.spherical_kmeans_gram(torch.full((3, 3), math.nan), torch.ones(3), 2, generator=gen(0))
    with pytest.raises(ValueError, match="unit-norm rows"):
        cl.spherical_kmeans_gram(2 * torch.eye(3, dtype=F64), torch.ones(3), 2, generator=gen(0))


@pytest.mark.parametrize("per_step", [1, 3, 8])
@pytest.mark.parametrize("truncated", [False, True])
def test_greedy_seeds_are_distinct_with_their_voronoi_assignment(truncated, per_step, monkeypatch):
    if truncated:  # gains over each candidate's 4 nearest units only
        monkeypatch.setattr(cl_seeding, "_GREEDY_EXACT_WORK", 0)
        monkeypatch.setattr(cl_seeding, "_GREEDY_NEIGHBOURS", 4)
    d, w, _ = clustered(16, n=60, k=5)
    d = d[torch.arange(60) % 30]  # duplicates
    w[7] = 50.0  # one unit with most of the mass: it straddles the slices of a step
    g = d @ d.T
    u = torch.rand(3, 20, cl_seeding._local_trials(20), generator=gen(0), dtype=F64)
    seeds, near = cl_seeding._greedy_cosine_seeds(g, w, 20, u, 1e-12, per_step=per_step)
    for r in range(3):
        assert len(set(seeds[r].tolist())) == 20
        table = g[seeds[r]]  # (k, n) cosines to the seeds
        first = (table == table.max(dim=0).values).to(torch.int8).argmax(dim=0)
        assert torch.equal(near[r], first)


def test_greedy_seeds_of_one_step_do_not_split_a_direction():
    """Several seeds per step: a winner that is more similar to an earlier winner of its
    step than to any seed so far yields, so duplicated directions never give two seeds
    (with independent winners every restart here took some direction twice)."""
    for seed in range(5):
        d, w, _ = clustered(16 + seed, n=60, k=5)
        d = d[torch.arange(60) % 30]  # every direction twice
        g = d @ d.T
        u = torch.rand(4, 20, cl_seeding._local_trials(20), generator=gen(seed), dtype=F64)
        seeds, _ = cl_seeding._greedy_cosine_seeds(g, w, 20, u, 1e-12, per_step=8)
        for r in range(4):
            cos = g[seeds[r]][:, seeds[r]] - 2 * torch.eye(20, dtype=F64)  # off-diagonal
            assert float(cos.max()) < 1 - 1e-12


@pytest.mark.parametrize("per_step", [2, 4])
def test_greedy_seeding_of_all_but_one_unit(per_step):
    """k = n - 1 with several seeds per step: the last steps fall back to the units left,
    which must not count winners a step dropped as chosen (it raised an IndexError)."""
    for seed in range(10):
        x = torch.randn(40, 6, generator=gen(seed), dtype=F64)
        d = x / x.norm(dim=1, keepdim=True)
        w = torch.rand(40, generator=gen(seed + 100), dtype=F64)
        u = torch.rand(3, 39, cl_seeding._local_trials(39), generator=gen(seed + 200), dtype=F64)
        seeds, near = cl_seeding._greedy_cosine_seeds(d @ d.T, w, 39, u, 1e-12, per_step=per_step)
        for r in range(3):
            assert len(set(seeds[r].tolist())) == 39
            table = (d @ d.T)[seeds[r]]
            assert torch.equal(near[r], (table == table.max(0).values).byte().argmax(0))


def test_greedy_seeding_lowers_the_seeding_potential():
    d, w, _ = clustered(17, n=200, k=20, d=30, spread=0.6)
    g = d @ d.T
    tol = 16 * torch.finfo(F64).eps

    def potential(seeds):  # sum_j w_j min_s (1 - cos(s, j)) per restart
        return ((1 - g[seeds]).clamp_min(0).amin(dim=1) * w).sum(dim=1)

    u = torch.rand(8, 30, cl_seeding._local_trials(30), generator=gen(1), dtype=F64)
    greedy, _ = cl_seeding._greedy_cosine_seeds(g, w, 30, u, tol)
    plain = cl_seeding._kpp_seeds(w, 30, u[:, :, 0], lambda idx: (1 - g[idx]).clamp_min(0))
    assert float(potential(greedy).mean()) < 0.9 * float(potential(plain).mean())


def test_member_cosines_match_the_point_space_values():
    x = torch.randn(40, 7, generator=gen(3), dtype=F64)
    d = x / x.norm(dim=1, keepdim=True)
    a = torch.randint(0, 5, (40,), generator=gen(4))
    a[:5] = torch.arange(5)
    alpha = torch.rand(40, generator=gen(5), dtype=F64)
    cos, norm = cl.member_cosines(d @ d.T, a, alpha, 5)
    r = torch.zeros(5, 7, dtype=F64).index_add_(0, a, alpha[:, None] * d)  # (5, 7) r_c
    torch.testing.assert_close(norm, r.norm(dim=1))
    torch.testing.assert_close(cos, (d * r[a]).sum(dim=1) / r.norm(dim=1)[a])


@pytest.mark.parametrize("exact_work", [None, 0, 2 * 5 * 80 * 24])
@pytest.mark.parametrize("per_step", [1, 4])
def test_greedy_seeding_restarts_are_independent(per_step, exact_work, monkeypatch):
    """Restart r depends on its own row of uniforms only (more restarts never change it).

    exact_work 0: truncated gains (4 nearest units); 2 L n k: exact gains, a threshold that a
    rule counting the work of all restarts together would cross at 4 restarts but not at 1.
    """
    if exact_work is not None:
        monkeypatch.setattr(cl_seeding, "_GREEDY_EXACT_WORK", exact_work)
        monkeypatch.setattr(cl_seeding, "_GREEDY_NEIGHBOURS", 4)
    d, w, _ = clustered(18, n=80, k=8)
    w[3] = 40.0  # repeated winners in early steps: restarts take different seed counts
    g = d @ d.T
    u = torch.rand(4, 24, cl_seeding._local_trials(24), generator=gen(2), dtype=F64)
    seeds, near = cl_seeding._greedy_cosine_seeds(g, w, 24, u, 1e-12, per_step=per_step)
    for r in range(4):
        one, one_near = cl_seeding._greedy_cosine_seeds(
            g, w, 24, u[r : r + 1], 1e-12, per_step=per_step
        )
        assert torch.equal(seeds[r : r + 1], one) and torch.equal(near[r : r + 1], one_near)
