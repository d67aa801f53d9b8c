"""Budgeted non-uniform compression: certificate curves, greedy and threshold allocation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import linkage
from torch import nn

import tropnnc
from tropnnc import Budget, zoo
from tropnnc.block import Block
from tropnnc.budget import (
    FLOOR_FRACTION,
    ThresholdRule,
    agglomerate,
    allocate,
    certificate_curve,
    compressible_count,
)
from tropnnc.cluster import cosine_residual
from tropnnc.counting import count_macs, count_params, layer_macs
from tropnnc.graph import BlockSpec, GroupSpec, discover, layer_width
from tropnnc.methods.cup import features
from tropnnc.surgery import extract, get_module


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.build(name).eval()


def layer_params(model: nn.Module) -> int:
    """Parameters of the Linear/Conv2d layers (every layer of the zoo nets is compressible)."""
    return sum(
        p.numel()
        for mod in model.modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d))
        for p in mod.parameters()
    )


def one_unit_savings(model: nn.Module, unit: str) -> int:
    """Largest saving of removing one unit of any block at full widths, by real surgery."""
    specs, _ = discover(model)
    x = torch.zeros((1,) + tuple(model.input_shape))
    best = 0
    for spec in specs:
        n = extract(model, spec).n
        smaller = tropnnc.compress(model, {spec.producer: n - 1}, "l1").model
        if unit == "params":
            best = max(best, layer_params(model) - layer_params(smaller))
        else:
            best = max(best, count_macs(model, x) - count_macs(smaller, x))
    return best


def random_block(n: int, d: int, m: int, seed: int = 0) -> Block:
    g = torch.Generator().manual_seed(seed)
    return Block(
        "b",
        torch.randn(n, d + 1, generator=g, dtype=torch.float64),
        torch.randn(n, m, 1, generator=g, dtype=torch.float64),
    )


# -------------------------------------------------------------------------------------------
# curves
# -------------------------------------------------------------------------------------------


def test_agglomerate_cost_is_the_objective_of_each_cut():
    rng = np.random.default_rng(0)
    n, dim = 60, 7
    d = rng.normal(size=(n, dim))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    m = rng.uniform(0.1, 2.0, n)
    merges, cost = agglomerate(d, m)
    assert merges.shape == (n - 1, 2) and cost.shape == (n,) and cost[-1] == 0
    label = np.arange(n)
    for step, (a, b) in enumerate(merges):
        assert a < b and (label == b).any() and (label == a).any()
        label[label == b] = a
        k = n - 1 - step
        _, lab = np.unique(label, return_inverse=True)
        u = np.zeros((k, dim))
        np.add.at(u, lab, m[:, None] * d)
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        resid = cosine_residual(
            torch.tensor(d), torch.tensor(m), torch.tensor(lab), torch.tensor(u)
        ).numpy()
        single = np.bincount(lab)[lab] == 1  # exactly 0 (the reference rounds to ~1e-8)
        objective = resid[~single].sum()
        assert cost[k - 1] == pytest.approx(objective, rel=1e-9, abs=1e-12)


def test_curve_is_zero_for_positive_multiples_of_k_directions():
    g = torch.Generator().manual_seed(1)
    k, n = 5, 40
    dirs = torch.randn(k, 9, generator=g, dtype=torch.float64)
    pick = torch.arange(n) % k
    scale = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    block = Block(
        "b", dirs[pick] * scale[:, None], torch.randn(n, 6, 2, generator=g, dtype=torch.float64)
    )
    curve = certificate_curve(block)
    assert curve.shape == (n,)
    assert float(curve[k - 1 :].abs().max()) < 1e-6
    assert float(curve[k - 2]) > 1e-3
    assert bool((curve[:-1] >= curve[1:]).all()) and 0 <= float(curve.min())
    assert float(curve.max()) <= 1


def test_curve_drops_dead_units_first():
    block = random_block(30, 5, 4)
    weight, out = block.weight.clone(), block.out.clone()
    weight[:4] = 0  # dead: no input
    out[4:7] = 0  # dead: no output
    curve = certificate_curve(Block("b", weight, out))
    assert float(curve[23 - 1 :].abs().max()) == 0  # 23 live units
    assert float(curve[21]) > 0


def test_curve_norm_option_and_l1_is_the_summed_certificate():
    block = random_block(20, 4, 3, seed=2)
    l1, l2 = certificate_curve(block, "l1"), certificate_curve(block, "l2")
    assert not torch.allclose(l1, l2)
    with pytest.raises(ValueError, match="norm must be one of"):
        certificate_curve(block, "l3")


# -------------------------------------------------------------------------------------------
# budgets on real networks
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lenet-300-100", "e2-cnn", "vgg-small"])
@pytest.mark.parametrize("unit", ["params", "macs"])
def test_budget_is_met_within_one_unit(name, unit):
    model = build(name)
    x = torch.zeros((1,) + tuple(model.input_shape))
    budget = 0.3
    result = tropnnc.compress(model, budget=Budget(budget, unit=unit))
    alloc = result.allocation
    total = layer_params(model) if unit == "params" else count_macs(model, x)
    achieved = layer_params(result.model) if unit == "params" else count_macs(result.model, x)
    assert alloc.total == total and alloc.achieved == achieved
    assert alloc.target == pytest.approx(budget * total)
    gap = budget * total - achieved
    bound = one_unit_savings(model, unit)
    assert 0 <= gap <= bound
    assert alloc.max_step_saving == bound
    assert [b.units_after for b in result.blocks] == list(alloc.widths.values())
    assert result.model(torch.rand(2, *model.input_shape)).shape == (2, 10)


def test_small_budget_lenet_and_count_of_compressed_model():
    model = build("lenet-300-100")
    result = tropnnc.compress(model, budget=0.02)
    specs, _ = discover(model)
    assert compressible_count(result.model, specs) == result.allocation.achieved
    assert compressible_count(model, specs) == result.allocation.total
    assert 0 <= 0.02 * result.allocation.total - result.allocation.achieved <= 786 + 100


def test_round_to_and_min_width():
    model = build("lenet-300-100")
    result = tropnnc.compress(model, budget=Budget(0.15, round_to=8, min_width=20))
    alloc = result.allocation
    for layer in alloc.layers:
        assert layer.width == layer.units or (layer.width % 8 == 0 and layer.width >= 20)
    assert alloc.achieved <= alloc.target
    assert alloc.target - alloc.achieved <= alloc.max_step_saving
    assert alloc.max_step_saving == 8 * (785 + 100)  # 8 units of layer "1"


def test_budget_one_keeps_every_unit():
    model = build("e2-cnn")
    result = tropnnc.compress(model, budget=1.0)
    assert all(b.units_after == b.units_before for b in result.blocks)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)


def test_allocator_takes_free_units_of_a_redundant_layer_first():
    model = build("lenet-300-100")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # layer "1": 300 positive multiples of 30 directions
        dirs = torch.randn(30, 785, generator=g)
        rows = dirs[torch.arange(300) % 30] * (torch.rand(300, 1, generator=g) + 0.5)
        model[1].weight.copy_(rows[:, :-1])
        model[1].bias.copy_(rows[:, -1])
    total = layer_params(model)
    target = (784 * 30 + 30) + (30 * 100 + 100) + (100 * 10 + 10)
    result = tropnnc.compress(model, budget=target / total, radius=1.0)  # float32 residue
    assert result.allocation.widths == {"1": 30, "3": 100}
    assert result.allocation.achieved == target
    assert result.allocation.layers[0].certificate < 1e-5
    assert result.blocks[0].certificate < 1e-3 * result.blocks[1].certificate + 1e-4


def test_deterministic_and_reported():
    model = build("e2-cnn")
    a = tropnnc.compress(model, budget=0.25)
    b = tropnnc.compress(model, budget=0.25)
    assert a.allocation == b.allocation
    alloc = a.allocation
    assert alloc.allocator == "tropnnc-curves" and alloc.unit == "params"
    assert [la.layer for la in alloc.layers] == ["features.0", "features.3", "classifier.1"]
    assert sum(la.share for la in alloc.layers) < 1  # the output layer is no producer
    for la in alloc.layers:
        assert la.certificate == pytest.approx(alloc.curves[la.layer][la.width - 1])
        assert len(alloc.curves[la.layer]) == la.units
    d = a.to_dict()
    assert d["allocation"]["budget"] == 0.25 and len(d["allocation"]["layers"]) == 3
    assert "budget 0.25 of params" in a.table()
    assert tropnnc.compress(model, 0.5).allocation is None


def test_log_allocator_and_other_methods_use_the_curves():
    model = build("lenet-300-100")
    log = tropnnc.compress(model, budget=Budget(0.1, allocator="tropnnc-log"))
    assert log.allocation.allocator == "tropnnc-log-curves"
    assert log.allocation.achieved <= log.allocation.target
    plain = tropnnc.compress(model, budget=0.1)
    for method in ("l1", "neural-path-kmeans"):
        other = tropnnc.compress(model, budget=0.1, method=method)
        assert other.allocation.widths == plain.allocation.widths
    cup = tropnnc.compress(model, budget=Budget(0.1, allocator="tropnnc"), method="cup")
    assert cup.allocation.widths == plain.allocation.widths


# -------------------------------------------------------------------------------------------
# CUP's global threshold
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lenet-300-100", "e2-cnn"])
def test_cup_global_threshold(name):
    model = build(name)
    result = tropnnc.compress(model, budget=0.3, method="cup")
    alloc = result.allocation
    assert alloc.allocator == "cup-threshold" and alloc.threshold is not None
    assert alloc.achieved <= alloc.target
    specs, _ = discover(model)
    for spec, layer in zip(specs, alloc.layers, strict=True):
        block = extract(model, spec)
        heights = linkage(features(block, False).numpy(), method="ward")[:, 2]
        expected = max(1, block.n - int((heights <= alloc.threshold).sum()))
        assert layer.width == expected
    # one merge fewer (the next smaller height) would miss the budget
    assert alloc.target - alloc.achieved < alloc.max_step_saving * 2 + 1


# -------------------------------------------------------------------------------------------
# budgets over channel groups (residual streams, concatenations, depthwise chains)
# -------------------------------------------------------------------------------------------


class Concat(nn.Module):
    """Two groups read together with the input's channels (c), and c read together with b
    through a flatten (fc): every reader reads several groups."""

    input_shape = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(6 + 5 + 3, 8, 3, padding=1)
        self.fc = nn.Linear((8 + 5) * 36, 10)

    def forward(self, x):
        a = F.relu(self.bn(self.a(x)))
        b = F.relu(self.b(x))
        c = F.relu(self.c(torch.cat([a, b, x], 1)))
        return self.fc(torch.flatten(torch.cat([c, b], 1), 1))


def concat_count(ka: int, kb: int, kc: int, unit: str) -> int:
    """The count of Concat's layers, written out (a's folded BatchNorm: its bias)."""
    if unit == "params":
        return (
            (27 * ka + ka)
            + (3 * kb + kb)
            + (9 * kc * (ka + kb + 3) + kc)
            + (10 * 36 * (kc + kb) + 10)
        )
    return 36 * (27 * ka + 3 * kb + 9 * kc * (ka + kb + 3)) + 10 * 36 * (kc + kb)


def build_grouped(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = Concat() if name == "concat" else zoo.build(name)
    with torch.no_grad():  # BatchNorm statistics of a trained net
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.25, 1.75)
                mod.bias.uniform_(-0.5, 0.5)
    return model.eval()


def members(spec: BlockSpec | GroupSpec) -> tuple[list, list[str]]:
    """The producers (and depthwise members) of a block or group, and its readers."""
    if isinstance(spec, GroupSpec):
        return list(spec.producers + spec.channelwise), [c.layer for c in spec.consumers]
    return list(spec.producers), [spec.consumer]


def member_count(model: nn.Module, specs: list, unit: str) -> int:
    """The params (count_params of each member layer, plus the bias a BatchNorm still in the
    model folds into a producer without one) or MACs (layer_macs) of the member layers."""
    names, folded = {}, 0
    for spec in specs:
        writers, readers = members(spec)
        names.update(dict.fromkeys([p.layer for p in writers] + readers))
        for p in writers:
            mod = get_module(model, p.layer)
            if p.bn and isinstance(get_module(model, p.bn), nn.BatchNorm2d) and mod.bias is None:
                folded += mod.out_channels
    if unit == "macs":
        macs = layer_macs(model, torch.zeros((1,) + tuple(model.input_shape)))
        return sum(macs[name] for name in names)
    return sum(count_params(get_module(model, name)) for name in names) + folded


def check_widths(model: nn.Module, small: nn.Module, specs: list, widths: dict) -> None:
    """Every member of every block and group has its allocated width; every reader's input
    shrinks by what its groups lost (times the positions a flatten reads per channel)."""
    for spec in specs:
        writers, readers = members(spec)
        for p in writers:
            mod = get_module(small, p.layer)
            assert layer_width(mod) == widths[spec.producer], p.layer
            if p in getattr(spec, "channelwise", ()):
                assert mod.groups == mod.in_channels == widths[spec.producer]
        for reader in readers:
            old, new = get_module(model, reader), get_module(small, reader)
            segments = ((spec.producer, None),)
            if isinstance(spec, GroupSpec):
                segments = next(c for c in spec.consumers if c.layer == reader).segments
            read = [name for name, _ in segments if name is not None]
            lost = sum(layer_width(get_module(model, n)) - widths[n] for n in read)
            if isinstance(old, nn.Linear):  # a flatten reads every segment's width
                units = [layer_width(get_module(model, n)) if n else w for n, w in segments]
                per = 1 if None in units else old.in_features // sum(units)
                assert new.in_features == old.in_features - per * lost, reader
            else:
                assert new.in_channels == old.in_channels - lost, reader


GROUPED = ["resnet-mini", "mobilenetv2-mini", "densenet-mini", "concat"]


@pytest.mark.parametrize("name", GROUPED)
@pytest.mark.parametrize("unit", ["params", "macs"])
def test_budget_compresses_channel_groups(name, unit):
    model = build_grouped(name)
    specs, _ = discover(model)
    assert any(isinstance(s, GroupSpec) for s in specs)
    total = member_count(model, specs, unit)
    for fraction in (0.3, 0.5, 0.8):
        result = tropnnc.compress(model, budget=Budget(fraction, unit))
        alloc = result.allocation
        assert alloc.total == total == compressible_count(model, specs, unit)
        assert alloc.target == pytest.approx(fraction * total)
        assert 0 <= alloc.target - alloc.achieved <= alloc.max_step_saving
        small = result.model
        assert alloc.achieved == compressible_count(small, specs, unit)
        assert alloc.achieved == member_count(small, specs, unit)
        if unit == "params":  # the rest of the net loses only the folded BatchNorms
            folded = [get_module(model, p.bn) for s in specs for p in members(s)[0] if p.bn]
            lost = sum(count_params(bn) - bn.num_features for bn in folded)
            assert count_params(model) - count_params(small) == total - alloc.achieved + lost
        assert all("output layer" in r.reason for r in result.skipped)
        assert [b.layer for b in result.blocks] == list(alloc.widths)
        assert [b.units_after for b in result.blocks] == list(alloc.widths.values())
        check_widths(model, small, specs, alloc.widths)
        x = torch.rand(2, *model.input_shape)
        assert small(x).shape == model(x).shape == (2, 10)


@pytest.mark.parametrize("unit", ["params", "macs"])
def test_budget_counts_a_concatenation_as_written_out(unit):
    model = build_grouped("concat")
    specs, _ = discover(model)
    assert [s.producer for s in specs] == ["a", "b", "c"]
    result = tropnnc.compress(model, budget=Budget(0.4, unit))
    widths = result.allocation.widths
    assert result.allocation.total == concat_count(6, 5, 8, unit)
    assert result.allocation.achieved == concat_count(widths["a"], widths["b"], widths["c"], unit)
    a = 27 * widths["a"]  # the layers writing group a: a alone, with its folded bias
    assert result.allocation.layers[0].count == (a + widths["a"] if unit == "params" else 36 * a)


def test_cup_threshold_on_channel_groups():
    model = build_grouped("resnet-mini")
    specs, _ = discover(model)
    result = tropnnc.compress(model, budget=Budget(0.5, allocator="method"), method="cup")
    alloc = result.allocation
    assert alloc.allocator == "cup-threshold" and alloc.achieved <= alloc.target
    assert alloc.achieved == compressible_count(result.model, specs)
    for spec, layer in zip(specs, alloc.layers, strict=True):
        block = extract(model, spec)  # a group: every member's rows and slices
        heights = linkage(features(block, False).numpy(), method="ward")[:, 2]
        assert layer.width == max(1, block.n - int((heights <= alloc.threshold).sum()))
    check_widths(model, result.model, specs, alloc.widths)


# -------------------------------------------------------------------------------------------
# errors
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, math.nan])
def test_budget_out_of_range(budget):
    with pytest.raises(ValueError, match=r"budget .* must be in \(0, 1\]"):
        tropnnc.compress(build("lenet-300-100"), budget=budget)


def test_budget_errors():
    model = build("lenet-300-100")
    with pytest.raises(ValueError, match="either keep or budget, not both"):
        tropnnc.compress(model, 0.5, budget=0.5)
    with pytest.raises(ValueError, match="budget unit must be one of 'params', 'macs'"):
        Budget(0.5, unit="flops")
    too_small = r"budget 0.0001 is below 0.00302689, .* minimum widths allow \(min_width=1: 807 "
    with pytest.raises(ValueError, match=too_small):
        tropnnc.compress(model, budget=1e-4)
    with pytest.raises(ValueError, match="min_width=50, round_to=8: "):
        tropnnc.compress(model, budget=Budget(0.1, min_width=50, round_to=8))
    with pytest.raises(ValueError, match="min_width must be an int >= 1"):
        Budget(0.5, min_width=0)
    with pytest.raises(
        TypeError, match="round_to apply to a budget only; pass budget=tropnnc.Budget"
    ):
        tropnnc.compress(model, 0.5, round_to=8)
    with pytest.raises(TypeError, match="budget_unit, min_width apply to a budget only"):
        tropnnc.compress(model, budget=0.5, budget_unit="macs", min_width=2)
    with pytest.raises(ValueError, match="allocator must be one of"):
        Budget(0.5, allocator="magic")
    with pytest.raises(ValueError, match="'l1' has no allocator of its own"):
        tropnnc.compress(model, budget=Budget(0.5, allocator="method"), method="l1")
    with pytest.raises(TypeError, match="budget must be a number"):
        tropnnc.compress(model, budget="half")


def test_budget_is_checked_when_made_and_frozen():
    b = Budget(1, unit="macs", allocator="tropnnc-log", min_width=2, round_to=4)
    assert b.fraction == 1.0 and isinstance(b.fraction, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.fraction = 0.5
    with pytest.raises(TypeError, match="budget must be a number"):
        Budget("half")
    with pytest.raises(ValueError, match="round_to must be an int >= 1, got 1.5"):
        Budget(0.5, round_to=1.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'budget_unit'"):
        Budget(0.5, budget_unit="macs")


def test_a_number_is_a_budget_with_defaults():
    model = build("e2-cnn")
    a = tropnnc.compress(model, budget=0.25)
    b = tropnnc.compress(model, budget=Budget(0.25, unit="params", allocator=None))
    assert a.allocation == b.allocation
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_a_method_threshold_rule_against_a_brute_force_oracle():
    """A toy method rule (block l's units merge at known heights): the allocation is the
    smallest threshold whose widths meet the budget, found here by trying every height."""
    model = build("lenet-300-100")  # blocks "1" (300 units) and "3" (100 units)
    specs, _ = discover(model)
    scale = {300: 1.0, 100: 3.5}

    def heights(block: Block) -> np.ndarray:
        return np.arange(block.n - 1, dtype=np.float64) * scale[block.n]

    rule = ThresholdRule("toy-threshold", heights)
    alloc = allocate(model, specs, Budget(0.3), own=rule)

    def count(k1: int, k3: int) -> int:  # params of the Linear layers 784-k1-k3-10
        return (784 * k1 + k1) + (k1 * k3 + k3) + (k3 * 10 + 10)

    h1, h3 = np.arange(299.0), np.arange(99.0) * 3.5
    for t in sorted({-math.inf, *h1, *h3}):
        k1, k3 = 300 - int((h1 <= t).sum()), 100 - int((h3 <= t).sum())
        if count(k1, k3) <= 0.3 * count(300, 100):
            break
    assert alloc.allocator == "toy-threshold" and alloc.threshold == t
    assert alloc.widths == {"1": k1, "3": k3} and alloc.achieved == count(k1, k3)
    # a curve allocator named in the budget wins over the method's own rule
    curves = allocate(model, specs, Budget(0.3, allocator="tropnnc"), own=rule)
    assert curves.allocator == "tropnnc-curves" and curves.threshold is None
    with pytest.raises(ValueError, match="allocator='method' needs the method's own rule"):
        allocate(model, specs, Budget(0.3, allocator="method"))


def test_macs_budget_needs_an_input_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(ValueError, match=r"counting MACs \(unit='macs'\) needs the input shape"):
        tropnnc.compress(model, budget=Budget(0.5, unit="macs"))
    result = tropnnc.compress(
        model, budget=Budget(0.5, unit="macs"), example_inputs=torch.zeros(1, 1, 10, 10)
    )
    x = torch.zeros(1, 1, 10, 10)
    assert result.allocation.total == count_macs(model, x)
    assert result.allocation.achieved == count_macs(result.model, x) <= 0.5 * count_macs(model, x)
    assert tropnnc.compress(model, budget=0.5).allocation.unit == "params"


def test_folded_batchnorm_counts_as_the_producer_bias():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 3),
    ).eval()
    specs, _ = discover(model)
    full = compressible_count(model, specs)
    assert full == 6 * 9 + 6 + 6 * 36 * 3 + 3
    result = tropnnc.compress(model, budget=0.5)
    assert compressible_count(result.model, specs) == result.allocation.achieved
    assert result.allocation.achieved == sum(p.numel() for p in result.model.parameters())


# -------------------------------------------------------------------------------------------
# the Ward hierarchy against the one-merge-at-a-time reference it replaced
# -------------------------------------------------------------------------------------------


def reference_agglomerate(d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The previous implementation: a full Lance-Williams update of the (n, n) Ward costs per
    merge, and the objective updated from <d_i, S_c> for every unit and cluster."""
    n = d.shape[0]
    merges, cost = np.zeros((n - 1, 2), dtype=np.int64), np.zeros(n)
    g = np.clip(d @ d.T, -1.0, 1.0)
    weight = m.copy()
    dist = m[:, None] * m[None, :] / (m[:, None] + m[None, :]) * np.maximum(2 - 2 * g, 0)
    np.fill_diagonal(dist, np.inf)
    near = dist.argmin(axis=1)
    near_d = dist[np.arange(n), near]
    inner, s2, ccost = g * m[None, :], m * m, np.zeros(n)
    label, active, total = np.arange(n), np.ones(n, dtype=bool), 0.0
    for step in range(n - 1):
        a = int(near_d.argmin())
        a, b = sorted((a, int(near[a])))
        merges[step] = (a, b)
        ma, mb, dab = weight[a], weight[b], dist[a, b]
        new = ((weight + ma) * dist[:, a] + (weight + mb) * dist[:, b] - weight * dab) / (
            weight + ma + mb
        )
        new[~active] = np.inf
        new[a] = new[b] = np.inf
        dist[a, :] = dist[:, a] = new
        dist[b, :] = dist[:, b] = np.inf
        weight[a] = ma + mb
        active[b] = False
        near_d[b] = np.inf
        in_a, in_b = label == a, label == b
        cross = float(m[in_a] @ inner[in_a, b])
        inner[:, a] += inner[:, b]
        s2[a] = s2[a] + s2[b] + 2.0 * cross
        label[in_b] = a
        members = in_a | in_b
        cos = inner[members, a] / math.sqrt(s2[a])
        resid = np.where(cos >= 0, m[members] * np.sqrt(np.maximum(1 - cos * cos, 0)), m[members])
        total += float(resid.sum()) - ccost[a] - ccost[b]
        ccost[a], ccost[b] = float(resid.sum()), 0.0
        cost[n - 2 - step] = max(total, 0.0)
        rows = (active & ((near == a) | (near == b))).nonzero()[0]
        rows = np.union1d(rows, [a])
        near[rows] = dist[rows].argmin(axis=1)
        near_d[rows] = dist[rows, near[rows]]
        better = new < near_d
        near[better], near_d[better] = a, new[better]
    return merges, cost


@pytest.mark.parametrize(
    "n, dim, families, seed",
    [(2, 3, 1, 0), (9, 4, 3, 1), (80, 12, 10, 2), (300, 40, 50, 3), (300, 40, 300, 4)],
)
def test_agglomerate_equals_the_reference(n, dim, families, seed):
    rng = np.random.default_rng(seed)
    proto = rng.normal(size=(families, dim))
    d = proto[rng.integers(0, families, n)] + 0.3 * rng.normal(size=(n, dim))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    m = rng.uniform(0.1, 2.0, n)
    merges, cost = agglomerate(d, m)
    ref_merges, ref_cost = reference_agglomerate(d, m)
    np.testing.assert_array_equal(merges, ref_merges)
    np.testing.assert_allclose(cost, ref_cost, rtol=1e-10, atol=1e-10)


def test_float32_cosines_of_a_large_block_give_the_same_curve():
    """Blocks whose Gram tropnnc forms in float32 get their curve from float32 cosines: the
    same curve as float64 cosines to ~1e-6 (only near-ties could reorder merges)."""
    g = torch.Generator().manual_seed(5)
    proto = torch.randn(40, 2000, generator=g, dtype=torch.float64)
    rows = proto[torch.randint(0, 40, (400,), generator=g)]
    rows = rows + 0.5 * torch.randn(400, 2000, generator=g, dtype=torch.float64)
    block = Block("b", rows.float(), torch.randn(400, 3, 1, generator=g))
    curve = certificate_curve(block).numpy()
    d = rows.float().double().numpy()
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    mass = block.unit_mass().double().numpy()
    _, ref = reference_agglomerate(d, mass)
    ref = np.maximum.accumulate((ref / mass.sum())[::-1])[::-1]
    assert np.abs(curve - ref).max() < 1e-5


# -------------------------------------------------------------------------------------------
# floors: no block starved when the budget does not force it
# -------------------------------------------------------------------------------------------


def test_no_block_below_its_floor_of_the_uniform_width():
    """Random-init vgg-small at half its MACs: the plain sum of the curves (the default
    before the floors) takes a 128-channel layer down to 2 channels while keeping its
    neighbours whole. The floor: the uniform keep ratio u that meets the budget (found here
    by real compression and MAC counts), and no block below FLOOR_FRACTION * u of its
    width."""
    model = build("vgg-small")
    x = torch.zeros((1,) + tuple(model.input_shape))
    specs, _ = discover(model)
    sizes = {
        s.producer: get_module(model, s.producer).out_channels
        if isinstance(get_module(model, s.producer), nn.Conv2d)
        else get_module(model, s.producer).out_features
        for s in specs
    }
    target = 0.5 * count_macs(model, x)

    def uniform(u: float) -> dict[str, int]:
        return {name: max(1, math.ceil(u * n - 1e-9)) for name, n in sizes.items()}

    def fits(u: float) -> bool:
        return count_macs(tropnnc.compress(model, uniform(u), "l1").model, x) <= target

    ratios = sorted({k / n for n in sizes.values() for k in range(1, n + 1)})
    lo, hi = 0, len(ratios) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(ratios[mid]) else (lo, mid - 1)
    u = ratios[lo]
    assert fits(u) and not fits(ratios[lo + 1])
    floors = uniform(FLOOR_FRACTION * u)
    result = tropnnc.compress(model, budget=Budget(0.5, unit="macs"))
    alloc = result.allocation
    assert alloc.uniform_keep == pytest.approx(u)
    assert alloc.achieved <= alloc.target
    for layer in alloc.layers:
        assert layer.floor == floors[layer.layer]
        assert layer.width >= floors[layer.layer], layer
    old = tropnnc.compress(model, budget=Budget(0.5, unit="macs", allocator="tropnnc-sum"))
    starved = [la for la in old.allocation.layers if la.width < floors[la.layer]]
    assert starved and min(la.width / la.units for la in starved) < 0.05
    assert old.allocation.allocator == "tropnnc-sum-curves"
    log = tropnnc.compress(model, budget=Budget(0.5, unit="macs", allocator="tropnnc-log"))
    assert all(la.width >= floors[la.layer] for la in log.allocation.layers)


def test_blocks_kept_whole_are_left_alone_and_not_shared():
    model = build("e2-cnn")
    result = tropnnc.compress(model, {"features.3": 16, "classifier.1": 100})
    assert [(b.units_before, b.units_after) for b in result.blocks] == [(16, 16), (500, 100)]
    assert result.blocks[0].certificate == 0 and result.blocks[0].shares == [1.0] * 16
    small = dict(result.model.named_parameters())
    torch.testing.assert_close(small["features.3.weight"], model.features[3].weight)
    ours = {p.data_ptr() for p in model.parameters()}
    assert not ours & {p.data_ptr() for p in result.model.parameters()}  # all copies


def test_output_positions_on_meta_equal_a_real_forward(monkeypatch):
    from tropnnc.counting import output_positions

    real_call, done = torch.func.functional_call, []

    def spy(*args, **kwargs):
        out = real_call(*args, **kwargs)
        done.append(out.device.type)
        return out

    for name in ("vgg-small", "e2-cnn", "lenet-300-100"):
        model = build(name)
        x = torch.zeros((1,) + tuple(model.input_shape))
        with monkeypatch.context() as m:
            m.setattr(torch.func, "functional_call", spy)
            meta = output_positions(model, x)
        assert done.pop() == "meta"

        def fail(*args, **kwargs):
            raise NotImplementedError("no meta kernel")

        with monkeypatch.context() as m:
            m.setattr(torch.func, "functional_call", fail)
            real = output_positions(model, x)
        assert meta == real and len(real) == sum(
            isinstance(mod, (nn.Linear, nn.Conv2d)) for mod in model.modules()
        )
