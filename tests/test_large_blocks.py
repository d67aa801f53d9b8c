"""The large-layer paths: float32 blocks and Gram products, consumer views, chunked passes,
the shared-parameter working copy; each checked against the plain float64 computation."""

from __future__ import annotations

import pytest
import torch
from conftest import ball_points, forward, multiples_block, random_block
from torch import nn

import tropnnc
import tropnnc._memory as memory
import tropnnc.block as blk
import tropnnc.cluster.gram as cl_gram
import tropnnc.surgery as surgery
from tropnnc.api import compress_block
from tropnnc.block import Block, certificate, merge_by_shares
from tropnnc.graph import discover
from tropnnc.methods import get_method
from tropnnc.tropical import share_bound, share_errors

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(widths=(10, 24, 16, 3), dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(dtype).eval()


def conv_flatten(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(3)
    return (
        nn.Sequential(
            nn.Conv2d(3, 12, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(12 * 9, 7),
            nn.ReLU(),
            nn.Linear(7, 4),
        )
        .to(dtype)
        .eval()
    )


def set_multiples(layer: nn.Module, k: int, seed: int = 0) -> None:
    """Every unit (weights, bias) a positive multiple of one of k random directions."""
    g = gen(seed)
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    n, d = w.shape
    dirs = torch.randn(k, d + 1, generator=g, dtype=F64)
    rows = dirs[torch.randperm(n, generator=g) % k] * (torch.rand(n, 1, generator=g) + 0.3)
    with torch.no_grad():
        layer.weight.copy_(rows[:, :-1].reshape(layer.weight.shape))
        layer.bias.copy_(rows[:, -1])


# ------------------------------------------------------------------------------------------
# float32 Gram products keep exact collapses exact
# ------------------------------------------------------------------------------------------


def test_float32_gram_keeps_exact_collapse_exact(monkeypatch):
    monkeypatch.setattr(cl_gram, "_FLOAT32_GRAM_MACS", 0)  # every Gram product in float32
    for seed in range(3):
        block = multiples_block(5, 8, 12, 4, seed=seed)
        for steps in (1, 2):
            merge = compress_block(get_method("tropnnc", steps=steps), block, 5, gen(seed))
            assert merge.rows.dtype == F64
            assert float(certificate(block, merge).max()) < 1e-9
            x = ball_points(300, 12, 2.0)
            torch.testing.assert_close(
                forward(block, merge.rows, merge.out, x), forward(block, block.weight, block.out, x)
            )


def test_float32_gram_agrees_with_float64_on_a_random_block(monkeypatch):
    block = random_block(80, 12, 6, seed=4)
    ref = compress_block(get_method("tropnnc"), block, 20, gen(1))
    monkeypatch.setattr(cl_gram, "_FLOAT32_GRAM_MACS", 0)
    f32 = compress_block(get_method("tropnnc"), block, 20, gen(1))
    a, b = certificate(block, ref), certificate(block, f32)
    assert float(b.sum()) == pytest.approx(float(a.sum()), rel=1e-3)


# ------------------------------------------------------------------------------------------
# float32 blocks (large layers) through compress
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    ["tropnnc", "neural-path-kmeans", "neuron-merging", "cup", "l1", "random", "srinivas-babu"],
)
def test_float32_blocks_compress_with_every_method(method, monkeypatch):
    monkeypatch.setattr(surgery, "FLOAT64_MAX_WEIGHTS", 0)  # every block "large"
    model = mlp()
    spec = discover(model)[0][0]
    assert surgery.extract(model, spec).weight.dtype == torch.float32
    result = tropnnc.compress(model, 0.5, method, seed=0)
    x = torch.randn(200, 10, generator=gen(2)) * 0.3
    for report in result.blocks:
        assert report.units_after == report.units_before // 2
    assert result.model(x).dtype == torch.float32
    if method == "tropnnc":  # the one-block bound, on the first block alone
        one = tropnnc.compress(model, {"0": 12}, method, radius=3.0)
        with torch.no_grad():
            y, y2 = model[:3](x), one.model[:3](x)
        assert float((y - y2).abs().amax(0).max()) <= one.blocks[0].certificate * (1 + 1e-4)


def test_float32_block_collapses_multiples(monkeypatch):
    monkeypatch.setattr(surgery, "FLOAT64_MAX_WEIGHTS", 0)
    model = conv_flatten()
    set_multiples(model[0], 4)
    result = tropnnc.compress(model, {"0": 4}, radius=3.0)
    assert result.blocks[0].certificate < 1e-4
    x = torch.randn(5, 3, 8, 8, generator=gen(1))
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)


def test_float32_conv_block_collapses_into_a_conv_consumer(monkeypatch):
    """conv -> conv in float32: slices merged in the consumer's (out, in, kh, kw) layout and
    adopted by apply, certificate from the norms pass; exact multiples stay exact."""
    monkeypatch.setattr(surgery, "FLOAT64_MAX_WEIGHTS", 0)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Conv2d(12, 5, 3)).eval()
    set_multiples(model[0], 4)
    result = tropnnc.compress(model, {"0": 4}, radius=3.0)
    assert result.model[2].weight.shape == (5, 4, 3, 3)
    assert result.blocks[0].certificate < 1e-4
    x = torch.randn(4, 3, 9, 9, generator=gen(2))
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)


