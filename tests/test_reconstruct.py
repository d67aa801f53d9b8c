"""The least-squares reconstruction: exact cases, optimality under its model, certificates."""

from __future__ import annotations

import pytest
import torch
from conftest import ball_points, random_block
from torch import nn

import tropnnc
from tropnnc.block import Block, Merge, certificate, merge_by_shares, projection_errors
from tropnnc.bounds import domain_std
from tropnnc.graph import discover, input_readers
from tropnnc.methods import get_method
from tropnnc.moments import Gaussian, block_statistics
from tropnnc.reconstruct import Reconstruction, least_squares_projection, reconstruct_merge
from tropnnc.surgery import extract

F64 = torch.float64


def _outputs(
    block: Block, rows: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    """y (q, m) when every read t sees its own input x[:, t] (q, r, d)."""
    xb = torch.cat([x, torch.ones(*x.shape[:2], 1, dtype=F64)], dim=2)
    act = torch.relu(torch.einsum("qtd,kd->qkt", xb, rows))
    y = torch.einsum("qkt,kmt->qm", act, out)
    return y if bias is None else y + bias


def _merged(block: Block, k: int, method: str = "tropnnc", seed: int = 0) -> Merge:
    return get_method(method).merge(block, k, torch.Generator().manual_seed(seed))


def test_identity_merge_is_reconstructed_as_the_identity():
    block = random_block(6, 4, 3, seed=2)
    merge = merge_by_shares(block, torch.arange(6), torch.ones(6, dtype=F64), block.weight)
    new, note, _ = reconstruct_merge(block, merge, Reconstruction(ridge=0.1))
    assert note is None
    torch.testing.assert_close(new.projection, torch.eye(6, dtype=F64), atol=1e-10, rtol=0)
    x = ball_points(50, 4, 3.0)[:, None, :]
    torch.testing.assert_close(
        _outputs(block, new.rows, new.out, new.consumer_bias, x),
        _outputs(block, block.weight, block.out, block.consumer_bias, x),
    )


def test_duplicate_units_collapse_exactly():
    base = random_block(4, 5, 3, seed=4)
    weight = torch.cat([base.weight, base.weight[[1, 3]]])  # units 4, 5 duplicate 1, 3
    g = torch.Generator().manual_seed(9)
    block = Block(
        "fc",
        weight,
        torch.randn(6, 3, 1, generator=g, dtype=F64),
        base.consumer_bias,
        1.0,
        "linear",
        (5,),
    )
    assignment = torch.tensor([0, 1, 2, 3, 1, 3])
    merge = merge_by_shares(block, assignment, torch.ones(6, dtype=F64), base.weight.clone())
    new, note, _ = reconstruct_merge(block, merge)  # default ridge: pulled toward the exact merge
    assert note is None
    x = ball_points(80, 5, 2.0)[:, None, :]
    torch.testing.assert_close(
        _outputs(block, new.rows, new.out, new.consumer_bias, x),
        _outputs(block, block.weight, block.out, block.consumer_bias, x),
        atol=1e-6,
        rtol=1e-6,
    )


def test_projection_is_the_least_squares_refit_under_the_model():
    """Without BN the model is x ~ N(0, I): the empirical refit on its samples converges to P."""
    block = random_block(10, 6, 4, seed=6)
    merge = _merged(block, 4)
    p, moments = least_squares_projection(block, merge, Reconstruction(ridge=0.0))
    mean, new_mean = moments.mean, moments.new_mean
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400_000, 6, generator=g, dtype=F64)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], dim=1)
    a = torch.relu(xb @ block.weight.T)
    a_new = torch.relu(xb @ merge.rows.T)
    torch.testing.assert_close(a.mean(0), mean, atol=0.01, rtol=0.01)
    torch.testing.assert_close(a_new.mean(0), new_mean, atol=0.01, rtol=0.01)
    ac, nc = a - a.mean(0), a_new - a_new.mean(0)
    p_emp = torch.linalg.solve(nc.T @ nc, nc.T @ ac)  # (k, n)
    torch.testing.assert_close(p, p_emp, atol=0.03, rtol=0.03)


def test_reconstruction_lowers_the_expected_error_under_the_model():
    block = random_block(24, 8, 5, seed=8)
    merge = _merged(block, 6)
    new, _, _ = reconstruct_merge(block, merge)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100_000, 1, 8, generator=g, dtype=F64)
    y = _outputs(block, block.weight, block.out, block.consumer_bias, x)
    share = _outputs(block, merge.rows, merge.out, block.consumer_bias, x)
    ls = _outputs(block, new.rows, new.out, new.consumer_bias, x)
    assert ((ls - y) ** 2).mean() < 0.8 * ((share - y) ** 2).mean()


