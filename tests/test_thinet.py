"""ThiNet: greedy channel selection and least-squares scales on calibration reads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tropnnc
from tropnnc.block import Block
from tropnnc.methods import get_method
from tropnnc.methods.thinet import greedy_removal


def _block(n: int, m: int, r: int, s: int, *, seed: int = 0) -> Block:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, 5, generator=g, dtype=torch.float64)
    out = torch.randn(n, m, r, generator=g, dtype=torch.float64)
    reads = torch.rand(s, n, r, generator=g, dtype=torch.float64)  # generic, non-negative
    return Block(
        "fc", weight, out, torch.zeros(m, dtype=torch.float64), 1.0, "linear", (4,), reads=reads
    )


def _outputs(reads: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.einsum("sir,ijr->sj", reads, out)


@pytest.mark.parametrize("r", [1, 9])
def test_exact_recovery_when_consumer_ignores_units(r):
    block = _block(12, 5, r, 300)
    ignored = torch.tensor([1, 4, 6, 10])
    out = block.out.clone()
    out[ignored] = 0.0
    block = Block(
        block.name, block.weight, out, block.consumer_bias, 1.0, "linear", (4,), reads=block.reads
    )
    merge = get_method("thinet").merge(block, 8, torch.Generator().manual_seed(0))
    kept = sorted(merge.kept.tolist())
    assert kept == sorted(set(range(12)) - set(ignored.tolist()))
    torch.testing.assert_close(merge.shares[merge.kept], torch.ones(8, dtype=torch.float64))
    torch.testing.assert_close(
        _outputs(block.reads[:, merge.kept], merge.out), _outputs(block.reads, block.out)
    )


def test_scales_recover_planted_scaling():
    base = _block(6, 4, 1, 400, seed=3)
    alpha = torch.tensor([0.1, 0.15, 0.05, 0.2, 0.12, 0.08], dtype=torch.float64)
    # units 6..11 read exactly what units 0..5 read; their slices are alpha times smaller
    weight = torch.cat([base.weight, base.weight])
    out = torch.cat([base.out, alpha[:, None, None] * base.out])
    reads = torch.cat([base.reads, base.reads], 1)
    block = Block("fc", weight, out, base.consumer_bias, 1.0, "linear", (4,), reads=reads)
    merge = get_method("thinet").merge(block, 6, torch.Generator().manual_seed(1))
    assert merge.kept.tolist() == list(range(6))
    torch.testing.assert_close(merge.shares[:6], 1 + alpha)
    assert merge.shares is not None  # positive scales keep the certificate
    torch.testing.assert_close(_outputs(reads[:, :6], merge.out), _outputs(reads, out))


def test_negative_scales_drop_the_certificate():
    g = torch.Generator().manual_seed(5)
    r0, r1 = torch.rand(2, 100, 1, 1, generator=g, dtype=torch.float64)
    reads = torch.cat([r0, r1, r0 + r1], 1)  # (S, 3, 1): unit 2 reads the sum of the others
    out = torch.tensor([[[1.0]], [[1.0]], [[-0.9]]], dtype=torch.float64)
    block = Block(
        "fc",
        torch.randn(3, 5, generator=g, dtype=torch.float64),
        out,
        None,
        1.0,
        "linear",
        (4,),
        reads=reads,
    )
    merge = get_method("thinet").merge(block, 2, torch.Generator().manual_seed(0))
    assert 2 in merge.kept.tolist()
    assert merge.shares is None  # unit 2 needs a negative scale: no certificate
    torch.testing.assert_close(_outputs(reads[:, merge.kept], merge.out), _outputs(reads, out))


def test_greedy_removes_smallest_first():
    x = torch.diag(torch.tensor([3.0, 1.0, 2.0, 0.5], dtype=torch.float64))
    assert greedy_removal(x.T @ x, 2).tolist() == [3, 1]


def test_errors():
    block = _block(6, 2, 1, 50)
    thinet = get_method("thinet")
    g = torch.Generator().manual_seed(0)
    no_reads = Block("fc", block.weight, block.out, None, 1.0, "linear", (4,))
    with pytest.raises(ValueError, match="calibration"):
        thinet.merge(no_reads, 3, g)
    with pytest.raises(ValueError, match="k must be"):
        thinet.merge(block, 0, g)
    with pytest.raises(ValueError, match="rows"):
        get_method("thinet", rows=0)  # checked when the method is made
    with pytest.raises(TypeError, match="unknown option"):
        get_method("thinet", nope=1)
    with pytest.raises(ValueError, match="data-driven"):
        tropnnc.compress(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), 0.5, "thinet")


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3)
        self.c2 = nn.Conv2d(8, 6, 3)
        self.fc = nn.Linear(6 * 4 * 4, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.head(torch.relu(self.fc(torch.flatten(x, 1))))


def test_api_conv_flatten_linear_blocks():
    torch.manual_seed(0)
    model = ConvNet()
    calib = torch.randn(64, 1, 8, 8)
    result = tropnnc.compress(model, 0.5, "thinet", calibration=calib, seed=1)
    assert [b.units_after for b in result.blocks] == [4, 3, 5]
    assert all(b.data_driven for b in result.blocks)
    assert result.model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    again = tropnnc.compress(model, 0.5, "thinet", calibration=calib, seed=1)
    sa, sb = result.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_api_exact_when_consumer_ignores_channels():
    torch.manual_seed(0)
    model = ConvNet()
    with torch.no_grad():
        model.c2.weight[:, 4:] = 0.0  # c2 reads only channels 0..3 of c1
    calib = torch.randn(64, 1, 8, 8)
    result = tropnnc.compress(model, {"c1": 4}, "thinet", calibration=calib)
    x = torch.randn(16, 1, 8, 8)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
