"""Tests of the tropical layer: zonotope identities, exact Hausdorff distances and the bounds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull

from tropnnc.tropical import (
    block_forward,
    extend,
    hausdorff_exact,
    hausdorff_grid,
    p5a_bound,
    p5b_bound,
    share_bound,
    tropical_forward,
    zonotope_generators,
    zonotope_support,
    zonotope_vertices,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def subset_sums(gens: torch.Tensor) -> torch.Tensor:
    """All 2^n subset sums (2^n, D) of the generators (n, D): a brute-force zonotope."""
    n = gens.shape[0]
    masks = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=F64)
    return masks.reshape(2**n, n) @ gens


def ball_points(g: torch.Generator, q: int, d: int, radius: float) -> torch.Tensor:
    """q points of the ball of the given radius, half of them on its boundary sphere."""
    x = randn(g, q, d)
    x = x / x.norm(dim=1, keepdim=True)
    r = torch.rand(q, generator=g, dtype=F64) ** (1.0 / d) * radius
    r[: q // 2] = radius
    return x * r[:, None]


def balanced_assignment(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    """A random assignment of n units to k clusters, none of them empty."""
    return (torch.arange(n) % k)[torch.randperm(n, generator=g)]


def cluster_sum(values: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros((k,) + tuple(values.shape[1:]), dtype=values.dtype)
    return out.index_add_(0, assignment, values)


# ------------------------------------------------------------------------------------------
# Zonotope identities
# ------------------------------------------------------------------------------------------


def test_extend_appends_ones() -> None:
    x = randn(gen(0), 5, 3)
    z = extend(x)
    assert z.shape == (5, 4)
    assert torch.equal(z[:, :3], x)
    assert torch.equal(z[:, 3], torch.ones(5, dtype=F64))


@pytest.mark.parametrize("dim", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_support_equals_max_over_subset_sums(dim: int, n: int) -> None:
    g = gen(10 * dim + n)
    gens, z = randn(g, n, dim), randn(g, 9, dim)
    brute = (z @ subset_sums(gens).T).max(dim=1).values  # (9,)
    torch.testing.assert_close(zonotope_support(gens, z), brute, rtol=0, atol=1e-12)


def test_support_batches_over_leading_dims() -> None:
    g = gen(1)
    gens, z = randn(g, 3, 5, 4), randn(g, 3, 6, 4)
    batched = zonotope_support(gens, z)
    assert batched.shape == (3, 6)
    for j in range(3):
        torch.testing.assert_close(batched[j], zonotope_support(gens[j], z[j]))


def test_zonotope_generators_split_by_sign() -> None:
    g = gen(2)
    weight, out = randn(g, 6, 4), randn(g, 6, 3)
    out[0, 1] = 0.0
    pos, neg = zonotope_generators(weight, out)
    assert pos.shape == neg.shape == (3, 6, 4)
    torch.testing.assert_close(pos - neg, out.T[:, :, None] * weight[None])
    assert torch.all(pos[out.T <= 0] == 0) and torch.all(neg[out.T >= 0] == 0)
    torch.testing.assert_close(pos[out.T > 0], (out.T[:, :, None] * weight)[out.T > 0])


@pytest.mark.parametrize(
    ("n", "d", "m", "q"), [(1, 1, 1, 3), (7, 3, 1, 20), (12, 5, 4, 30), (40, 10, 9, 50)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_tropical_forward_equals_block_forward(
    n: int, d: int, m: int, q: int, with_bias: bool
) -> None:
    g = gen(n + d + m)
    weight, out, x = randn(g, n, d + 1), randn(g, n, m), 3 * randn(g, q, d)
    out[0, 0] = 0.0  # a unit that an output does not read
    bias = randn(g, m) if with_bias else None
    y = block_forward(weight, out, bias, x)
    assert y.shape == (q, m)
    torch.testing.assert_close(tropical_forward(weight, out, bias, x), y, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------
# Vertices
# ------------------------------------------------------------------------------------------


def generic_vertex_count(n: int, dim: int) -> int:
    """Vertices of a zonotope with n generators in general position in R^dim."""
    return 2 * sum(math.comb(n - 1, k) for k in range(dim))


def assert_vertices_exact(gens: torch.Tensor, verts: torch.Tensor) -> None:
    """Every vertex is a subset sum and conv(vertices) has the zonotope's support function."""
    sums = subset_sums(gens)
    gap = (verts[:, None, :] - sums[None, :, :]).norm(dim=2)  # (V, 2^n)
    assert gap.min(dim=1).values.max() < 1e-9
    u = randn(gen(99), 300, gens.shape[1])
    torch.testing.assert_close(
        (u @ verts.T).max(dim=1).values, zonotope_support(gens, u), rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_vertices_of_generic_zonotope(dim: int, n: int) -> None:
    gens = randn(gen(7 * n + dim), n, dim)
    verts = zonotope_vertices(gens)
    assert verts.dtype == F64 and verts.shape[1] == dim
    assert verts.shape[0] == generic_vertex_count(n, dim)
    assert_vertices_exact(gens, verts)
    if n >= dim:  # full-dimensional: every subset sum lies in the hull of the vertices
        hull = ConvexHull(verts.numpy())
        sums = subset_sums(gens).numpy()
        assert (sums @ hull.equations[:, :-1].T + hull.equations[:, -1]).max() < 1e-9


def degenerate_cases() -> dict[str, torch.Tensor]:
    g = gen(3)
    base3 = randn(g, 3, 3)
    return {
        "1d": randn(g, 5, 1),
        "2d collinear": randn(g, 4, 1) @ randn(g, 1, 2),
        "2d parallel and zero": torch.cat(
            [base3[:, :2], -2 * base3[:1, :2], torch.zeros(1, 2, dtype=F64)]
        ),
        "3d collinear": randn(g, 4, 1) @ randn(g, 1, 3),
        "3d coplanar": randn(g, 5, 2) @ randn(g, 2, 3),
        "3d parallel": torch.cat([base3, 0.5 * base3[:2], -base3[2:]]),
        "3d zeros": torch.zeros(3, 3, dtype=F64),
        "3d empty": torch.zeros(0, 3, dtype=F64),
        "3d nearly flat": randn(g, 5, 2) @ randn(g, 2, 3) + 1e-13 * randn(g, 5, 3),
    }


@pytest.mark.parametrize("name", list(degenerate_cases()))
def test_vertices_of_degenerate_zonotopes(name: str) -> None:
    gens = degenerate_cases()[name]
    verts = zonotope_vertices(gens)
    assert_vertices_exact(gens, verts)
    if "collinear" in name or name == "1d":
        assert verts.shape[0] == 2
    if name in ("3d zeros", "3d empty"):
        assert verts.shape == (1, 3) and torch.all(verts == 0)
    if name == "3d parallel":  # same zonotope as 3 generic generators, up to translation
        assert verts.shape[0] == 8


# ------------------------------------------------------------------------------------------
# Hausdorff distances
# ------------------------------------------------------------------------------------------


def random_pairs() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = gen(4)
    pairs = []
    for dim in (1, 2, 3):
        for n_a, n_b in ((1, 1), (2, 5), (4, 3), (7, 6)):
            pairs.append((f"{dim}d-{n_a}-{n_b}", randn(g, n_a, dim), randn(g, n_b, dim)))
    for name, gens in degenerate_cases().items():
        dim = gens.shape[1]
        pairs.append((f"{name} vs random", gens, randn(g, 3, dim)))
        pairs.append((f"{name} vs itself perturbed", gens, gens + 0.1 * randn(g, *gens.shape)))
    return pairs


def grid_cover(dim: int, directions: int) -> float:
    """Generous bound on the distance from any unit vector to the nearest grid direction."""
    return {1: 0.0, 2: math.pi / directions, 3: math.sqrt(4 * math.pi / directions)}[dim]


@pytest.mark.parametrize(("name", "a", "b"), random_pairs(), ids=[p[0] for p in random_pairs()])
def test_exact_agrees_with_direction_grid(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    exact = hausdorff_exact(a, b)
    raw = hausdorff_grid(a, b, directions=2048, refine=0)
    refined = hausdorff_grid(a, b, directions=2048)
    assert raw <= refined + 1e-12
    assert refined <= exact + 1e-9  # every direction gives a lower bound (L1)
    # |h_A(u) - h_B(u)| is Lipschitz in u with constant max||A|| + max||B||, so the raw grid
    # is within that times the grid's covering radius of the true supremum
    lip = float(a.norm(dim=1).sum() + b.norm(dim=1).sum())
    assert exact - raw <= lip * grid_cover(a.shape[1], 2048) + 1e-9
    assert exact - refined <= 1e-3 * lip + 1e-9
    assert hausdorff_exact(b, a) == pytest.approx(exact, abs=1e-12)


def test_coarse_grid_is_a_lower_estimate() -> None:
    g = gen(5)
    for dim in (2, 3):
        a, b = randn(g, 6, dim), randn(g, 4, dim)
        exact = hausdorff_exact(a, b)
        for directions in (8, 64, 512):
            assert hausdorff_grid(a, b, directions=directions, refine=0) <= exact + 1e-9


def test_known_values() -> None:
    e = torch.eye(3, dtype=F64)
    # unit square vs its diagonal segment: the corners (1, 0) and (0, 1) are 1/sqrt(2) away
    assert hausdorff_exact(e[:2, :2], (e[0, :2] + e[1, :2])[None]) == pytest.approx(
        1 / math.sqrt(2), abs=1e-12
    )
    # unit cube vs the point 0, vs the unit square, vs the square lifted to height 1/2
    assert hausdorff_exact(e, torch.zeros(0, 3, dtype=F64)) == pytest.approx(math.sqrt(3))
    assert hausdorff_exact(e, e[:2]) == pytest.approx(1.0, abs=1e-12)
    assert hausdorff_exact(e, torch.cat([e[:2], 0.5 * e[2:]])) == pytest.approx(0.5, abs=1e-12)
    # intervals: [-1, 3] vs [-2, 1]
    a, b = torch.tensor([[3.0], [-1.0]], dtype=F64), torch.tensor([[-2.0], [1.0]], dtype=F64)
    assert hausdorff_exact(a, b) == pytest.approx(2.0)


def test_exact_is_zero_for_same_zonotope() -> None:
    g = gen(6)
    for dim in (1, 2, 3):
        gens = randn(g, 6, dim)
        assert hausdorff_exact(gens, gens) < 1e-9
        assert hausdorff_exact(gens, gens[torch.randperm(6, generator=g)]) < 1e-9
        # splitting a generator into two parallel pieces keeps the zonotope
        split = torch.cat([gens[1:], 0.3 * gens[:1], 0.7 * gens[:1]])
        assert hausdorff_exact(gens, split) < 1e-9


def test_segment_lemma_l4() -> None:
    g = gen(7)
    for dim in (1, 2, 3):
        for _ in range(10):
            a, b = randn(g, 5, dim), randn(g, 5, dim)
            for i in range(5):
                seg = hausdorff_exact(a[i : i + 1], b[i : i + 1])
                assert seg <= float((a[i] - b[i]).norm()) + 1e-12
            assert hausdorff_exact(a, b) <= float((a - b).norm(dim=1).sum()) + 1e-12


def test_triangle_inequality() -> None:
    g = gen(8)
    for dim in (1, 2, 3):
        for _ in range(8):
            a, b, c = randn(g, 4, dim), randn(g, 3, dim), randn(g, 5, dim)
            assert hausdorff_exact(a, c) <= hausdorff_exact(a, b) + hausdorff_exact(b, c) + 1e-12


@pytest.mark.parametrize("fn", [hausdorff_exact, hausdorff_grid])
def test_hausdorff_rejects_high_dimension(fn) -> None:
    a = torch.ones(3, 4, dtype=F64)
    with pytest.raises(ValueError, match=rf"{fn.__name__}.*D <= 3.*error bounds \(share_bound"):
        fn(a, a)


def test_vertices_rejects_high_dimension() -> None:
    with pytest.raises(ValueError, match=r"zonotope_vertices.*D <= 3"):
        zonotope_vertices(torch.ones(2, 4, dtype=F64))


# ------------------------------------------------------------------------------------------
# Bounds
# ------------------------------------------------------------------------------------------


def test_share_bound_hand_example() -> None:
    weight = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]], dtype=F64)
    out_abs = torch.tensor([[1.0, 2.0], [3.0, 0.5], [0.5, 1.0]], dtype=F64)
    assignment = torch.tensor([0, 0, -1])
    shares = torch.tensor([2.0, 1.0, 7.0], dtype=F64)  # the dropped unit's share is ignored
    rows = torch.tensor([[1.0, 0.0]], dtype=F64)
    # e = (||(2,0) - 2(1,0)||, ||(1,1) - (1,0)||, ||(0,3)||) = (0, 1, 3)
    bound = share_bound(weight, out_abs, assignment, shares, rows)
    torch.testing.assert_close(bound, torch.tensor([4.5, 3.5], dtype=F64))


