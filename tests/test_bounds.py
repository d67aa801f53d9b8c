"""Input bounds derived from the input domain: hand-computed cases, coverage of sampled
inputs, the compressed-so-far network, and certificates that hold on in-domain inputs."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tropnnc
from tropnnc.bounds import BoundsError, IntervalBounds, block_radii, input_domain, norm_bound
from tropnnc.graph import discover, norm_readers

F64 = torch.float64


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hand_mlp() -> nn.Module:
    """2 -> 3 -> 2 -> 1 with the weights of the hand computation below."""
    model = (
        nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
        .double()
        .eval()
    )
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.5], [-1.0, -1.0]]))
        model[0].bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    return model


def test_linear_hand_computed():
    # x in [0, 1]^2: ||x|| <= sqrt(2). Pre-activations: x1 - 2 x2 + 0.5 in [-1.5, 1.5],
    # (x1 + x2) / 2 - 1 in [-1, 0], 2 - x1 - x2 in [0, 2]; after ReLU [0, 1.5], 0, [0, 2],
    # so the second layer's input has norm <= sqrt(1.5^2 + 2^2) = 2.5.
    model = hand_mlp()
    bounds = IntervalBounds(model, input_domain((2,)))
    assert bounds.radius("0") == pytest.approx(math.sqrt(2), rel=1e-15)
    assert bounds.radius("2") == pytest.approx(2.5, rel=1e-15)
    box = bounds.at_input("2")
    torch.testing.assert_close(box.lo, torch.zeros(1, 3, dtype=F64))
    torch.testing.assert_close(box.hi, torch.tensor([[1.5, 0.0, 2.0]], dtype=F64))
    # normalised: x in [(0 - 0.5) / 0.5, (1 - 0.5) / 0.5] = [-1, 1]: ranges [-2.5, 3.5],
    # [-2, 0], [0, 4] -> sqrt(3.5^2 + 4^2)
    result = tropnnc.compress(model, 1.0, input_stats=(0.5, 0.5))
    assert [b.radius for b in result.blocks] == pytest.approx(
        [math.sqrt(2), math.sqrt(28.25)], rel=1e-15
    )
    assert result.input_domain == {"range": [0.0, 1.0], "stats": {"mean": 0.5, "std": 0.5}}
    result = tropnnc.compress(model, 1.0)  # the default domain: [0, 1]
    assert [b.radius for b in result.blocks] == pytest.approx([math.sqrt(2), 2.5], rel=1e-15)
    assert result.input_domain == {"range": [0.0, 1.0], "stats": None}
    result = tropnnc.compress(model, 1.0, input_range=(-3.0, 1.0))  # per element [-3, 1]
    assert result.blocks[0].radius == pytest.approx(math.sqrt(18), rel=1e-15)
    result = tropnnc.compress(model, 1.0, radius=4.0)
    assert [b.radius for b in result.blocks] == [4.0, 4.0] and result.input_domain is None


def test_conv_patches_with_padding_and_stride_hand_computed():
    # 3x3 input, padding 1, stride 2: the four patches start at -1 and 1, so each holds
    # 2 x 2 real pixels and zeros: in [0, 1] the patch norm is at most sqrt(4) = 2
    conv = nn.Conv2d(1, 2, 3, stride=2, padding=1).double()
    box = input_domain((1, 3, 3))
    assert norm_bound(conv, box) == pytest.approx(2.0, rel=1e-15)
    conv.stride = (1, 1)  # now the centre patch holds all 9 pixels
    assert norm_bound(conv, box) == pytest.approx(3.0, rel=1e-15)
    conv = nn.Conv2d(1, 2, 3, stride=2, padding=1, padding_mode="circular").double()
    assert norm_bound(conv, box) == pytest.approx(3.0, rel=1e-15)  # patches wrap around
    # one pixel of range [-4, 2] at (0, 0): only the patch at (-1, -1) holds it
    lo = torch.zeros(1, 3, 3, dtype=F64)
    lo[0, 0, 0] = -4.0
    hi = torch.full((1, 3, 3), 1.0, dtype=F64)
    hi[0, 0, 0] = 2.0
    conv = nn.Conv2d(1, 2, 3, stride=2, padding=1).double()
    assert norm_bound(conv, input_domain((1, 3, 3), (lo, hi))) == pytest.approx(
        math.sqrt(16 + 3), rel=1e-15
    )
    # per-channel stats: channel c in [(0 - m_c) / s_c, (1 - m_c) / s_c]; a 2x2 patch
    conv = nn.Conv2d(3, 4, 2).double()
    mean, std = [0.5, 0.25, 0.0], [0.5, 0.25, 2.0]
    mag = [1.0, 3.0, 0.5]  # max(|lo_c|, |hi_c|)
    box = input_domain((3, 5, 5), None, (mean, std))
    assert norm_bound(conv, box) == pytest.approx(math.sqrt(4 * sum(v * v for v in mag)), rel=1e-15)
    with pytest.raises(TypeError, match="not a Linear or convolution"):
        norm_bound(nn.ReLU(), box)


class Branchy(nn.Module):
    """conv -> BN -> ReLU -> maxpool, a residual conv branch, a concatenation, avg pool,
    sigmoid/leaky gates, flatten and Linear layers: every rule of the interval pass."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect")
        self.c3 = nn.Conv2d(12, 8, 3, stride=2, padding=1)
        self.c4 = nn.Conv2d(8, 5, 2)
        self.fc1 = nn.Linear(5 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 7)
        self.fc3 = nn.Linear(7, 3)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.bn1(self.c1(x))), 2)  # (6, 5, 5)
        r = h + 0.5 * F.leaky_relu(self.c2(h), 0.1) - 0.25
        h = torch.cat([r, torch.sigmoid(h) * 2.0], dim=1)  # (12, 5, 5)
        h = F.avg_pool2d(F.relu(self.c3(h)), 1)  # (8, 3, 3)
        h = torch.relu(self.c4(h))  # (5, 2, 2)
        h = torch.relu(self.fc1(h.view(h.size(0), -1)))
        h = F.dropout(torch.tanh(self.fc2(h)), 0.3, self.training)
        return self.fc3(h)