@pytest.mark.parametrize("reads", [1, 3])
@pytest.mark.parametrize("method", ["tropnnc", "model-folding", "l1"])
def test_certificate_of_a_reconstructed_merge_is_never_exceeded(reads, method):
    block = random_block(16, 5, 4, seed=3, reads=reads, radius=2.5)
    merge = _merged(block, 5, method)
    new, note, _ = reconstruct_merge(block, merge, Reconstruction(shrink=0.3))
    assert note is None and new.shares is None
    bound = certificate(block, new)
    assert torch.isfinite(bound).all()
    q = 4000
    x = ball_points(q * reads, 5, 2.5, seed=5)[torch.randperm(q * reads)].view(q, reads, 5)
    err = (
        _outputs(block, new.rows, new.out, new.consumer_bias, x)
        - _outputs(block, block.weight, block.out, block.consumer_bias, x)
    ).abs()
    assert (err <= bound + 1e-9).all()
    assert float(err.max()) > 0.05 * float(bound.max())  # the bound is not vacuous


def test_projection_bound_handles_negative_coefficients():
    """w_2 = -w_1 spread onto u = w_1 with P = -1: the error is |u.x|, not 0."""
    u = torch.tensor([[1.0, 2.0, 0.0]], dtype=F64)
    weight = torch.cat([u, -u])
    p = torch.tensor([[1.0, -1.0]], dtype=F64)
    err = projection_errors(weight, torch.tensor([0, 0]), p, u)
    torch.testing.assert_close(err, torch.tensor([0.0, 2.0 * float(u.norm())], dtype=F64))
    x = torch.tensor([[0.0, -1.0]], dtype=F64)  # relu(-u.x) + relu(u.x) = 2 at x = (0, -1)
    xb = torch.cat([x, torch.ones(1, 1, dtype=F64)], dim=1)
    true = torch.relu(xb @ weight.T)  # (1, 2)
    approx = p.T @ torch.relu(xb @ u.T).T  # (2, 1)
    assert float((true.T - approx).abs()[1]) > 0  # the naive ||w - p u|| = 0 would be wrong
    assert float((true.T - approx).abs()[1]) <= float(err[1]) * float(xb.norm())


def test_degenerate_model_falls_back_with_a_reason():
    block = random_block(5, 3, 2)
    weight = block.weight.clone()
    weight[:, :-1] = 0.0  # constant units: no variance anywhere
    block = Block("fc", weight, block.out, block.consumer_bias, 1.0, "linear", (3,))
    merge = merge_by_shares(
        block, torch.tensor([0, 0, 1, 1, 1]), torch.ones(5, dtype=F64), weight[[0, 2]].clone()
    )
    new, note, _ = reconstruct_merge(block, merge)
    assert new is merge and "no variance" in note


def test_bn_shrink_applies_to_blocks_with_batchnorm_statistics_only():
    block = random_block(8, 4, 3, seed=11)
    merge = _merged(block, 3)
    plain = least_squares_projection(block, merge, Reconstruction(bn_shrink=1.0))[0]
    assert not torch.allclose(
        plain, least_squares_projection(block, merge, Reconstruction(shrink=1.0))[0]
    )  # no BN: bn_shrink is not used
    bn = {
        "weight": torch.ones(8, dtype=F64),
        "bias": torch.zeros(8, dtype=F64),
        "running_var": torch.ones(8, dtype=F64),
        "eps": torch.zeros(8, dtype=F64),
    }
    with_bn = Block("fc", block.weight, block.out, block.consumer_bias, 1.0, "linear", (4,), bn)
    p = least_squares_projection(with_bn, merge, Reconstruction(bn_shrink=1.0))[0]
    share = torch.zeros_like(p)
    share[merge.assignment, torch.arange(8)] = merge.shares
    torch.testing.assert_close(p, share)  # full shrink: the method's own projection


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ridge": -1.0}, "ridge must be"),
        ({"shrink": 1.5}, "shrink must be in"),
        ({"bn_shrink": -0.1}, "bn_shrink must be in"),
        ({"samples": -3}, "samples must be"),
        ({"sigma": float("inf")}, "sigma must be"),
    ],
)
def test_bad_reconstruction_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Reconstruction(**kwargs)


