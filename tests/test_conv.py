"""Conv blocks: oracles, per-position certificates, BatchNorm, residual networks, counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tropnnc
from tropnnc import zoo
from tropnnc.api import compress_block
from tropnnc.block import certificate
from tropnnc.graph import discover
from tropnnc.methods import get_method
from tropnnc.methods.neuron_merging import unfold_rows
from tropnnc.surgery import extract, fold_batchnorm

CERTIFIED = ["tropnnc", "neural-path-kmeans", "neuron-merging", "l1", "random"]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def set_multiples(conv: nn.Conv2d, k: int, seed: int = 0) -> None:
    """Make every unit (filter, bias) a positive multiple of one of ``k`` random directions."""
    g = seeded(seed)
    n = conv.out_channels
    d = conv.weight[0].numel()
    dirs = torch.randn(k, d + 1, generator=g, dtype=torch.float64)
    rows = dirs[torch.randperm(n, generator=g) % k] * (torch.rand(n, 1, generator=g) * 2 + 0.2)
    with torch.no_grad():
        conv.weight.copy_(rows[:, :-1].view_as(conv.weight))
        conv.bias.copy_(rows[:, -1])


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial eval statistics and affine parameters for every BatchNorm."""
    g = seeded(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                mod.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                if mod.affine:
                    mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    mod.bias.copy_(torch.rand(n, generator=g) - 0.5)


def conv_pool_conv(n: int = 12, stride: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, n, 3, stride=stride, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(n, 5, 3, padding=1),
        )
        .double()
        .eval()
    )


def conv_flatten_linear(n: int = 12) -> nn.Module:
    torch.manual_seed(1)
    return (
        nn.Sequential(
            nn.Conv2d(3, n, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(n * 16, 5)
        )
        .double()
        .eval()
    )


class Functional(nn.Module):
    """conv -> F.relu(inplace) -> F.max_pool2d -> conv -> relu -> adaptive pool (1, 1) ->
    x.view(x.size(0), -1) -> Linear -> relu -> dropout -> Linear."""

    def __init__(self, n: int = 12) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, n, 3, padding=1)
        self.c2 = nn.Conv2d(n, n, 3, padding=1)
        self.fc = nn.Linear(n, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x), inplace=True), 2)
        x = F.adaptive_avg_pool2d(torch.relu(self.c2(x)), (1, 1))
        x = x.view(x.size(0), -1)
        return self.out(F.dropout(F.relu(self.fc(x)), 0.5, self.training))


@pytest.mark.parametrize("build", [conv_pool_conv, conv_flatten_linear])
def test_positive_multiples_collapse_exactly(build):
    model = build()
    set_multiples(model[0], 4)
    x = torch.randn(6, 3, 10, 10, dtype=torch.float64)
    result = tropnnc.compress(model, 4, radius=3.0)
    assert [(b.layer, b.units_after) for b in result.blocks] == [("0", 4)]
    assert result.blocks[0].certificate < 1e-9
    assert result.model[0].out_channels == 4
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-10, atol=1e-10)


def test_positive_multiples_collapse_through_functional_ops():
    torch.manual_seed(0)
    model = Functional().double().eval()
    set_multiples(model.c1, 3, seed=1)
    set_multiples(model.c2, 5, seed=2)
    result = tropnnc.compress(
        model,
        {"c1": 3, "c2": 5},  # the shape for the input domain
        example_inputs=torch.zeros(1, 3, 8, 8, dtype=torch.float64),
    )
    assert [b.layer for b in result.blocks] == ["c1", "c2"]
    assert all(b.certificate < 1e-9 for b in result.blocks)
    assert result.model.fc.in_features == 5 and result.model.c2.in_channels == 3
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("build", [conv_pool_conv, conv_flatten_linear, Functional])
def test_keep_one_is_identity(build):
    model = build().double().eval()
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    result = tropnnc.compress(model, 1.0)
    assert all(b.units_before == b.units_after for b in result.blocks)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-12, atol=1e-12)


