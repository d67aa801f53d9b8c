"""Every method against exact oracles (certificates, exact merges, known selections), on blocks
built with known structure."""

from __future__ import annotations

import pytest
import torch
from conftest import ball_points, forward, multiples_block, random_block

from tropnnc.api import compress, compress_block
from tropnnc.block import Block, certificate
from tropnnc.methods import get_method, method_class, methods
from tropnnc.methods.neuron_merging import bn_merge_terms

ALL = methods()
CERTIFIED = [
    "tropnnc",
    "neural-path-kmeans",
    "random",
    "l1",
    "neuron-merging",
    "cup",
    "srinivas-babu",
]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registry_lists_every_method():
    assert ALL == sorted(
        [
            "tropnnc",
            "zonotope-kmeans",
            "neural-path-kmeans",
            "random",
            "l1",
            "neuron-merging",
            "cup",
            "srinivas-babu",
            "thinet",
            "model-folding",
            "adaptive",
        ]
    )


def test_adaptive_runs_model_folding_on_batchnorm_blocks_and_tropnnc_elsewhere():
    g = torch.Generator().manual_seed(2)
    w, out = (
        torch.randn(12, 5, generator=g, dtype=torch.float64),
        torch.randn(12, 3, 1, generator=g, dtype=torch.float64),
    )
    plain = Block("fc", w, out, None, 1.0, "linear", (4,))
    bn = {
        "weight": torch.rand(12, generator=g, dtype=torch.float64) + 0.5,
        "bias": torch.randn(12, generator=g, dtype=torch.float64),
        "running_var": torch.rand(12, generator=g, dtype=torch.float64) + 0.5,
        "running_mean": torch.zeros(12, dtype=torch.float64),
        "eps": torch.full((12,), 1e-5, dtype=torch.float64),
    }
    with_bn = Block("fc", w, out, None, 1.0, "linear", (4,), bn)
    for block, name in [(plain, "tropnnc"), (with_bn, "model-folding")]:
        got = get_method("adaptive").merge(block, 4, gen(3))
        want = get_method(name).merge(block, 4, gen(3))
        assert torch.equal(got.assignment, want.assignment)
        torch.testing.assert_close(got.rows, want.rows)


@pytest.mark.parametrize("name", CERTIFIED)
@pytest.mark.parametrize("shape", [(40, 6, 1), (50, 10, 7), (30, 3, 3), (64, 20, 12)])
def test_measured_error_never_exceeds_certificate(name, shape):
    n, d, m = shape
    for seed in range(3):
        block = random_block(n, d, m, seed=seed, radius=2.5)
        merge = compress_block(get_method(name), block, n // 3, gen(seed))
        x = ball_points(2000, d, block.radius, seed=seed + 10)
        err = (
            forward(block, block.weight, block.out, x) - forward(block, merge.rows, merge.out, x)
        ).abs()  # (q, m)
        bound = certificate(block, merge)  # (m,)
        assert merge.k == n // 3
        assert torch.all(err.amax(0) <= bound * (1 + 1e-9) + 1e-12), name


def test_tropnnc_collapses_positive_multiples_exactly():
    for seed in range(3):
        block = multiples_block(5, 8, 12, 4, seed=seed)
        merge = compress_block(get_method("tropnnc"), block, 5, gen(seed))
        assert float(certificate(block, merge).max()) < 1e-9
        x = ball_points(500, 12, 3.0)
        torch.testing.assert_close(
            forward(block, merge.rows, merge.out, x), forward(block, block.weight, block.out, x)
        )


def test_tropnnc_joint_form_collapses_mixed_output_signs():
    # one cluster may hold units whose output weights have opposite signs: the shares are
    # the positive scale factors, whatever the signs of the slices they carry
    block = multiples_block(4, 6, 5, 1, seed=3)
    joint = compress_block(get_method("tropnnc", split_signs=False), block, 4, gen())
    assert float(certificate(block, joint).max()) < 1e-9


@pytest.mark.parametrize("name", ["neural-path-kmeans", "zonotope-kmeans"])
def test_predecessors_exact_only_for_identical_units(name):
    block = multiples_block(3, 5, 6, 1, seed=2)
    merge = compress_block(get_method(name), block, 3, gen())
    assert float(certificate(block, merge).max()) > 1e-3  # multiples are not collapsed
    # identical units (same w and same c) are merged exactly
    g = gen(5)
    w = torch.randn(3, 7, generator=g, dtype=torch.float64).repeat_interleave(4, 0)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64).repeat_interleave(4, 0)
    dup = Block("fc", w, c.view(-1, 1, 1), torch.zeros(1, dtype=torch.float64), 1.0)
    merge = compress_block(get_method(name), dup, 3, gen())
    assert float(certificate(dup, merge).max()) < 1e-9
    x = ball_points(300, 6, 2.0)
    torch.testing.assert_close(
        forward(dup, merge.rows, merge.out, x), forward(dup, dup.weight, dup.out, x)
    )


