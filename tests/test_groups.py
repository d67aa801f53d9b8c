"""Channel groups (residual streams, concatenations, depthwise chains) and other activations:
exact collapses, identities, certificates measured, and the architecture zoo."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tropnnc
from tropnnc import zoo
from tropnnc.block import SMOOTH, Block, Merge, certificate, rescale_units
from tropnnc.graph import GroupSpec, discover
from tropnnc.methods import get_method
from tropnnc.methods.adaptive import has_batchnorm
from tropnnc.surgery import extract

CERTIFIED = ["tropnnc", "neural-path-kmeans", "neuron-merging", "l1", "random"]


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                mod.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(n, generator=g) - 0.5)


def duplicate(model: nn.Module, layers: list[tuple[str, str | None]], pairs) -> None:
    """Make channel j a copy of channel i in every named layer (and its BatchNorm)."""
    with torch.no_grad():
        for layer, bn in layers:
            tensors = [model.get_submodule(layer).weight]
            if model.get_submodule(layer).bias is not None:
                tensors.append(model.get_submodule(layer).bias)
            if bn is not None:
                b = model.get_submodule(bn)
                tensors += [b.weight, b.bias, b.running_mean, b.running_var]
            for t in tensors:
                for i, j in pairs:
                    t[j] = t[i]


class SumOfTwo(nn.Module):
    """relu(a(x) + b(x)) read by c: one addition, both producers read the input."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(5, 12).double()
        self.b = nn.Linear(5, 12).double()
        self.c = nn.Linear(12, 3).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, x):
        return self.c(F.relu(self.a(x) + self.b(x)))