def max_patch_norm(x: torch.Tensor, conv: nn.Conv2d) -> float:
    """The largest norm of a producer input patch, with the producer's own geometry."""
    patches = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return float(patches.norm(dim=1).max())


@pytest.mark.parametrize("method", CERTIFIED)
@pytest.mark.parametrize(
    "build,stride", [(conv_pool_conv, 1), (conv_pool_conv, 2), (conv_flatten_linear, 1)]
)
def test_certificate_bounds_measured_error_per_position(method, build, stride):
    model = build() if build is conv_flatten_linear else build(stride=stride)
    size = 10 if build is conv_flatten_linear else 12
    for seed in range(2):
        g = seeded(seed)
        x = torch.randn(16, 3, size, size, generator=g, dtype=torch.float64) * (seed + 0.5)
        radius = max_patch_norm(x, model[0])
        result = tropnnc.compress(model, 0.5, method, radius=radius, seed=seed)
        report = result.blocks[0]
        diff = (model(x) - result.model(x)).abs()
        err = diff.max().item()  # over outputs and positions
        assert report.radius == radius and report.units_after == 6
        assert 0 < err <= report.certificate * (1 + 1e-9), (method, err, report.certificate)
        # each output's bound holds at every position, so their sum bounds the error summed
        # over the outputs (dim 1: the consumer's channels or features) at any one position
        err_sum = diff.sum(1).max().item()
        assert err_sum <= report.certificate_sum * (1 + 1e-9), (method, err_sum)


def test_batchnorm_folding_preserves_forward():
    g = seeded(3)
    for producer, bn, x in [
        (nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), torch.randn(4, 3, 6, 6, generator=g)),
        (nn.Linear(7, 9), nn.BatchNorm1d(9), torch.randn(5, 7, generator=g)),
        (
            nn.Conv2d(3, 8, 3, bias=False),
            nn.BatchNorm2d(8, affine=False),
            torch.randn(4, 3, 6, 6, generator=g),
        ),
    ]:
        model = nn.Sequential(producer, bn).eval()
        randomize_bn(model)
        w = producer.weight.detach().double()
        b = (
            torch.zeros(w.shape[0], dtype=torch.float64)
            if producer.bias is None
            else producer.bias.detach().double()
        )
        fw, fb = fold_batchnorm(w, b, bn)
        assert fw.shape == w.shape and fb.shape == b.shape
        folded = (F.conv2d if isinstance(producer, nn.Conv2d) else F.linear)(
            x.double(),
            fw,
            fb,
            **({"padding": producer.padding} if isinstance(producer, nn.Conv2d) else {}),
        )
        y = model(x).double()
        assert (folded - y).abs().max() <= 1e-5 * y.abs().max()


@pytest.mark.parametrize(
    "name,config", [("vgg16-cifar", {"width": 0.125, "hidden": 16}), ("vgg-small", {"hidden": 32})]
)
def test_folded_network_keeps_forward_and_has_no_batchnorm(name, config):
    torch.manual_seed(0)
    model = zoo.build(name, **config).eval()
    randomize_bn(model)
    x = torch.rand(3, *model.input_shape)
    result = tropnnc.compress(model, 1.0)
    y, y1 = model(x), result.model(x)
    assert (y1 - y).abs().max() <= 1e-5 * y.abs().max()
    assert not any(
        isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in result.model.modules()
    )  # every BN followed a compressed producer
    specs, _ = discover(model)
    assert all(
        isinstance(result.model.get_submodule(s.bn), nn.Identity) for s in specs if s.bn is not None
    )
    if name == "vgg16-cifar":  # BatchNorm1d after the hidden Linear layers folds too
        assert (
            sum(isinstance(model.get_submodule(s.bn), nn.BatchNorm1d) for s in specs if s.bn) == 2
        )


