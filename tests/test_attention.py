"""Narrowed attention heads (tropnnc.attention, tropnnc.heads, tropnnc.modules): exact at
full rank and on low-rank circuits, optimal on the value circuit, the certificate never
exceeded, drop-in replacements for timm's Attention and nn.MultiheadAttention, save/load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tropnnc
from tropnnc import zoo
from tropnnc.attention import certificate, narrow, split_width
from tropnnc.graph.attention import find_attention
from tropnnc.heads import apply_heads, extract_heads, input_norm
from tropnnc.io import load, save
from tropnnc.modules import CompactAttention, CompactMultiheadAttention


class Attention(nn.Module):
    """timm's Attention layout (qkv split into heads, proj), written out for the tests."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """A pre-norm transformer block around :class:`Attention` (or MultiheadAttention)."""

    def __init__(self, dim: int = 12, heads: int = 3, mha: bool = False, **kw) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = (
            nn.MultiheadAttention(dim, heads, batch_first=True)
            if mha
            else Attention(dim, heads, **kw)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.mha = mha

    def forward(self, x):  # (B, T, dim)
        h = self.norm1(x)
        x = x + (self.attn(h, h, h, need_weights=False)[0] if self.mha else self.attn(h))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def _block(mha: bool, seed: int = 0, **kw) -> Block:
    torch.manual_seed(seed)
    block = Block(mha=mha, **kw).double().eval()
    with torch.no_grad():  # affine norms and biases that are not the defaults
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block


@pytest.mark.parametrize("mha", [False, True])
def test_full_rank_is_the_same_function(mha):
    """Narrowing to the full head width rewrites every weight (biases folded, key bias
    dropped, scale kept) and computes the same outputs."""
    block = _block(mha)
    spec = find_attention(block)[0][0]
    assert spec.norm == "norm1" and spec.style == ("mha" if mha else "timm")
    narrowed = narrow(
        extract_heads(block, spec), spec.head_dim, spec.head_dim, *input_norm(block, spec)
    )
    before = block.attn
    apply_heads(block, spec, narrowed.heads)
    assert type(block.attn) is (CompactMultiheadAttention if mha else CompactAttention)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    h = block.norm1(x)
    want = before(h, h, h, need_weights=False)[0] if mha else before(h)
    got = block.attn(h, h, h, need_weights=False)[0] if mha else block.attn(h)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert certificate(narrowed, math.sqrt(12)) == pytest.approx(0.0, abs=1e-9)


def test_low_rank_circuits_narrow_exactly():
    """Heads whose query, key and value rows span only r directions (duplicated rows, the
    analogue of duplicate units) narrow to r exactly, with certificate 0."""
    block = _block(False)
    with torch.no_grad():
        w = block.attn.qkv.weight.view(3, 3, 4, 12)  # (q/k/v, head, dim, input)
        w[:, :, 2:] = w[:, :, :2]  # each head: 2 distinct rows, each twice
        block.attn.qkv.bias.view(3, 3, 4)[:, :, 2:] = block.attn.qkv.bias.view(3, 3, 4)[:, :, :2]
    spec = find_attention(block)[0][0]
    narrowed = narrow(extract_heads(block, spec), 2, 2, *input_norm(block, spec))
    assert certificate(narrowed, math.sqrt(12)) < 1e-9
    before = block.attn
    apply_heads(block, spec, narrowed.heads)
    h = block.norm1(torch.randn(3, 5, 12, dtype=torch.float64))
    torch.testing.assert_close(block.attn(h), before(h), rtol=1e-9, atol=1e-9)
    assert block.attn.q.out_features == block.attn.v.out_features == 3 * 2


def test_split_width():
    """A quarter of the width budget to query/key, values capped at the head width, and
    the MACs of the four projections are those of the average width."""
    assert split_width(4, 8) == (2, 6) and split_width(7, 8) == (6, 8)
    assert split_width(1, 8) == (1, 1) and split_width(32, 64) == (16, 48)
    for d in (1, 8, 64):
        for w in range(1, d + 1):
            qk, v = split_width(w, d)
            assert qk + v == 2 * w and 1 <= qk <= d and 1 <= v <= d and v >= qk


def test_value_circuit_is_the_best_rank_r_map():
    """Eckart-Young: each head's new value-output map differs from the old one by exactly
    its (r + 1)-th singular value in spectral norm, the least any rank-r map can."""
    block = _block(False)
    spec = find_attention(block)[0][0]
    heads = extract_heads(block, spec)
    narrowed = narrow(heads, 2, 2)  # no norm: the circuits of x itself
    new = narrowed.heads
    for h in range(3):
        old_map = heads.wo[:, h] @ heads.wv[h]
        new_map = new.wo[:, h] @ new.wv[h]
        values = torch.linalg.svdvals(old_map)
        assert torch.linalg.matrix_rank(new_map) == 2
        assert torch.linalg.matrix_norm(old_map - new_map, 2) == pytest.approx(float(values[2]))


@pytest.mark.parametrize("mha", [False, True])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_certificate_holds_for_any_input(mha, rank):
    """Every output token of the narrowed attention stays within the certificate of the
    original's, for inputs of any scale (the LayerNorm bounds what the heads read)."""
    block = _block(mha, seed=rank)
    spec = find_attention(block)[0][0]
    narrowed = narrow(extract_heads(block, spec), rank, rank, *input_norm(block, spec))
    bound = certificate(narrowed, math.sqrt(12))
    before = block.attn
    apply_heads(block, spec, narrowed.heads)
    torch.manual_seed(10 + rank)
    worst = 0.0
    with torch.no_grad():
        for scale in (0.01, 1.0, 100.0):
            x = scale * torch.randn(64, 9, 12, dtype=torch.float64)
            x[:8] = scale * torch.randn(8, 1, 12, dtype=torch.float64)  # identical tokens
            h = block.norm1(x)
            want = before(h, h, h, need_weights=False)[0] if mha else before(h)
            got = block.attn(h, h, h, need_weights=False)[0] if mha else block.attn(h)
            worst = max(worst, float((got - want).norm(dim=-1).max()))
    assert 0 < worst <= bound


def test_compact_multihead_attention_matches_torch_conventions():
    """Masks (bool and float, key padding), sequence-first layout, unbatched inputs and the
    averaged attention weights behave as nn.MultiheadAttention's, at full rank."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).double().eval()  # batch_first=False
    model = nn.Module()
    model.attn = mha
    spec = find_attention(model)[0][0]
    assert spec.norm is None  # never called in a traced forward
    compact = nn.Module()
    compact.attn = mha
    apply_heads(compact, spec, narrow(extract_heads(model, spec), 4, 4).heads)
    new = compact.attn
    q = torch.randn(5, 3, 8, dtype=torch.float64)
    kv = torch.randn(6, 3, 8, dtype=torch.float64)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    masks = [
        {},
        {"key_padding_mask": pad},
        {"attn_mask": (torch.rand(5, 6) > 0.7).index_fill(1, torch.tensor([0]), False)},
        {"attn_mask": torch.randn(5, 6, dtype=torch.float64)},
        {"attn_mask": torch.rand(5, 6) > 0.9, "key_padding_mask": pad},
    ]
    for kw in masks:
        out, weights = new(q, kv, kv, **kw)
        want, want_weights = mha(q, kv, kv, **kw)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(weights, want_weights)
        out, none = new(q, kv, kv, need_weights=False, **kw)
        torch.testing.assert_close(out, want)
        assert none is None
    torch.testing.assert_close(
        new(q[:, 0], kv[:, 0], kv[:, 0])[0], mha(q[:, 0], kv[:, 0], kv[:, 0])[0]
    )


def test_left_alone_with_reasons():
    """q/k normalisation inside the heads and cross-attention are reported, not narrowed."""
    specs, skips = find_attention(Block(qk_norm=True))
    assert not specs and "normalises inside the heads (q_norm)" in skips[0].reason

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x, memory):
            return self.attn(x, memory, memory)[0]

    specs, skips = find_attention(Cross())
    assert not specs and "cross-attention" in skips[0].reason


def test_compress_narrows_vit_heads_and_counts_them():
    """compress narrows every attention of vit-mini with keep: widths, parameters and MACs
    by hand; keep 1.0 changes nothing; attention=False, an int keep and a budget leave it."""
    model = zoo.build("vit-mini").eval()  # dim 16, 2 heads of 8, 2 blocks, hidden 32, 16 tokens
    x = torch.rand(4, 1, 28, 28)
    result = tropnnc.compress(model, 0.5)
    heads = [b for b in result.blocks if b.method == "svd"]
    assert [(b.layer, b.units_before, b.units_after) for b in heads] == [
        ("blocks.0.attn", 16, 8),
        ("blocks.1.attn", 16, 8),
    ]
    assert all(0 < b.certificate < math.inf and b.radius > 0 for b in heads)
    attn = result.model.blocks[0].attn
    assert type(attn) is CompactMultiheadAttention and attn.batch_first
    # average width 4 of 8 per head: query/key 2, values 6 (split_width), 2 heads
    assert (attn.q.out_features, attn.v.out_features, attn.proj.in_features) == (4, 12, 12)
    # per block: MHA 4 * 16 * 16 + 4 biases * 16 = 1088 -> q, k 2 * (16 * 4 + 4), v 16 * 12
    # + 12, proj 12 * 16 + 16: 548; MLP 16 -> 32 -> 16: 1072 -> 544 (fc1 16 * 16 + 16, fc2
    # 16 * 16 + 16)
    assert result.params_before - result.params_after == 2 * ((1088 - 548) + (1072 - 544))
    # MACs per block: MHA 16 tokens * (4 * 16 * 16) -> 16 * 16 * (4 + 4 + 12 + 12) (half);
    # MLP 16 * 2 * 512 -> half
    per_block = 16 * 4 * 16 * 8 + 16 * 512
    assert result.macs_before - result.macs_after == 2 * per_block
    assert result.model(x).shape == (4, 10)
    same = tropnnc.compress(model, 1.0)
    torch.testing.assert_close(same.model(x), model(x))
    assert isinstance(same.model.blocks[0].attn, nn.MultiheadAttention)
    for kw, why in (
        ({"keep": 0.5, "attention": False}, None),
        ({"keep": 8}, "an int keep (a block width) sizes blocks only"),
        ({"budget": 0.5}, "a budget sizes blocks only"),
    ):
        kept = tropnnc.compress(model, **kw)
        assert isinstance(kept.model.blocks[0].attn, nn.MultiheadAttention), kw
        reasons = [s.reason for s in kept.skipped if s.layer == "blocks.0.attn"]
        assert reasons == ([] if why is None else [f"attention left alone: {why}; pass a fraction"])
    only = tropnnc.compress(model, {"blocks.1.attn": 2})
    assert [(b.layer, b.units_after) for b in only.blocks] == [("blocks.1.attn", 4)]
    assert isinstance(only.model.blocks[0].attn, nn.MultiheadAttention)
    with pytest.raises(ValueError, match=r"blocks.1.attn \(per-head width\).*between 1 and"):
        tropnnc.compress(model, {"blocks.1.attn": 9})


def test_narrowed_heads_are_not_narrowed_again():
    """Compressing a compressed ViT leaves its compact attention alone, and says why."""
    model = zoo.build("vit-mini").eval()
    again = tropnnc.compress(tropnnc.compress(model, 0.5).model, 0.5)
    assert not [b for b in again.blocks if b.method == "svd"]
    reasons = [s.reason for s in again.skipped if s.layer == "blocks.0.attn"]
    assert reasons and "narrowed already (CompactMultiheadAttention)" in reasons[0]


def test_save_and_load_round_trip(tmp_path):
    """A model with narrowed heads saves without pickle and loads to the same function."""
    model = zoo.build("vit-mini").eval()
    result = tropnnc.compress(model, 0.5)
    path = save(result, tmp_path / "vit")
    loaded = load(path)
    assert type(loaded.blocks[1].attn) is CompactMultiheadAttention
    assert loaded.blocks[1].attn.config() == result.model.blocks[1].attn.config()
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), result.model(x))


def test_attention_without_biases():
    """An nn.MultiheadAttention without biases narrows at full width to the same function
    (the compact layer carries the biases the LayerNorm's shift makes necessary)."""
    block = _block(True)
    torch.manual_seed(1)
    block.attn = nn.MultiheadAttention(12, 3, bias=False, batch_first=True).double().eval()
    spec = find_attention(block)[0][0]
    before = block.attn
    apply_heads(
        block, spec, narrow(extract_heads(block, spec), 4, 4, *input_norm(block, spec)).heads
    )
    h = block.norm1(torch.randn(2, 6, 12, dtype=torch.float64))
    torch.testing.assert_close(block.attn(h, h, h)[0], before(h, h, h)[0], rtol=1e-10, atol=1e-10)