def ball(q: int, d: int, radius: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(q, d, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * radius
    x[q // 2 :] *= torch.rand(q - q // 2, 1, generator=g, dtype=torch.float64)
    return x


@pytest.mark.parametrize("method", CERTIFIED)
def test_sum_group_certificate_bounds_the_error(method):
    """With every producer's input in the ball, the group certificate (on the concatenated
    rows, radius sqrt(P (r^2 + 1) - 1)) bounds the consumer's error."""
    model = SumOfTwo()
    specs, _ = discover(model)
    assert len(specs) == 1 and isinstance(specs[0], GroupSpec)
    assert [p.layer for p in specs[0].producers] == ["a", "b"]
    x = ball(400, 5, 2.0)
    result = tropnnc.compress(model, 0.5, method, radius=2.0)
    report = result.blocks[0]
    assert (report.units_before, report.units_after) == (12, 6)
    assert result.model.a.out_features == result.model.b.out_features == 6
    err = (model(x) - result.model(x)).abs().max().item()
    assert 0 < err <= report.certificate * (1 + 1e-9)


def activation_net(act: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 16), act, nn.Linear(16, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 2)
    return model


@pytest.mark.parametrize("act", [nn.ReLU6(), nn.LeakyReLU(0.2), nn.LeakyReLU(-1.5)])
@pytest.mark.parametrize("method", ["tropnnc", "l1", "neuron-merging"])
def test_piecewise_linear_activation_certificates(act, method):
    model = activation_net(act)
    x = ball(400, 4, 3.0)
    result = tropnnc.compress(model, 0.5, method, radius=3.0)
    report = result.blocks[0]
    err = (model(x) - result.model(x)).abs().max().item()
    assert 0 < err <= report.certificate * (1 + 1e-9)


SMOOTH_ACTS = [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish()]


@pytest.mark.parametrize("act", SMOOTH_ACTS)
@pytest.mark.parametrize("method", [None, "tropnnc", "model-folding", "l1"])
def test_smooth_activation_certificates(act, method):
    """GELU, SiLU and hard-swish blocks are certified (s = relu - r, 0 <= r <= R): the
    error never exceeds the certificate, for share merges and the default's projection."""
    model = activation_net(act)
    x = ball(4000, 4, 3.0)
    result = tropnnc.compress(model, 0.5, method, radius=3.0)
    report = result.blocks[0]
    assert result.model[0].out_features == 8
    err = (model(x) - result.model(x)).abs().max().item()
    assert 0 < err <= report.certificate < math.inf
    assert tropnnc.compress(model, 1.0, method, radius=3.0).blocks[0].certificate == 0


def test_smooth_constants_bound_the_activations():
    """The Lipschitz constant and the gap R to ReLU of every smooth activation the
    certificate covers, checked on a fine grid."""
    z = torch.linspace(-30, 30, 600_001, dtype=torch.float64, requires_grad=True)
    functions = {
        "gelu": [F.gelu, lambda t: F.gelu(t, approximate="tanh")],
        "silu": [F.silu],
        "hardswish": [F.hardswish],
    }
    for name, fns in functions.items():
        lip, gap = SMOOTH[name]
        for fn in fns:
            y = fn(z)
            (slope,) = torch.autograd.grad(y.sum(), z)
            r = (F.relu(z) - y).detach()
            tol = 1e-12  # float rounding of the exact hard-swish values
            assert slope.abs().max() <= lip + tol and r.max() <= gap + tol, name
            assert r.min() >= -tol, name
            assert slope.abs().max() > lip - 1e-3 and r.max() > gap - 1e-3, name  # tight


def test_relu6_clipping_term_and_rescale():
    """A unit copied at share 2 errs by 6 at z >= 6: the clipping term 6 |1 - lambda|."""
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    out = torch.tensor([[[1.0]], [[0.0]]], dtype=torch.float64)
    block = Block("fc", w, out, None, 10.0, activation="relu6")
    half = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    merge = Merge(
        half,
        torch.tensor([[[2.0]]], dtype=torch.float64),
        torch.tensor([0, -1]),
        torch.tensor([2.0, 0.0], dtype=torch.float64),
    )
    assert float(certificate(block, merge)[0]) == pytest.approx(6.0)  # 0 row error + 6
    scaled = rescale_units(merge)  # the unit takes its member's scale: exact, bound 0
    torch.testing.assert_close(scaled.rows, w[:1])
    torch.testing.assert_close(scaled.out, out[:1])
    assert float(certificate(block, scaled)[0]) == 0.0
    # GELU: no row error, its gap to ReLU at share 2: R max(1, 2); a gated group: none
    gelu = certificate(Block("fc", w, out, activation="gelu"), merge)[0]
    assert float(gelu) == pytest.approx(2 * SMOOTH["gelu"][1])
    assert math.isnan(float(certificate(Block("fc", w, out, activation="silu+gated"), merge)[0]))


def resnet18_small() -> nn.Module:
    torch.manual_seed(0)
    model = zoo.build("resnet18", width=8, input_size=32, num_classes=10).eval()
    randomize_bn(model)
    return model.double()


def test_residual_group_duplicates_collapse_exactly():
    model = resnet18_small()
    specs, _ = discover(model)
    groups = [s for s in specs if isinstance(s, GroupSpec)]
    assert [g.producer for g in groups] == ["conv1"] + [
        f"layer{i}.0.downsample.0" for i in (2, 3, 4)
    ]
    keep = {}
    for g in groups:  # every producer of the stream (stem, branches, projection) duplicates
        duplicate(model, [(p.layer, p.bn) for p in g.producers], [(0, 1), (2, 3)])
        keep[g.producer] = model.get_submodule(g.producer).out_channels - 2
    result = tropnnc.compress(model, keep, "tropnnc", radius=1.0)  # float residue x radius
    assert all(b.certificate < 1e-9 for b in result.blocks)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-10, atol=1e-10)
    assert result.model.layer4[1].conv2.out_channels == 62 == result.model.fc.in_features
    assert result.model.layer2[0].downsample[0].in_channels == 6


def test_concatenation_duplicates_collapse_exactly():
    torch.manual_seed(0)
    model = zoo.build("densenet-mini", growth=6).eval()
    randomize_bn(model)
    model = model.double()
    specs, _ = discover(model)
    groups = {s.producer: s for s in specs if isinstance(s, GroupSpec)}
    assert list(groups) == ["stem.0", "dense.0.0", "dense.1.0", "dense.2.0"]
    assert [c.index for c in groups["dense.1.0"].consumers] == [2, 2]
    duplicate(model, [("stem.0", "stem.1")], [(0, 5)])
    duplicate(model, [("dense.0.0", "dense.0.1")], [(1, 4)])
    duplicate(model, [("dense.1.0", "dense.1.1")], [(0, 2), (3, 5)])
    keep = {"stem.0": 7, "dense.0.0": 5, "dense.1.0": 4}
    result = tropnnc.compress(model, keep, "tropnnc", radius=1.0)
    x = torch.rand(3, *model.input_shape, dtype=torch.float64)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-10, atol=1e-10)
    assert result.model.transition[0].in_channels == 7 + 5 + 4 + 6
    assert result.model.dense[2][0].in_channels == 7 + 5 + 4


def test_depthwise_group_duplicates_collapse_exactly():
    torch.manual_seed(0)
    model = zoo.build("mobilenetv2-mini").eval()
    randomize_bn(model)
    model = model.double()
    specs, _ = discover(model)
    group = next(s for s in specs if s.producer == "features.4.conv.0")
    assert group.activation == "relu6+depthwise"
    assert [p.layer for p in group.channelwise] == ["features.4.conv.3"]
    members = [
        ("features.4.conv.0", "features.4.conv.1"),
        ("features.4.conv.3", "features.4.conv.4"),
    ]
    duplicate(model, members, [(0, 1), (5, 9), (5, 20)])
    result = tropnnc.compress(model, {"features.4.conv.0": 29})
    x = torch.rand(3, *model.input_shape, dtype=torch.float64)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-10, atol=1e-10)
    dw = result.model.features[4].conv[3]
    assert dw.groups == dw.in_channels == dw.out_channels == 29
    assert math.isnan(result.blocks[0].certificate)