@pytest.mark.parametrize("name", ["neuron-merging", "srinivas-babu"])
def test_merging_baselines_exact_on_duplicates(name):
    g = gen(7)
    base = torch.randn(4, 9, generator=g, dtype=torch.float64)
    # neuron merging keeps the top-4 by L1 norm and merges positive multiples exactly;
    # srinivas-babu merges zero-distance pairs first
    scales = (2.0, 1.0, 0.5) if name == "neuron-merging" else (1.0, 1.0, 1.0)
    w = torch.cat([base * s for s in scales])
    out = torch.randn(12, 3, 1, generator=g, dtype=torch.float64)
    block = Block("fc", w, out, torch.zeros(3, dtype=torch.float64), 1.0)
    merge = compress_block(get_method(name), block, 4, gen())
    assert float(certificate(block, merge).max()) < 1e-9
    x = ball_points(300, 8, 2.0)
    torch.testing.assert_close(forward(block, merge.rows, merge.out, x), forward(block, w, out, x))


def test_neuron_merging_scales_by_norm_ratio():
    v = torch.tensor([[3.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    out = torch.tensor([[1.0], [2.0], [5.0]], dtype=torch.float64).view(3, 1, 1)
    block = Block("fc", v, out, None, 1.0)
    merge = get_method("neuron-merging").merge(block, 2, gen())
    # unit 1 (norm 1) merges into unit 0 (norm 3) with Z = 1/3; unit 2 is kept
    assert merge.kept.tolist() == [0, 2]
    assert merge.out[:, 0, 0].tolist() == pytest.approx([1.0 + 2.0 / 3.0, 5.0])


def test_neuron_merging_threshold_drops_dissimilar():
    v = torch.tensor([[3.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    block = Block("fc", v, torch.ones(2, 1, 1, dtype=torch.float64), None, 1.0)
    merge = get_method("neuron-merging").merge(block, 1, gen())
    assert merge.assignment.tolist() == [0, -1]


def test_bn_merge_terms_match_explicit_batchnorm():
    g = gen(3)
    bn_n = {
        "weight": torch.tensor(1.7),
        "bias": torch.tensor(-0.3),
        "running_mean": torch.tensor(0.4),
        "running_var": torch.tensor(2.5),
        "eps": torch.tensor(1e-5),
    }
    bn_m = {
        "weight": torch.tensor(-0.6),
        "bias": torch.tensor(0.9),
        "running_mean": torch.tensor(-1.2),
        "running_var": torch.tensor(0.7),
        "eps": torch.tensor(1e-5),
    }
    s = torch.tensor(1.3)

    def bn(p, z):
        return (
            p["weight"] * (z - p["running_mean"]) / (p["running_var"] + p["eps"]).sqrt() + p["bias"]
        )

    z = torch.randn(100, generator=g, dtype=torch.float64).float()
    scale, shift = bn_merge_terms(bn_n, bn_m, s)
    torch.testing.assert_close(bn(bn_n, s * z), scale * bn(bn_m, z) + shift)


def test_cup_keeps_largest_norm_member_per_cluster():
    g = gen(1)
    centers = torch.randn(3, 6, generator=g, dtype=torch.float64) * 20
    w = (
        centers.repeat_interleave(4, 0)
        + torch.randn(12, 6, generator=g, dtype=torch.float64) * 0.01
    )
    w = torch.cat([w, torch.zeros(12, 1, dtype=torch.float64)], 1)
    out = torch.ones(12, 1, 1, dtype=torch.float64)
    block = Block("fc", w, out, None, 1.0)
    merge = get_method("cup").merge(block, 3, gen())
    feats = torch.cat([w[:, :-1], out[:, :, 0]], 1).norm(dim=1)
    expected = [int(4 * c + feats[4 * c : 4 * c + 4].argmax()) for c in range(3)]
    assert merge.kept.tolist() == expected


def test_l1_and_random_select():
    block = random_block(20, 5, 3, seed=4)
    merge = get_method("l1").merge(block, 5, gen())
    scores = block.weight[:, :-1].abs().sum(1)
    assert set(merge.kept.tolist()) == set(torch.topk(scores, 5).indices.tolist())
    torch.testing.assert_close(merge.rows, block.weight[merge.kept])
    r1 = get_method("random").merge(block, 5, gen(1))
    r2 = get_method("random").merge(block, 5, gen(1))
    assert r1.kept.tolist() == r2.kept.tolist() and len(set(r1.kept.tolist())) == 5


@pytest.mark.parametrize("name", CERTIFIED)
def test_same_seed_same_merge(name):
    block = random_block(40, 8, 5, seed=9)
    a = compress_block(get_method(name), block, 13, gen(11))
    b = compress_block(get_method(name), block, 13, gen(11))
    assert torch.equal(a.rows, b.rows) and torch.equal(a.out, b.out)


def test_tropnnc_options():
    block = random_block(60, 10, 6, seed=5)
    base = compress_block(get_method("tropnnc", norm="l1"), block, 12, gen())
    refined = compress_block(get_method("tropnnc", norm="l1", refine=5), block, 12, gen())
    stepped = compress_block(get_method("tropnnc", steps=3), block, 12, gen())
    for merge in (base, refined, stepped):
        assert merge.k == 12
    x = ball_points(1000, 10, 1.0)
    for merge in (refined, stepped):
        err = (
            (forward(block, block.weight, block.out, x) - forward(block, merge.rows, merge.out, x))
            .abs()
            .amax(0)
        )
        assert torch.all(err <= certificate(block, merge) + 1e-12)
    for norm in ("l2", "max"):
        assert compress_block(get_method("tropnnc", norm=norm), block, 12, gen()).k == 12
    with pytest.raises(ValueError, match="norm must be one of"):
        get_method("tropnnc", norm="l3")  # checked once, when the method is made
    with pytest.raises(ValueError, match="split_signs=True needs a single-output block"):
        get_method("tropnnc", split_signs=True).merge(block, 12, gen())


def test_single_output_sign_split_keeps_signs_apart():
    block = random_block(40, 6, 1, seed=6)
    merge = get_method("tropnnc").merge(block, 10, gen())
    signs = block.out[:, 0, 0] > 0
    for k in range(10):
        members = signs[merge.assignment == k]
        assert members.all() or (~members).all()


def test_zonotope_kmeans_rejects_multi_output():
    block = random_block(20, 4, 3)
    with pytest.raises(ValueError, match="single-output blocks only"):
        get_method("zonotope-kmeans").merge(block, 5, gen())


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="unknown method 'foo'; valid methods: adaptive, cup, l1"):
        get_method("foo")
    with pytest.raises(TypeError, match="unknown option"):
        get_method("tropnnc", colour="red")


def test_dead_units_are_dropped_without_error():
    block = random_block(12, 4, 2, seed=8)
    w = block.weight.clone()
    w[:4] = 0.0  # four dead units
    dead = Block("fc", w, block.out, block.consumer_bias, 1.0)
    merge = compress_block(get_method("tropnnc"), dead, 8, gen())
    assert float(certificate(dead, merge).max()) < 1e-12
    assert (merge.assignment[:4] == -1).all() and merge.k == 8


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("tropnnc", {"norm": "l3"}, "tropnnc: norm must be one of"),
        ("tropnnc", {"steps": 0}, "tropnnc: steps must be >= 1 and refine >= 0"),
        ("tropnnc", {"refine": -1}, "tropnnc: steps must be >= 1 and refine >= 0"),
        ("tropnnc", {"kernel": "pixels"}, "tropnnc: kernel must be one of"),
        ("tropnnc", {"rows": "moments", "steps": 2}, "tropnnc: steps > 1 needs kernel="),
        ("model-folding", {"features": "all"}, "model-folding: features must be one of"),
        ("neuron-merging", {"criterion": "l0"}, "neuron-merging: criterion must be one of"),
        ("neuron-merging", {"bn_lambda": -0.1}, r"neuron-merging: bn_lambda must be in \[0, 1\]"),
        ("thinet", {"ridge": -1.0}, "thinet: rows must be >= 1 and ridge >= 0"),
        # adaptive checks the options of both methods it may run, whatever the blocks are
        ("adaptive", {"features": "all"}, "model-folding: features must be one of"),
        ("adaptive", {"norm": "l3"}, "tropnnc: norm must be one of"),
    ],
)
def test_bad_options_fail_once_when_the_method_is_made(name, options, message):
    with pytest.raises(ValueError, match=message):
        get_method(name, **options)
    # compress makes the method before it looks at the model: no block is ever read
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=message):
        compress(model, 0.5, name, **options)


def test_method_declares_what_compress_needs():
    """The base class declares every attribute compress reads, with data-free defaults."""
    base = method_class("l1")
    assert (base.multi_output, base.data_driven, base.device_aware) == (True, False, False)
    assert get_method("l1").curve_norm() == "l2" and get_method("l1").own_allocation() is None
    assert method_class("tropnnc").device_aware and not method_class("adaptive").device_aware
    assert not method_class("zonotope-kmeans").multi_output and method_class("thinet").data_driven
    assert get_method("tropnnc", norm="max").curve_norm() == "max"
    assert get_method("tropnnc").own_allocation() == "tropnnc"
    assert get_method("cup").own_allocation().name == "cup-threshold"
