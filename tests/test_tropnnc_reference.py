"""The plain reference TropNNC (methods/tropnnc_reference.py) and the fast method give the
same merge: the fast clustering is a fixed point of the reference's Lloyd iterations, the
merge of that clustering agrees to rounding, and on blocks with planted clusters the
reference finds the same clustering and objective from its own seeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tropnnc import surgery
from tropnnc.block import Block, Merge
from tropnnc.graph import discover
from tropnnc.methods import get_method
from tropnnc.methods.tropnnc_reference import reference_merge

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fc_block(seed: int, n: int = 48, d: int = 10, m: int = 5) -> Block:
    g = gen(seed)
    weight = torch.randn(n, d + 1, generator=g, dtype=F64)
    out = torch.randn(n, m, 1, generator=g, dtype=F64)
    return Block("fc", weight, out, None, 1.0, "linear", (d,))


def conv_block(seed: int) -> Block:
    """conv(3 -> 24, 3x3) -> ReLU -> conv(24 -> 6, 3x3): slices of 9 reads, and ``out`` a
    view of the consumer's weight (the fast path writes the new slices in that layout)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 24, 3), nn.ReLU(), nn.Conv2d(24, 6, 3)).double()
    block = surgery.extract(model, discover(model)[0][0])
    assert block.out.shape == (24, 6, 9)
    return block


def objective(block: Block, merge: Merge) -> float:
    """sum_i m_i sin(angle(w_i, u_a(i))): the spherical objective of a merge (m_i when the
    cosine is negative), computed directly from the rows (sin as the distance of d_i from
    its projection on u, accurate near 0)."""
    norms = block.weight.norm(dim=1)
    mass = norms * block.out.flatten(1).norm(dim=1)
    d = block.weight / norms[:, None]
    u = merge.rows[merge.assignment]
    u = u / u.norm(dim=1, keepdim=True)
    cos = (d * u).sum(1)
    sin = (d - cos[:, None] * u).norm(dim=1)
    return float(torch.where(cos >= 0, mass * sin, mass).sum())


def assert_same_merge(ref: Merge, fast: Merge) -> None:
    assert torch.equal(ref.assignment, fast.assignment)
    torch.testing.assert_close(ref.rows, fast.rows, rtol=0, atol=1e-10)
    torch.testing.assert_close(ref.shares, fast.shares, rtol=0, atol=1e-10)
    torch.testing.assert_close(ref.out, fast.out, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("kind", "seed", "k"),
    [("fc", 0, 12), ("fc", 1, 5), ("fc", 2, 30), ("conv", 3, 8), ("conv", 4, 16)],
)
def test_fast_clustering_is_a_reference_fixed_point_with_the_same_merge(kind, seed, k):
    block = fc_block(seed) if kind == "fc" else conv_block(seed)
    fast = get_method("tropnnc").merge(block, k, gen(seed))
    # the merge step alone: the reference merges the fast clustering the same way
    step = reference_merge(block.weight, block.out, k, init=fast.assignment, iters=0)
    assert_same_merge(step, fast)
    # and its Lloyd iterations do not move any unit: the fast result is a fixed point
    ref = reference_merge(block.weight, block.out, k, init=fast.assignment)
    assert_same_merge(ref, fast)
    assert objective(block, ref) == pytest.approx(objective(block, fast), rel=1e-12)


def planted_block(seed: int, k: int = 6, per: int = 8, d: int = 12, m: int = 4) -> Block:
    """k directions, ``per`` units near each (angles of a few degrees), random scales."""
    g = gen(seed)
    dirs = torch.randn(k, d + 1, generator=g, dtype=F64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    noise = 0.05 * torch.randn(k * per, d + 1, generator=g, dtype=F64)
    scale = torch.rand(k * per, 1, generator=g, dtype=F64) + 0.2
    weight = (dirs.repeat_interleave(per, 0) + noise) * scale
    out = torch.randn(k * per, m, 1, generator=g, dtype=F64)
    perm = torch.randperm(k * per, generator=g)
    return Block("fc", weight[perm], out[perm], None, 1.0, "linear", (d,))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_finds_the_fast_clustering_from_its_own_seeds(seed):
    block = planted_block(seed)
    fast = get_method("tropnnc").merge(block, 6, gen(seed))
    ref = reference_merge(block.weight, block.out, 6, generator=gen(100 + seed))
    # the same partition under some relabelling c -> label[c]
    label = torch.full((6,), -1, dtype=torch.long)
    label[ref.assignment] = fast.assignment
    assert torch.equal(label[ref.assignment], fast.assignment)
    assert sorted(label.tolist()) == list(range(6))
    order = torch.argsort(label)  # reference clusters in the fast path's order
    relabelled = Merge(ref.rows[order], ref.out[order], fast.assignment, ref.shares)
    assert_same_merge(relabelled, fast)
    assert objective(block, ref) == pytest.approx(objective(block, fast), rel=1e-12)
    assert objective(block, fast) > 0.1  # a real clustering problem, not exact multiples