def _bn_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Linear(12, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_compress_with_reconstruction_reports_and_certifies():
    model = _bn_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = tropnnc.compress(model, 0.5, "model-folding", reconstruct="ls")
    assert all(b.reconstructed and b.reconstruct_note is None for b in result.blocks)
    assert all(b.certificate > 0 and b.certificate == b.certificate for b in result.blocks)
    assert result.to_dict()["reconstruction"] == {
        "ridge": 1e-6,
        "shrink": 0.0,
        "sigma": None,
        "samples": 0,
        "bn_shrink": None,
        "inputs": "chained",
    }
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = torch.randn(5, 6)
    assert result.model(x).shape == (5, 3)


def test_compress_reconstruction_argument_errors():
    model = _bn_mlp()
    with pytest.raises(ValueError, match="either repair or reconstruct"):
        tropnnc.compress(model, 0.5, reconstruct="ls", repair="bn")
    with pytest.raises(ValueError, match="reconstruct must be None, 'auto', 'ls'"):
        tropnnc.compress(model, 0.5, reconstruct="lsq")


def test_keep_one_with_reconstruction_is_the_identity():
    model = _bn_mlp(1)
    result = tropnnc.compress(model, 1.0)  # the default pipeline reconstructs the BN block
    assert result.blocks[0].reconstructed  # (a block without BN at full width is left as is)
    x = torch.randn(20, 6)
    torch.testing.assert_close(result.model(x), model(x), atol=1e-5, rtol=1e-5)


def test_block_statistics_read_a_given_input_model():
    torch.manual_seed(0)
    weight = torch.randn(4, 3 + 1, dtype=torch.float64)  # (n, d+1), bias last
    mu = torch.randn(3, dtype=torch.float64)
    root = torch.randn(3, 3, dtype=torch.float64)
    inputs = Gaussian(mu, root @ root.T)
    mean, cov = block_statistics(weight, None, 1.0, None, inputs)
    w, b = weight[:, :3], weight[:, 3]
    assert torch.allclose(mean, w @ mu + b)
    assert torch.allclose(cov, w @ root @ root.T @ w.T)
    # BatchNorm statistics, where the block has them, come first
    bn = {
        "bias": torch.zeros(4),
        "weight": torch.ones(4),
        "running_var": torch.ones(4),
        "eps": 0.0,
    }
    assert torch.equal(block_statistics(weight, bn, 1.0, None, inputs)[0], torch.zeros(4))


def test_reconstruction_returns_the_merged_units_activations_monte_carlo():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 4)).double()
    spec = discover(model)[0][0]
    block = extract(model, spec)
    merge = get_method("tropnnc").merge(block, 4, torch.Generator().manual_seed(0))
    root = torch.randn(5, 5, dtype=torch.float64) / 2
    inputs = Gaussian(torch.randn(5, dtype=torch.float64), root @ root.T)
    _, note, acts = reconstruct_merge(block, merge, Reconstruction(), None, inputs)
    assert note is None
    x = inputs.mean + torch.randn(400_000, 5, dtype=torch.float64) @ root.T
    a = torch.relu(x @ merge.rows[:, :5].T + merge.rows[:, 5])  # (S, k) merged activations
    assert torch.allclose(acts.mean, a.mean(0), atol=3e-3, rtol=1e-2)
    assert torch.allclose(acts.cov, torch.cov(a.T), atol=5e-3, rtol=2e-2)


def test_fc_chains_carry_the_modelled_activations_to_the_next_block():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    ).eval()
    chained = tropnnc.compress(model, 0.5, "tropnnc", reconstruct="ls").model
    local = tropnnc.compress(
        model, 0.5, "tropnnc", reconstruct=Reconstruction(inputs="local")
    ).model
    # the first block has no block before it: the same model either way ...
    assert torch.equal(chained[0].weight, local[0].weight)
    # ... the second reads the first's modelled activations instead of an isotropic input
    assert not torch.allclose(chained[5].weight, local[5].weight)
    with pytest.raises(ValueError, match="reconstruction inputs must be one of chained, local"):
        Reconstruction(inputs="global")


def test_domain_std_is_half_the_input_width_in_the_networks_units():
    assert domain_std() == 0.5  # pixels in [0, 1]
    assert domain_std((-1.0, 3.0)) == 2.0
    assert domain_std((0.0, 1.0), (0.5, 0.25)) == 2.0  # read as (x - 0.5) / 0.25
    per_channel = domain_std((0.0, 1.0), ([0.48, 0.46, 0.41], [0.2, 0.25, 0.5]))
    assert per_channel == pytest.approx((2.5 + 2.0 + 1.0) / 3)
    with pytest.raises(TypeError, match="input_range low end must be a number"):
        domain_std(("a", 1.0))


def test_input_readers_are_the_layers_reading_the_network_input():
    mlp = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    assert input_readers(mlp) == {"2"}
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    assert input_readers(cnn) == {"0"}

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x

    assert input_readers(Untraceable()) == set()


def test_blocks_reading_the_network_input_model_it_from_the_input_domain():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    ).eval()

    def first(result):
        return result.model[1].weight, result.model[3].weight

    auto = tropnnc.compress(model, 0.5, "tropnnc", reconstruct="ls")
    half = tropnnc.compress(model, 0.5, "tropnnc", reconstruct=Reconstruction(sigma=0.5))
    one = tropnnc.compress(model, 0.5, "tropnnc", reconstruct=Reconstruction(sigma=1.0))
    # [0, 1] inputs: the first block's input std is 0.5 (the second reads the first's
    # modelled activations, so it follows); an explicit sigma wins
    for a, b in zip(first(auto), first(half), strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(auto.model[3].weight, one.model[3].weight)
    wide = tropnnc.compress(model, 0.5, "tropnnc", reconstruct="ls", input_range=(-1.0, 1.0))
    for a, b in zip(first(wide), first(one), strict=True):
        assert torch.equal(a, b)  # half-width 1