def bn_block_model(bias: bool) -> nn.Module:
    """conv (3 -> 8 channels) -> BN -> ReLU -> conv, where units 3..7 are scaled copies.

    Raw filters: units 0, 1 random; unit 2 = 1.5 * unit 0 (same direction as 0, other BN).
    Pruned units 3, 4, 5 = s * (unit 2, 1, 2) with BN set so that BN_n(s z) = S BN_m(z)
    exactly (c = 0) for m = 2, 1, 2 but not for m = 0: an exact merge exists only when the
    BN term picks the right one of the two cosine-1 candidates. Units 6 and 7 copy 0 and 1
    with c = 0 too.
    """
    torch.manual_seed(5)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=bias),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 4, 3, padding=1),
        )
        .double()
        .eval()
    )
    randomize_bn(model, seed=7)
    conv, bn = model[0], model[1]
    plan = {3: (2, 0.5), 4: (1, 0.3), 5: (2, 0.2), 6: (0, 0.4), 7: (1, 0.6)}  # n: (m, s)
    with torch.no_grad():
        conv.weight[2] = 1.5 * conv.weight[0]
        if bias:
            conv.bias[2] = 0.7
        for n, (m, s) in plan.items():
            conv.weight[n] = s * conv.weight[m]
            b_n = float(conv.bias[n]) if bias else 0.0
            b_m = float(conv.bias[m]) if bias else 0.0
            sig = (bn.running_var + bn.eps).sqrt()
            mu_m = bn.running_mean[m] - b_m  # BN(a x + b) = BN'(a x) with mean mu - b
            mu_n = (
                s * (mu_m - sig[m] * bn.bias[m] / bn.weight[m]) + bn.bias[n] * sig[n] / bn.weight[n]
            )
            bn.running_mean[n] = mu_n + b_n
    return model


@pytest.mark.parametrize("bias", [False, True])
def test_bn_aware_neuron_merging_is_exact_on_scaled_copies(bias):
    model = bn_block_model(bias)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    result = tropnnc.compress(
        model, 3, "neuron-merging", bn_aware=True, threshold=0.5, example_inputs=x[:1]
    )
    report = result.blocks[0]
    assert report.assignment == [0, 1, 2, 2, 1, 2, 0, 1]  # 3 and 5 go to 2, not to 0
    assert report.certificate < 1e-9
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-9, atol=1e-9)
    assert result.options["bn_aware"] is True and result.options["bn_lambda"] == 0.85


def test_bn_aware_score_lambda_and_positive_scale():
    block = extract(bn_block_model(False), discover(bn_block_model(False))[0][0])
    raw = block.bn["raw"]
    torch.testing.assert_close(unfold_rows(block.weight, block.bn), raw)
    gen = seeded(0)
    merge = compress_block(
        get_method("neuron-merging", bn_aware=True, bn_lambda=0.0), block, 3, gen
    )
    assert merge.assignment[3] == 2 and float(certificate(block, merge).max()) < 1e-9
    # a negative gamma on the right partner makes S < 0: never merged into it
    bn = dict(block.bn)
    bn["weight"] = bn["weight"].clone()
    bn["weight"][2] *= -1
    flipped = type(block)(
        block.name,
        block.weight,
        block.out,
        block.consumer_bias,
        block.radius,
        block.kind,
        block.unit_shape,
        bn,
    )
    merge = compress_block(get_method("neuron-merging", bn_aware=True), flipped, 3, gen)
    assert merge.assignment[3] != 2 and merge.assignment[5] != 2
    assert bool((merge.shares >= 0).all())
    # without BN on the block the option changes nothing
    plain = type(block)(block.name, block.weight, block.out, block.consumer_bias)
    a = compress_block(get_method("neuron-merging", bn_aware=True), plain, 3, gen)
    b = compress_block(get_method("neuron-merging"), plain, 3, gen)
    assert torch.equal(a.out, b.out) and torch.equal(a.assignment, b.assignment)
    with pytest.raises(ValueError, match="bn_lambda must be in"):
        get_method("neuron-merging", bn_lambda=1.5)  # checked when the method is made