ARCHITECTURES = {
    "resnet-mini": {},
    "densenet-mini": {},
    "mobilenetv2-mini": {},
    "vit-mini": {},
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architectures_compress(name):
    torch.manual_seed(0)
    model = zoo.build(name, **ARCHITECTURES[name]).eval()
    randomize_bn(model)
    x = torch.rand(3, *model.input_shape)
    same = tropnnc.compress(model, 1.0, strict=True)
    torch.testing.assert_close(same.model(x), model(x), rtol=1e-5, atol=1e-5)
    result = tropnnc.compress(model, 0.5)
    assert result.model(x).shape == (3, 10)
    specs, _ = discover(model)
    heads = [r for r in result.blocks if r.method == "svd"]  # narrowed attention
    assert len(heads) == (2 if name == "vit-mini" else 0)
    blocks = [r for r in result.blocks if r.method != "svd"]
    for spec, report in zip(specs, blocks, strict=True):
        assert report.units_after == round(report.units_before / 2)
        layers = spec.producers + getattr(spec, "channelwise", ())
        for p in layers:
            mod = result.model.get_submodule(p.layer)
            width = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            assert width == report.units_after, p.layer
    assert result.macs_after < 0.75 * result.macs_before


def test_vit_attention_and_stream_left_alone():
    model = zoo.build("vit-mini").eval()
    specs, skips = discover(model)
    assert [(s.producer, s.consumer, s.activation) for s in specs] == [
        ("blocks.0.fc1", "blocks.0.fc2", "gelu"),
        ("blocks.1.fc1", "blocks.1.fc2", "gelu"),
    ]
    reasons = {s.layer: s for s in skips}
    assert "added to a tensor that is not a layer's channels" in reasons["blocks.0.fc2"].reason
    assert "turns its channels into the features of tokens" in reasons["embed"].reason
    assert not any(s.refused for s in skips)


def test_calibration_refits_groups_and_a_budget_compresses_them():
    torch.manual_seed(0)
    model = zoo.build("resnet-mini").eval()
    x = torch.rand(4, *model.input_shape)
    every = ["conv1", "layer1.0.conv1", "layer2.0.downsample.0", "layer2.0.conv1"]
    result = tropnnc.compress(model, 0.5, "l1", calibration=x)
    assert [s.layer for s in result.skipped] == ["fc"]
    assert [b.layer for b in result.blocks] == every
    assert all(b.data_driven and math.isnan(b.certificate) for b in result.blocks)
    result = tropnnc.compress(model, budget=0.5)
    assert [s.layer for s in result.skipped] == ["fc"]
    assert [b.layer for b in result.blocks] == every
    assert result.model(x).shape == (4, 10)


class Excite(nn.Module):
    """conv-BN-SiLU scaled by a squeeze-and-excitation gate, then a projection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Conv2d(8, 3, 1)
        self.fc2 = nn.Conv2d(3, 8, 1)
        self.project = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = F.silu(self.bn(self.conv(x)))
        gate = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        return self.head(F.relu(self.project(h * gate)).mean((2, 3)))


def test_squeeze_excitation_gate_joins_the_group():
    model = Excite().eval()
    randomize_bn(model)
    model = model.double()
    specs, skips = discover(model)
    group = specs[0]
    assert [p.layer for p in group.producers] == ["conv", "fc2"]
    assert [c.layer for c in group.consumers] == ["fc1", "project"]
    assert group.activation == "sigmoid+silu+gated+sum"
    assert [s.producer for s in specs[1:]] == ["fc1", "project"] and not skips[:-1]
    duplicate(model, [("conv", "bn"), ("fc2", None)], [(0, 1), (2, 6)])
    result = tropnnc.compress(model, {"conv": 6})
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-10, atol=1e-10)
    assert result.model.fc2.out_channels == result.model.fc1.in_channels == 6


class QKV(nn.Module):
    """A timm-style attention: one qkv projection split into heads, then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):  # (B, T, 8)
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        return self.fc2(F.gelu(self.fc1(self.proj(h)))).mean(1)