def branchy(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = Branchy().double()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.3, 2.0)
        model.bn1.weight.uniform_(-1.5, 1.5)  # negative scales too
        model.bn1.bias.uniform_(-0.5, 0.5)
    return model.eval()


def domain_samples(lo: torch.Tensor, hi: torch.Tensor, q: int, seed: int) -> torch.Tensor:
    """q inputs of the box: a third at random corners (the first at the corner of largest
    norm), a third near corners, a third uniform."""
    g = seeded(seed)
    shape = (q,) + tuple(lo.shape[1:])
    u = torch.rand(shape, generator=g, dtype=F64)
    third = q // 3
    u[:third] = (u[:third] > 0.5).to(F64)
    u[0] = (hi.abs() >= lo.abs()).to(F64)[0]
    u[third : 2 * third] = u[third : 2 * third].round() * 0.8 + u[third : 2 * third] * 0.2
    return lo + (hi - lo) * u


def capture_inputs(model: nn.Module, layers: list[str], x: torch.Tensor) -> dict:
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, name=name: seen.__setitem__(name, args[0])
        )
        for name in layers
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def largest_input_norm(module: nn.Module, x: torch.Tensor) -> float:
    """The largest norm of one input of ``module`` (patches unfolded independently of
    :func:`norm_bound`)."""
    if isinstance(module, nn.Linear):
        return float(x.norm(dim=-1).max())
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    else:
        padding = module.padding
    patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
    return float(patches.norm(dim=1).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "domain", [((0.0, 1.0), None), ((-1.0, 1.0), None), ((0.0, 1.0), ([0.4, 0.6], [0.2, 0.3]))]
)
def test_derived_bounds_cover_sampled_inputs(seed, domain):
    model = branchy(seed)
    layers = ["c1", "c2", "c3", "c4", "fc1", "fc2", "fc3"]
    box = input_domain((2, 10, 10), *domain)
    bounds = IntervalBounds(model, box)
    x = domain_samples(box.lo, box.hi, 600, seed)
    seen = capture_inputs(model, layers, x)
    for name in layers:
        inner = bounds.at_input(name)
        act = seen[name]
        assert bool((act >= inner.lo - 1e-12).all() & (act <= inner.hi + 1e-12).all()), name
        measured = largest_input_norm(model.get_submodule(name), act)
        radius = bounds.radius(name)
        assert measured <= radius * (1 + 1e-12), (name, measured, radius)
    # the first layer's box is the domain itself: the corners reach its bound exactly
    assert largest_input_norm(model.c1, seen["c1"]) == pytest.approx(bounds.radius("c1"), rel=1e-12)


def test_bounds_follow_replaced_modules():
    model = hand_mlp()
    bounds = IntervalBounds(model, input_domain((2,)))
    assert bounds.radius("2") == pytest.approx(2.5)
    first = model[0]
    wider = nn.Linear(2, 3).double()
    with torch.no_grad():
        wider.weight.copy_(first.weight * 2)
        wider.bias.copy_(first.bias * 2)
    model[0] = wider  # as compress replaces layers: every value after it is recomputed
    assert bounds.radius("2") == pytest.approx(5.0)
    assert bounds.radius("0") == pytest.approx(math.sqrt(2))