def test_extract_large_block_views_the_consumer(monkeypatch):
    model = conv_flatten()
    spec = discover(model)[0][0]
    small = surgery.extract(model, spec)
    assert small.weight.dtype == F64 and small.out.is_contiguous()
    monkeypatch.setattr(surgery, "FLOAT64_MAX_WEIGHTS", 0)
    big = surgery.extract(model, spec)
    assert big.weight.dtype == torch.float32
    assert big.out.data_ptr() == model[4].weight.data_ptr()  # a view, not a copy
    torch.testing.assert_close(big.out.double(), small.out)
    assert surgery.extract(model, spec, dtype=F64).out.is_contiguous()


def test_input_model_untouched_and_result_owns_its_tensors():
    model = conv_flatten()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for keep in (0.5, {"0": 6}):
        result = tropnnc.compress(model, keep)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        mine = {t.data_ptr() for t in model.state_dict().values()}
        theirs = {t.data_ptr() for t in result.model.state_dict().values()}
        assert not mine & theirs


# ------------------------------------------------------------------------------------------
# chunked helpers equal their plain definitions, for contiguous slices and consumer views
# ------------------------------------------------------------------------------------------


def view_block(seed: int = 0) -> Block:
    """A block whose ``out`` is a permuted view of a consumer weight (m, n * r)."""
    g = gen(seed)
    n, m, r = 9, 5, 4
    consumer = torch.randn(m, n * r, generator=g)
    out = consumer.view(m, n, r).permute(1, 0, 2)
    weight = torch.randn(n, 7, generator=g)
    weight[2] = 0.0  # dead by its input
    with torch.no_grad():
        consumer.view(m, n, r)[:, 5] = 0.0  # dead by its output
        consumer.view(m, n, r)[:, 6] = 0.0
        consumer.view(m, n, r)[0, 6, 0] = 1e-30  # alive: a tiny entry
    return Block("fc", weight, out, None, 1.5)


@pytest.mark.parametrize("layout", ["contiguous", "view"])
def test_block_helpers_match_plain_definitions(layout, monkeypatch):
    monkeypatch.setattr(memory, "SLICE_BYTES", 64)  # many chunks
    monkeypatch.setattr(memory, "CACHE_BYTES", 300)  # consumer rows 2 at a time (5 = 2+2+1)
    block = view_block() if layout == "view" else random_block(9, 6, 5, seed=1, reads=4)
    assert block.out.is_contiguous() == (layout == "contiguous")
    out64 = block.out.double()
    torch.testing.assert_close(block.out_norms.double(), out64.flatten(1).norm(dim=1))
    live = (block.weight != 0).any(1) & (block.out != 0).flatten(1).any(1)
    assert torch.equal(block.live(), live)
    e = torch.rand(block.n, generator=gen(2), dtype=F64)
    torch.testing.assert_close(block.weighted_out_abs(e), (out64.abs().sum(2) * e[:, None]).sum(0))
    k = 4
    a = torch.arange(block.n) % k
    a[1] = -1
    shares = torch.rand(block.n, generator=gen(3)).to(block.weight.dtype)
    rows = torch.randn(k, block.weight.shape[1], generator=gen(4)).to(block.weight.dtype)
    merge = merge_by_shares(block, a, shares, rows)
    ref = torch.zeros(k, *block.out.shape[1:], dtype=F64)
    live_a = a >= 0
    ref.index_add_(0, a[live_a], shares[live_a].double()[:, None, None] * out64[live_a])
    torch.testing.assert_close(merge.out.double(), ref, rtol=1e-5, atol=1e-6)
    w64 = block.weight.double()
    approx = torch.where(live_a[:, None], shares.double()[:, None] * rows.double()[a.clamp(0)], 0.0)
    err = (w64 - approx).norm(dim=1)
    torch.testing.assert_close(share_errors(block.weight, a, shares, rows), err)
    torch.testing.assert_close(
        certificate(block, merge),
        block.rho * share_bound(block.weight, block.out_abs(), a, shares, rows),
    )


def test_apply_adopts_slices_built_in_the_consumer_layout(monkeypatch):
    monkeypatch.setattr(surgery, "FLOAT64_MAX_WEIGHTS", 0)
    model = conv_flatten()
    spec = discover(model)[0][1]  # Linear 108 -> 7 feeding Linear 7 -> 4
    block = surgery.extract(model, spec)
    merge = compress_block(get_method("tropnnc"), block, 3, gen(0))
    assert merge.out.permute(1, 0, 2).is_contiguous()  # (m, K, r): the consumer's layout
    copied = conv_flatten()  # the same merge from unit-major slices: copied into the layer
    surgery.apply(
        copied, spec, blk.Merge(merge.rows, merge.out.contiguous(), merge.assignment, merge.shares)
    )
    surgery.apply(model, spec, merge)
    assert model[6].weight.data_ptr() == merge.out.data_ptr()  # adopted, not copied
    assert model[6].weight.shape == (4, 3) and model[6].weight.requires_grad
    x = torch.randn(6, 3, 8, 8, generator=gen(1))
    torch.testing.assert_close(model(x), copied(x))


def test_compress_block_without_dead_units_equals_merge_of_subset():
    block = random_block(30, 5, 4, seed=6)
    a = compress_block(get_method("tropnnc"), block, 10, gen(7))
    b = get_method("tropnnc").merge(block.subset(torch.arange(30)), 10, gen(7))
    assert torch.equal(a.rows, b.rows) and torch.equal(a.out, b.out)
    assert torch.equal(a.assignment, b.assignment) and torch.equal(a.shares, b.shares)
