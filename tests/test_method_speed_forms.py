"""The vectorised / Gram-space forms of the baselines against plain reference copies.

Each reference below is the straightforward implementation the library used before its
method was rewritten for speed (greedy loop over every pair, per-cluster loop, concatenated
features, scipy's own distance pass). On small random blocks the fast forms must give the
same clustering and the same merge, to float rounding.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_block
from scipy.cluster.hierarchy import cut_tree, linkage

from tropnnc.block import Block, Merge, merge_by_shares
from tropnnc.cluster import gram_of_chunks, kmeans, kmeans_gram, ward
from tropnnc.methods import get_method
from tropnnc.methods._features import centred_feature_gram
from tropnnc.methods.model_folding import cluster_means, fold_repair, robust_scale


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------
# reference copies (plain, slow)
# ------------------------------------------------------------------------------------------


def ref_srinivas_babu(block: Block, k: int) -> Merge:
    n = block.n
    dist = torch.cdist(block.weight, block.weight).pow(2)
    dist.fill_diagonal_(float("inf"))
    out = block.out.flatten(1).clone()
    parent = torch.arange(n)
    alive = torch.ones(n, dtype=torch.bool)
    for _ in range(n - k):
        near, partner = dist.min(dim=0)
        saliency = out.pow(2).mean(1) * near
        saliency[~alive] = float("inf")
        j = int(saliency.argmin())
        i = int(partner[j])
        out[i] += out[j]
        parent[j] = i
        alive[j] = False
        dist[j, :] = float("inf")
        dist[:, j] = float("inf")
    while True:
        nxt = parent[parent]
        if torch.equal(nxt, parent):
            break
        parent = nxt
    survivors = alive.nonzero().squeeze(1)
    index = torch.full((n,), -1, dtype=torch.long)
    index[survivors] = torch.arange(k)
    shares = torch.ones(n, dtype=block.weight.dtype)
    merge = merge_by_shares(block, index[parent], shares, block.weight[survivors].clone())
    return Merge(merge.rows, merge.out, merge.assignment, merge.shares, survivors)


def ref_fold_repair(block: Block, assignment: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    a_in = block.weight[:, :-1]
    if block.bn is not None:
        var = block.bn["running_var"].clamp(min=0)
        s = block.bn["weight"].abs() * (var / (var + block.bn["eps"])).sqrt()
        mu = block.bn["bias"]
    else:
        s = a_in.norm(dim=1)
        mu = torch.zeros_like(s)
    norms = a_in.norm(dim=1).clamp(min=torch.finfo(a_in.dtype).tiny)
    unit = a_in / norms[:, None]
    out = rows.clone()
    for c in range(rows.shape[0]):
        idx = (assignment == c).nonzero().squeeze(1)
        n_c = idx.numel()
        if n_c < 2:
            continue
        corr = unit[idx] @ unit[idx].T
        sc = s[idx]
        pred = (sc[:, None] * corr * sc[None, :]).sum().clamp(min=0).sqrt() / n_c
        target = sc.mean()
        if pred <= 0 or target <= 0:
            continue
        scale = target / pred
        out[c] = scale * rows[c]
        out[c, -1] = out[c, -1] + (1.0 - scale) * mu[idx].mean()
    return out


def ref_neural_path_kmeans(block: Block, k: int, generator: torch.Generator) -> Merge:
    paths = torch.cat([block.weight, block.out.flatten(1)], dim=1)
    clustering = kmeans(paths, k, generator=generator)
    rows = clustering.centroids[:, : block.weight.shape[1]]
    shares = torch.ones(block.n, dtype=block.weight.dtype)
    return merge_by_shares(block, clustering.assignment, shares, rows)


def ref_model_folding(
    block: Block, k: int, generator: torch.Generator, features: str, normalize: bool, repair: bool
) -> Merge:
    feats = block.weight
    if features == "both":
        feats = torch.cat([block.weight, block.out.flatten(1)], dim=1)
    if normalize:
        feats = robust_scale(feats)
    a = kmeans(feats, k, generator=generator).assignment
    rows = cluster_means(block.weight, a, k)
    if repair:
        rows = ref_fold_repair(block, a, rows)
    return merge_by_shares(block, a, torch.ones(block.n, dtype=block.weight.dtype), rows)


def ref_ward(points: torch.Tensor, k: int) -> torch.Tensor:
    labels = cut_tree(linkage(points.double().numpy(), method="ward"), n_clusters=k)
    return torch.as_tensor(labels.reshape(-1), dtype=torch.long)


# ------------------------------------------------------------------------------------------
# blocks
# ------------------------------------------------------------------------------------------


def conv_like(n: int, d: int, m: int, reads: int, seed: int, *, view: bool) -> Block:
    """A block with several reads per output; ``view``: ``out`` is a permuted view of a
    (m, n, reads) consumer weight, the layout large extracted blocks have."""
    g = gen(seed)
    weight = torch.randn(n, d + 1, generator=g, dtype=torch.float64)
    if view:
        out = torch.randn(m, n, reads, generator=g, dtype=torch.float64).permute(1, 0, 2)
    else:
        out = torch.randn(n, m, reads, generator=g, dtype=torch.float64)
    return Block("conv", weight, out, None, 1.0, "conv", (d,))


def clustered(n: int, d: int, m: int, seed: int) -> Block:
    """Units around n // 4 centres, so clusterings have structure (not only noise)."""
    g = gen(seed)
    centres = torch.randn(max(1, n // 4), d + 1, generator=g, dtype=torch.float64)
    pick = torch.randint(0, centres.shape[0], (n,), generator=g)
    weight = centres[pick] + 0.3 * torch.randn(n, d + 1, generator=g, dtype=torch.float64)
    out = torch.randn(n, m, 1, generator=g, dtype=torch.float64)
    return Block("fc", weight, out, None, 1.0, "linear", (d,))


BLOCKS = [
    lambda: random_block(30, 6, 4, seed=1),
    lambda: random_block(64, 12, 7, seed=2, reads=3),
    lambda: conv_like(40, 18, 9, 4, seed=3, view=True),
    lambda: conv_like(33, 10, 5, 9, seed=4, view=False),
    lambda: clustered(80, 9, 6, seed=5),
]


def same_merge(got: Merge, want: Merge) -> None:
    assert torch.equal(got.assignment, want.assignment)
    torch.testing.assert_close(got.rows, want.rows, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.out, want.out, rtol=1e-9, atol=1e-12)
    if want.shares is None:
        assert got.shares is None
    else:
        torch.testing.assert_close(got.shares, want.shares)
    if want.kept is not None:
        assert torch.equal(got.kept, want.kept)


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", BLOCKS)
@pytest.mark.parametrize("keep", [0.5, 0.2])
def test_srinivas_babu_matches_reference(make, keep):
    block = make()
    k = max(1, round(keep * block.n))
    same_merge(get_method("srinivas-babu").merge(block, k, gen()), ref_srinivas_babu(block, k))


def test_srinivas_babu_down_to_one_unit():
    block = random_block(9, 3, 2, seed=8)
    got = get_method("srinivas-babu").merge(block, 1, gen())
    same_merge(got, ref_srinivas_babu(block, 1))
    assert got.assignment.tolist() == [0] * 9


@pytest.mark.parametrize("make", BLOCKS)
@pytest.mark.parametrize("with_bn", [False, True])
def test_fold_repair_matches_reference(make, with_bn):
    block = make()
    g = gen(11)
    k = block.n // 3
    a = torch.randint(0, k, (block.n,), generator=g)
    a[:k] = torch.arange(k)  # no empty cluster
    a[k] = a[k + 1] = k - 1  # and one cluster of >= 3
    if with_bn:
        n = block.n
        bn = {
            "weight": torch.randn(n, generator=g, dtype=torch.float64),
            "bias": torch.randn(n, generator=g, dtype=torch.float64),
            "running_mean": torch.zeros(n, dtype=torch.float64),
            "running_var": torch.rand(n, generator=g, dtype=torch.float64) + 0.5,
            "eps": torch.full((n,), 1e-5, dtype=torch.float64),
        }
        bn["weight"][0] = 0.0  # a unit with gamma 0: target std 0 for its cluster
        block = Block(
            block.name, block.weight, block.out, None, 1.0, block.kind, block.unit_shape, bn=bn
        )
    weight = block.weight.clone()
    weight[1, :-1] = 0.0  # a unit without incoming weights
    block = Block(
        block.name, weight, block.out, None, 1.0, block.kind, block.unit_shape, bn=block.bn
    )
    rows = cluster_means(block.weight, a, k)
    torch.testing.assert_close(
        fold_repair(block, a, rows), ref_fold_repair(block, a, rows), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("make", BLOCKS)
def test_neural_path_kmeans_matches_reference(make):
    block = make()
    k = block.n // 2
    same_merge(
        get_method("neural-path-kmeans").merge(block, k, gen(3)),
        ref_neural_path_kmeans(block, k, gen(3)),
    )


@pytest.mark.parametrize("make", BLOCKS)
@pytest.mark.parametrize(
    "features,normalize,repair",
    [
        ("both", None, True),
        ("producer", None, True),
        ("both", False, False),
        ("producer", True, False),
    ],
)
def test_model_folding_matches_reference(make, features, normalize, repair):
    block = make()
    k = max(2, block.n // 3)
    method = get_method(
        "model-folding", features=features, normalize=normalize, approx_repair=repair
    )
    want = ref_model_folding(
        block, k, gen(4), features, repair if normalize is None else normalize, repair
    )
    same_merge(method.merge(block, k, gen(4)), want)


@pytest.mark.parametrize("make", BLOCKS)
def test_cup_ward_matches_scipy_distances(make):
    block = make()
    from tropnnc.methods.cup import features

    feats = features(block, include_bias=False)
    for k in (1, 2, block.n // 2, block.n - 1):
        assert torch.equal(ward(feats, k), ref_ward(feats, k))


def test_gram_of_chunks_equals_the_product_of_the_whole_matrix():
    g = gen(6)
    for n in (5, 1100, 1537):  # one product, and strips of 512 with a partial last strip
        x = torch.randn(n, 70, generator=g, dtype=torch.float64)
        got = gram_of_chunks((x[:, s : s + 16] for s in range(0, 70, 16)), n, torch.float64)
        torch.testing.assert_close(got, x @ x.T, rtol=1e-12, atol=1e-12)


def test_centred_feature_gram_equals_the_concatenated_features():
    block = conv_like(40, 18, 9, 4, seed=3, view=True)
    feats = torch.cat([block.weight, block.out.flatten(1)], dim=1)
    for transform, x in ((None, feats), (robust_scale, robust_scale(feats))):
        xc = x - x.mean(dim=0)
        torch.testing.assert_close(
            centred_feature_gram(block, True, transform), xc @ xc.T, rtol=1e-12, atol=1e-12
        )
    w = block.weight - block.weight.mean(dim=0)
    torch.testing.assert_close(centred_feature_gram(block, False), w @ w.T)


def test_kmeans_gram_is_kmeans_without_points():
    x = clustered(60, 5, 1, seed=9).weight
    whole = kmeans(x, 7, generator=gen(2))
    xc = x - x.mean(dim=0)
    part = kmeans_gram(xc @ xc.T, 7, generator=gen(2))
    assert torch.equal(whole.assignment, part.assignment)
    assert part.objective == pytest.approx(whole.objective, rel=1e-12)
    assert kmeans_gram(xc @ xc.T, 60, generator=gen()).assignment.tolist() == list(range(60))