def conv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 12, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(12, 10, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(10 * 4 * 4, 24),
        nn.ReLU(),
        nn.Linear(24, 3),
    )
    model.input_shape = (1, 8, 8)
    return model.double().eval()


BLOCKS = [(0, 3), (3, 6), (6, 8)]  # (producer, consumer) indices of conv_net's blocks


@pytest.mark.parametrize("method", ["tropnnc", "neural-path-kmeans", "l1"])
def test_certificate_with_derived_radius_holds_on_in_domain_inputs(method):
    model = conv_net()
    widths = {"0": 5, "3": 4, "6": 9}
    box = input_domain((1, 8, 8))
    x = domain_samples(box.lo, box.hi, 900, seed=3)
    names = [str(p) for p, _ in BLOCKS]
    for i, (p, c) in enumerate(BLOCKS):
        # the network as compress sees it just before block i, and just after it
        before = (
            tropnnc.compress(model, {n: widths[n] for n in names[:i]}, method, seed=1).model
            if i
            else model
        )
        result = tropnnc.compress(model, {n: widths[n] for n in names[: i + 1]}, method, seed=1)
        after, report = result.model, result.blocks[i]
        assert report.radius == pytest.approx(
            IntervalBounds(before, box).radius(names[i]), rel=1e-12
        )
        with torch.no_grad():
            inner = after[:p](x)  # block i's inputs in the compressed network
            err = (before[p : c + 1](inner) - after[p : c + 1](inner)).abs().max().item()
        assert largest_input_norm(after[p], inner) <= report.radius
        assert 0 < err <= report.certificate * (1 + 1e-9), (method, i, err, report)
        assert math.isfinite(report.certificate)


def test_radius_nan_with_a_warning_where_the_domain_does_not_reach(caplog):
    torch.manual_seed(0)
    # a LayerNorm in front: no interval rule; a conv first layer without input_shape
    model = (
        nn.Sequential(
            nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)
        )
        .double()
        .eval()
    )
    assert [s.producer for s in discover(model)[0]] == ["3"]
    with caplog.at_level(logging.WARNING, logger="tropnnc.bounds"):
        result = tropnnc.compress(model, 0.6)
    assert math.isnan(result.blocks[0].radius) and math.isnan(result.blocks[0].certificate)
    assert "no interval rule for 1 (LayerNorm)" in caplog.text
    assert tropnnc.compress(model, 0.6, radius=2.0).blocks[0].certificate > 0
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).double().eval()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tropnnc.bounds"):
        result = tropnnc.compress(conv, 0.5)
    assert math.isnan(result.blocks[0].radius)
    assert "input shape is unknown (pass example_inputs=" in caplog.text
    result = tropnnc.compress(conv, 0.5, example_inputs=torch.zeros(1, 1, 6, 6))
    assert result.blocks[0].radius == pytest.approx(3.0)
    with pytest.raises(BoundsError, match=r"no interval rule for 1 \(LayerNorm\)"):
        IntervalBounds(model, input_domain((4,))).radius("3")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"radius": 1.0, "input_range": (0, 1)}, ValueError, "either radius .* or input_range"),
        ({"radius": 2.0, "input_stats": (0, 1)}, ValueError, "either radius"),
        ({"radius": 0.0}, ValueError, "radius must be a positive number, got 0.0"),
        ({"radius": True}, ValueError, "radius must be a positive number, got True"),
        ({"input_range": (1.0, 0.0)}, ValueError, "the low end must not exceed the high end"),
        ({"input_stats": (0.5, 0.0)}, ValueError, "every std must be positive"),
        (
            {"input_stats": ([0.1, 0.2, 0.3], 1.0)},
            ValueError,
            r"input_stats mean of shape \(3,\) does not fit inputs of shape \(1, 8, 8\)",
        ),
        ({"input_range": ("a", 1.0)}, TypeError, "input_range low end must be a number"),
        ({"input_range": (0.0, math.inf)}, ValueError, "the input domain must be finite"),
    ],
)
def test_bad_domains(kwargs, error, match):
    with pytest.raises(error, match=match):
        tropnnc.compress(conv_net(), 0.5, **kwargs)