def stream_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Output shapes of the residual stream: the stem and every residual block."""
    shapes: dict[str, tuple[int, ...]] = {}
    names = ["maxpool"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda mod, args, out, n=n: shapes.__setitem__(n, tuple(out.shape))
        )
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


def test_resnet18_compresses_branches_and_the_residual_stream():
    torch.manual_seed(0)
    model = zoo.build("resnet18", width=8, input_size=32, num_classes=10).eval()
    randomize_bn(model)
    x = torch.rand(2, 3, 32, 32)
    same = tropnnc.compress(model, 1.0)
    torch.testing.assert_close(same.model(x), model(x), rtol=1e-5, atol=1e-5)
    result = tropnnc.compress(model, 0.5)
    inner = [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    streams = ["conv1"] + [f"layer{i}.0.downsample.0" for i in range(2, 5)]
    assert [b.layer for b in result.blocks] == [
        streams[0],
        *inner[:2],
        streams[1],
        *inner[2:4],
        streams[2],
        *inner[4:6],
        streams[3],
        *inner[6:],
    ]
    for name in inner:
        block = result.model.get_submodule(name.rsplit(".", 1)[0])
        planes = model.get_submodule(name).out_channels
        assert block.conv1.out_channels == planes // 2 == block.conv2.in_channels
        assert (
            block.conv2.out_channels
            == planes // 2
            == block.conv1.in_channels * (2 if block.downsample is not None else 1)
        )
        assert isinstance(block.bn1, nn.Identity) and isinstance(block.bn2, nn.Identity)
    assert result.model.fc.in_features == 32 and result.model.conv1.out_channels == 4
    assert [s.layer for s in result.skipped] == ["fc"]
    assert "output layer" in result.skipped[0].reason
    assert result.model(x).shape == (2, 10)
    assert all(math.isfinite(b.certificate) for b in result.blocks)


def test_e2_cnn_counts_by_hand():
    torch.manual_seed(0)
    model = zoo.build("e2-cnn", channels=16, hidden=500).eval()
    result = tropnnc.compress(model, {"features.0": 8, "features.3": 8})
    # conv1 1->8 (5x5) on 28x28 -> 24x24, pool 3 -> 8x8; conv2 8->8 (5x5) -> 4x4, pool 3 ->
    # 1x1; FC 8 -> 500 -> 10
    params = (8 * 25 + 8) + (8 * 8 * 25 + 8) + (8 * 500 + 500) + (500 * 10 + 10)
    macs = 24 * 24 * 8 * 25 + 4 * 4 * 8 * 8 * 25 + 8 * 500 + 500 * 10
    assert result.params_after == params == sum(p.numel() for p in result.model.parameters())
    assert result.macs_after == macs
    assert result.params_before == (16 * 25 + 16) + (16 * 16 * 25 + 16) + (16 * 500 + 500) + (
        500 * 10 + 10
    )
    assert result.macs_before == 24 * 24 * 16 * 25 + 16 * 16 * 16 * 25 + 16 * 500 + 5000
    assert flop_macs(result.model, model.input_shape) == macs


def flop_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros((1,) + tuple(shape)))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize(
    "name,config",
    [
        ("resnet18", {"width": 8, "input_size": 32}),
        ("resnet20", {"width": 4, "in_channels": 1, "input_size": 28, "shortcut": "conv"}),
        ("alexnet-cifar", {"hidden": (64, 32)}),
        ("vgg16-cifar", {"width": 0.125, "hidden": 16}),
    ],
)
def test_macs_agree_with_flop_counter(name, config):
    torch.manual_seed(0)
    model = zoo.build(name, **config).eval()
    result = tropnnc.compress(model, 0.5, "l1")
    assert result.macs_before == flop_macs(model, model.input_shape)
    assert result.macs_after == flop_macs(result.model, model.input_shape)
    assert result.macs_after < result.macs_before
    assert result.params_after == sum(p.numel() for p in result.model.parameters())