def test_share_bound_zero_for_positive_multiples() -> None:
    g = gen(9)
    rows = randn(g, 3, 5)
    assignment = balanced_assignment(g, 12, 3)
    shares = torch.rand(12, generator=g, dtype=F64) * 3 + 0.1
    weight = shares[:, None] * rows[assignment]
    out_abs = randn(g, 12, 4).abs()
    assert share_bound(weight, out_abs, assignment, shares, rows).abs().max() < 1e-12
    # dropping units costs exactly ||w_i|| weighted by |c_ji|
    dropped = assignment.clone()
    dropped[:4] = -1
    expect = (out_abs[:4] * weight[:4].norm(dim=1)[:, None]).sum(dim=0)
    torch.testing.assert_close(share_bound(weight, out_abs, dropped, shares, rows), expect)
    # everything dropped, no rows at all
    none = torch.full((12,), -1)
    torch.testing.assert_close(
        share_bound(weight, out_abs, none, shares, rows[:0]),
        (out_abs * weight.norm(dim=1)[:, None]).sum(dim=0),
    )


def reference_p5a(gens: torch.Tensor, assignment: torch.Tensor) -> float:
    total = 0.0
    for k in assignment.unique().tolist():
        members = gens[assignment == k]
        total += float((members - members.mean(dim=0)).norm(dim=1).sum())
    return total


