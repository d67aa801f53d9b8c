"""The fast reconstruction against its plain reference (tropnnc.reconstruct_reference)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_block

from tropnnc import _memory as memory
from tropnnc.block import Block
from tropnnc.cluster import cosine_gram
from tropnnc.methods import get_method
from tropnnc.moments import Gaussian
from tropnnc.reconstruct import Reconstruction, reconstruct_merge, reconstruct_reference

F64 = torch.float64


def _bn(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.rand(n, generator=g, dtype=F64) + 0.5,
        "bias": torch.randn(n, generator=g, dtype=F64),
        "running_var": torch.rand(n, generator=g, dtype=F64) + 0.5,
        "eps": torch.full((n,), 1e-5, dtype=F64),
    }


@pytest.mark.parametrize("reads", [1, 9])  # FC consumer, conv consumer (3x3 reads)
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("method", ["tropnnc", "model-folding"])
@pytest.mark.parametrize("options", [Reconstruction(), Reconstruction(shrink=0.3, bn_shrink=0.8)])
@pytest.mark.parametrize("chained", [False, True])  # a modelled input N(m, C) given
def test_fast_reconstruction_equals_the_reference(reads, bn, method, options, chained):
    base = random_block(60, 12, 5, seed=7, reads=reads)
    g = torch.Generator().manual_seed(8)
    weight = base.weight.clone()
    weight[30:45] = weight[:15] + 0.05 * torch.randn(15, 13, generator=g, dtype=F64)  # near
    weight[45:50, :-1] *= 1e-3  # nearly constant units
    stats = _bn(60, 9) if bn else None
    block = Block("fc", weight, base.out, base.consumer_bias, 1.0, "linear", (12,), stats)
    merge = get_method(method).merge(block, 21, torch.Generator().manual_seed(0))
    assert (merge.gram is not None) == (method == "tropnnc")  # the cosines are reused
    inputs = None
    if chained:
        root = torch.randn(12, 12, generator=g, dtype=F64)
        inputs = Gaussian(torch.randn(12, generator=g, dtype=F64), root @ root.T / 12)
    new, note, _ = reconstruct_merge(block, merge, options, None, inputs)
    assert note is None and new.gram is None
    out, bias, p = reconstruct_reference(block, merge, options, inputs)
    torch.testing.assert_close(new.projection, p, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(new.out, out, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(new.consumer_bias, bias, atol=1e-7, rtol=1e-7)


def test_tropnnc_hands_over_the_cosines_of_its_rows():
    block = random_block(20, 6, 3, seed=1)
    merge = get_method("tropnnc").merge(block, 7, torch.Generator().manual_seed(0))
    torch.testing.assert_close(merge.gram, cosine_gram(block.weight))
    two_steps = get_method("tropnnc", steps=2).merge(block, 7, torch.Generator().manual_seed(0))
    assert two_steps.gram is None  # a composed merge's rows are not the block's


@pytest.mark.parametrize("reads", [1, 9])
@pytest.mark.parametrize("chained", [False, True])
def test_float32_consumer_view_equals_the_reference(reads, chained, monkeypatch):
    """A large (float32) block whose slices are a view of the consumer weight: the new slices
    come back in the consumer's layout, computed a few consumer rows at a time, and the
    reordered bias correction (P^T E a~) agrees with the reference."""
    monkeypatch.setattr(memory, "SLICE_BYTES", 64 * reads)  # a few consumer rows a chunk
    base = random_block(60, 12, 5, seed=7, reads=reads)
    consumer = base.out.permute(1, 0, 2).contiguous().float()  # (m, n, r): the consumer's
    weight = base.weight.float()
    block = Block("fc", weight, consumer.permute(1, 0, 2), base.consumer_bias.float(), 1.0)
    assert block._consumer_layout() is not None
    merge = get_method("tropnnc").merge(block, 21, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(8)
    inputs = None
    if chained:
        root = torch.randn(12, 12, generator=g, dtype=F64)
        inputs = Gaussian(torch.randn(12, generator=g, dtype=F64), root @ root.T / 12)
    new, note, _ = reconstruct_merge(block, merge, None, None, inputs)
    assert note is None and new.out.dtype == torch.float32
    assert new.out.permute(1, 0, 2).is_contiguous()  # (m, K, r): adopted without a copy
    out, bias, p = reconstruct_reference(block, merge, None, inputs)
    torch.testing.assert_close(new.projection, p, atol=1e-5, rtol=1e-5)
    plain = torch.einsum("kn,nmr->kmr", new.projection.float(), block.out)  # (K, m, r)
    torch.testing.assert_close(new.out, plain, atol=1e-5, rtol=1e-5)  # float32 rounding
    torch.testing.assert_close(new.out.double(), out, atol=1e-4, rtol=1e-4)  # float32 slices
    torch.testing.assert_close(new.consumer_bias, bias, atol=1e-5, rtol=1e-5)