def test_qkv_projection_is_attention_left_alone():
    specs, skips = discover(QKV())
    assert [(s.producer, s.activation) for s in specs] == [("proj", "identity"), ("fc1", "gelu")]
    qkv = next(s for s in skips if s.layer == "qkv")
    assert not qkv.refused
    assert "qkv feeds scaled_dot_product_attention()" in qkv.reason
    assert "attention (query, key, value) is left alone" in qkv.reason


def test_cli_info_names_each_group_member(capsys):
    from tropnnc.cli import main

    assert main(["info", "resnet-mini"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert (
        "compressible in channel group conv1 (5 layers) (folds layer1.0.bn2)"
        in lines["layer1.0.conv2"]
    )
    assert "compressible -> layer1.0.conv2 (folds layer1.0.bn1)" in lines["layer1.0.conv1"]
    assert (
        "channel group layer2.0.downsample.0 (3 layers) (folds layer2.0.downsample.1)"
        in lines["layer2.0.downsample.0"]
    )


def test_default_pipeline_folds_batchnorm_streams_with_model_folding():
    """The adaptive merge treats a ReLU group whose members all have BN (a ResNet stream)
    as a BN block (Model Folding), and MobileNet's depthwise groups as TropNNC does."""
    torch.manual_seed(0)
    resnet = zoo.build("resnet-mini").eval()
    randomize_bn(resnet)
    mobile = zoo.build("mobilenetv2-mini").eval()
    cases = [
        (resnet, "conv1", "model-folding"),
        (mobile, "features.4.conv.0", "tropnnc"),
    ]
    for model, name, expected in cases:
        spec = next(s for s in discover(model)[0] if s.producer == name)
        block = extract(model, spec)
        assert has_batchnorm(block) == (expected == "model-folding")
        k = block.n - 2
        got = get_method("adaptive").merge(block, k, torch.Generator().manual_seed(1))
        ref = get_method(expected).merge(block, k, torch.Generator().manual_seed(1))
        torch.testing.assert_close(got.rows, ref.rows)
        torch.testing.assert_close(got.assignment, ref.assignment)


class GatedMLP(nn.Module):
    """A LLaMA-style pre-norm gated MLP in a residual: x + down(silu(gate(h)) * up(h))."""

    def __init__(self, dim: int = 16, hidden: int = 48) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # (B, T, dim)
        h = self.norm(x)
        return self.head(x + self.down(F.silu(self.gate(h)) * self.up(h)))


def test_gated_mlp_gate_and_up_merge_together():
    """gate and up are one group read by down: both narrow to the same width, keep 1.0 is
    the identity, and units duplicated in both gate and up collapse exactly."""
    torch.manual_seed(0)
    model = GatedMLP().eval()
    (group,), _ = discover(model)
    assert [p.layer for p in group.producers] == ["gate", "up"]
    assert group.consumer == "down" and group.activation == "silu+gated+sum"
    x = torch.randn(4, 5, 16)
    same = tropnnc.compress(model, 1.0, example_inputs=x[:1])
    torch.testing.assert_close(same.model(x), model(x))
    with torch.no_grad():  # 24 distinct units, each twice
        model.gate.weight[24:] = model.gate.weight[:24]
        model.up.weight[24:] = model.up.weight[:24]
    for method in (None, "tropnnc"):
        result = tropnnc.compress(model, 0.5, method, example_inputs=x[:1])
        new = result.model
        assert new.gate.out_features == new.up.out_features == new.down.in_features == 24
        assert result.params_before - result.params_after == 3 * 24 * 16
        torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)