def reference_p5b(weight: torch.Tensor, out: torch.Tensor, assignment: torch.Tensor):
    total = torch.zeros(out.shape[1], dtype=F64)
    for i in range(weight.shape[0]):
        members = assignment == assignment[i]
        w_mean, c_mean = weight[members].mean(dim=0), out[members].mean(dim=0)
        total += (
            out[i].abs() * (weight[i] - w_mean).norm() + w_mean.norm() * (out[i] - c_mean).abs()
        )
    return total


def test_p5a_p5b_match_loop_references() -> None:
    g = gen(10)
    gens = randn(g, 11, 3)
    assignment = balanced_assignment(g, 11, 4)
    assert p5a_bound(gens, assignment) == pytest.approx(reference_p5a(gens, assignment))
    assert p5a_bound(
        torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]], dtype=F64), torch.tensor([0, 0, 1])
    ) == pytest.approx(2.0)
    weight, out = randn(g, 11, 4), randn(g, 11, 3)
    torch.testing.assert_close(
        p5b_bound(weight, out, assignment), reference_p5b(weight, out, assignment)
    )


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("positive_cone", [True, False])
def test_p5_zonotope_chain(dim: int, positive_cone: bool) -> None:
    """H(Z, Z~) <= P5 (share_bound) <= P5a for merges along the cluster-sum direction."""
    g = gen(11 + dim + 2 * positive_cone)
    n, k, radius = 10, 3, 1.5
    rho = math.sqrt(radius**2 + 1)
    for _ in range(6):
        w = randn(g, n, dim)
        if positive_cone:
            w = w.abs()  # then every share <w_i, u> is positive, no clipping happens
        c = torch.rand(n, generator=g, dtype=F64) + 0.1
        gens = c[:, None] * w  # (n, D)
        assignment = balanced_assignment(g, n, k)
        u = cluster_sum(gens, assignment, k)
        u = u / u.norm(dim=1, keepdim=True)  # (k, D): directions of the cluster sums
        raw = (w * u[assignment]).sum(dim=1)
        shares = raw.clamp(min=0)
        if positive_cone:
            assert torch.all(raw > 0)
        merged_c = cluster_sum(c * shares, assignment, k)  # (k,)
        merged = merged_c[:, None] * u  # (k, D) generators of the merged zonotope
        if positive_cone:  # the merged generator is the cluster sum, as in zonotope K-means
            torch.testing.assert_close(merged, cluster_sum(gens, assignment, k))
        h = hausdorff_exact(gens, merged)
        p5 = float(share_bound(w, c[:, None], assignment, shares, u)[0])
        p5a = p5a_bound(gens, assignment)
        assert h <= p5 + 1e-10
        assert p5 <= p5a + 1e-10
        # T2 on the block itself: |y - y~| <= rho * H on the ball
        x = ball_points(g, 400, dim - 1, radius)
        y = block_forward(w, c[:, None], None, x)
        y_m = block_forward(u, merged_c[:, None], None, x)
        assert float((y - y_m).abs().max()) <= rho * h + 1e-10