def test_cli_input_domain_flags_and_manifest(tmp_path, capsys):
    import json

    from safetensors.torch import save_file

    from tropnnc import io, zoo
    from tropnnc.cli import main

    torch.manual_seed(0)
    model = zoo.build("lenet-300-100").eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    weights = str(tmp_path / "w.safetensors")

    def run(*argv):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, stdout, err = run(
        "compress", "lenet-300-100", "--weights", weights, "-o", tmp_path / "a", "--keep", "0.5"
    )
    assert code == 0, err
    plan = json.loads((tmp_path / "a" / "manifest.json").read_text())["compression"]
    assert plan["input_domain"] == {"range": [0.0, 1.0], "stats": None}
    bounds = IntervalBounds(model, input_domain((1, 28, 28)))
    assert plan["blocks"][0]["radius"] == pytest.approx(28.0)
    assert plan["blocks"][0]["radius"] == pytest.approx(bounds.radius("1"))
    assert "radius" in stdout.splitlines()[0] and "28" in stdout.splitlines()[1]
    code, _, err = run(
        "compress",
        "lenet-300-100",
        "--weights",
        weights,
        "-o",
        tmp_path / "b",
        "--keep",
        "0.5",
        "--input-range=-1,1",
        "--input-mean",
        "0.2",
        "--input-std",
        "0.5",
    )
    assert code == 0, err
    plan = json.loads((tmp_path / "b" / "manifest.json").read_text())["compression"]
    assert plan["input_domain"] == {"range": [-1.0, 1.0], "stats": {"mean": [0.2], "std": [0.5]}}
    assert (plan["input_range"], plan["input_mean"], plan["input_std"]) == (
        [-1.0, 1.0],
        [0.2],
        [0.5],
    )
    assert plan["blocks"][0]["radius"] == pytest.approx(28 * 2.4)  # max |(+-1 - 0.2) / 0.5|
    assert io.load(tmp_path / "b")[1].out_features == 150
    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "model": "lenet-300-100",
                "weights": weights,
                "out": str(tmp_path / "c"),
                "input_range": [0, 255],
            }
        )
    )
    code, _, err = run("compress", "--config", tmp_path / "c.json")
    assert code == 0, err
    plan = json.loads((tmp_path / "c" / "manifest.json").read_text())["compression"]
    assert plan["blocks"][0]["radius"] == pytest.approx(28 * 255)
    code, _, err = run(
        "compress", "lenet-300-100", "--weights", weights, "-o", tmp_path / "d", "--radius", "3"
    )
    assert code == 0, err
    plan = json.loads((tmp_path / "d" / "manifest.json").read_text())["compression"]
    assert plan["input_domain"] is None and plan["blocks"][0]["radius"] == 3.0
    for argv, message in [
        (["--radius", "2", "--input-range", "0,1"], "either radius or input_range"),
        (["--input-mean", "0.5"], "input_mean and input_std go together"),
        (["--input-range", "1,0"], "expected LOW,HIGH with LOW <= HIGH, got '1,0'"),
        (
            ["--input-std", "0.5,x", "--input-mean", "0"],
            "expected numbers separated by commas, got '0.5,x'",
        ),
    ]:
        code, _, err = run(
            "compress", "lenet-300-100", "--weights", weights, "-o", tmp_path / "e", *argv
        )
        assert code == 2 and message in err, (argv, err)
    (tmp_path / "bad.json").write_text(json.dumps({"input_range": [0, "x"]}))
    code, _, err = run("compress", "--config", tmp_path / "bad.json")
    assert code == 2 and "input_range: expected numbers separated by commas" in err


def test_layers_reading_a_layernorm_get_its_bound():
    """A Linear reading a LayerNorm (module or a subclass traced into F.layer_norm) or an
    RMSNorm is bounded by max|gamma| sqrt(E) + ||beta|| whatever the network input; every
    output of the norm stays inside it."""

    class TracedThrough(nn.LayerNorm):  # like timm's LayerNorm: forward calls F.layer_norm
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    norms = [nn.LayerNorm(12), TracedThrough(12)]
    if hasattr(nn, "RMSNorm"):
        norms.append(nn.RMSNorm(12))
    for norm in norms:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 12), norm, nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 2))
        with torch.no_grad():
            norm.weight.uniform_(-2, 2)
            if getattr(norm, "bias", None) is not None:
                norm.bias.normal_()
        assert norm_readers(model) == {"2": "1"}, type(norm).__name__
        bound = block_radii(model, None)("2")  # no input shape needed
        beta = float(norm.bias.detach().norm()) if getattr(norm, "bias", None) is not None else 0.0
        assert bound == pytest.approx(float(norm.weight.detach().abs().max()) * 12**0.5 + beta)
        x = torch.randn(4096, 5) * torch.logspace(-3, 3, 4096)[:, None]
        with torch.no_grad():
            assert float(norm(model[0](x)).norm(dim=1).max()) <= bound