def test_c3_with_mixed_signs() -> None:
    """|y_j - y~_j| <= rho * (H(P_j, P~_j) + H(Q_j, Q~_j)) for any two blocks (D = 3)."""
    g = gen(12)
    radius = 2.0
    rho = math.sqrt(radius**2 + 1)
    weight, out = randn(g, 8, 3), randn(g, 8, 2)
    rows, new_out = weight[:5] + 0.2 * randn(g, 5, 3), randn(g, 5, 2)
    pos, neg = zonotope_generators(weight, out)
    pos_m, neg_m = zonotope_generators(rows, new_out)
    x = ball_points(g, 2000, 2, radius)
    err = (block_forward(weight, out, None, x) - block_forward(rows, new_out, None, x)).abs()
    for j in range(2):
        bound = rho * (hausdorff_exact(pos[j], pos_m[j]) + hausdorff_exact(neg[j], neg_m[j]))
        assert float(err[:, j].max()) <= bound + 1e-10


def test_share_bound_certifies_share_merges() -> None:
    """Multi-output, mixed signs, arbitrary rows: measured error <= rho * P5 per output."""
    g = gen(13)
    n, d, m, k, radius = 30, 6, 5, 7, 1.0
    rho = math.sqrt(radius**2 + 1)
    weight, out = randn(g, n, d + 1), randn(g, n, m)
    assignment = balanced_assignment(g, n, k)
    assignment[:3] = -1  # some units dropped outright
    rows = randn(g, k, d + 1)
    rows = rows / rows.norm(dim=1, keepdim=True)
    live = assignment >= 0
    shares = torch.zeros(n, dtype=F64)
    shares[live] = (weight[live] * rows[assignment[live]]).sum(dim=1).clamp(min=0)
    new_out = cluster_sum((shares[:, None] * out)[live], assignment[live], k)
    x = ball_points(g, 3000, d, radius)
    err = (block_forward(weight, out, None, x) - block_forward(rows, new_out, None, x)).abs()
    bound = rho * share_bound(weight, out.abs(), assignment, shares, rows)
    assert torch.all(err.max(dim=0).values <= bound + 1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_p5b_certifies_neural_path_kmeans_merge(seed: int) -> None:
    g = gen(20 + seed)
    n, d, m, k, radius = 24, 5, 4, 6, 2.0
    rho = math.sqrt(radius**2 + 1)
    weight, out = randn(g, n, d + 1), randn(g, n, m)
    assignment = balanced_assignment(g, n, k)
    counts = torch.bincount(assignment, minlength=k).to(F64)
    rows = cluster_sum(weight, assignment, k) / counts[:, None]  # cluster means of w
    new_out = cluster_sum(out, assignment, k)  # cluster sums of c
    x = ball_points(g, 3000, d, radius)
    err = (block_forward(weight, out, None, x) - block_forward(rows, new_out, None, x)).abs()
    bound = rho * p5b_bound(weight, out, assignment)
    assert torch.all(err.max(dim=0).values <= bound + 1e-10)


def test_exact_hausdorff_handles_flat_vs_full_in_numpy_roundtrip() -> None:
    """Float32 input is promoted, and the result is a plain float."""
    g = gen(14)
    a, b = randn(g, 4, 3), randn(g, 2, 2) @ randn(g, 2, 3)
    h = hausdorff_exact(a.float(), b.float())
    assert isinstance(h, float)
    assert h == pytest.approx(hausdorff_exact(a.float().double(), b.float().double()))
    assert np.isfinite(h)
