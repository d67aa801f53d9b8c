"""Property tests over random small MLPs and CNNs: compress never raises on valid input,
never changes its input, and gives exactly the requested widths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tropnnc
from tropnnc.graph import discover
from tropnnc.surgery import get_module

METHODS = ["tropnnc", "l1", "neural-path-kmeans", "neuron-merging"]
SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _randomize_batchnorm(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(n, generator=g) - 0.5)


@st.composite
def mlps(draw) -> tuple[nn.Module, tuple[int, ...]]:
    """Linear [-> BatchNorm1d] -> ReLU [-> Dropout] layers, then a Linear output."""
    d = draw(st.integers(2, 10))
    widths = draw(st.lists(st.integers(2, 12), min_size=1, max_size=3))
    batchnorm, dropout = draw(st.booleans()), draw(st.booleans())
    layers: list[nn.Module] = []
    prev = d
    for w in widths:
        layers.append(nn.Linear(prev, w, bias=draw(st.booleans())))
        if batchnorm:
            layers.append(nn.BatchNorm1d(w))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(0.3))
        prev = w
    layers.append(nn.Linear(prev, draw(st.integers(1, 4))))
    return nn.Sequential(*layers), (d,)


@st.composite
def cnns(draw) -> tuple[nn.Module, tuple[int, ...]]:
    """Conv [-> BatchNorm2d] -> ReLU [-> max/avg/global pool] stages, flatten, FC layers."""
    channels, size = draw(st.integers(1, 3)), draw(st.integers(4, 9))
    shape = (channels, size, size)
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 2))):
        out = draw(st.integers(2, 6))
        kernel = draw(st.integers(1, min(3, size)))
        padding = draw(st.integers(0, kernel // 2))
        stride = draw(st.integers(1, 2))
        layers.append(nn.Conv2d(channels, out, kernel, stride, padding))
        size = (size + 2 * padding - kernel) // stride + 1
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU())
        pool = draw(st.sampled_from(["none", "max", "avg", "global"]))
        if pool in ("max", "avg") and size >= 2:
            layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
            size //= 2
        elif pool == "global":
            layers.append(nn.AdaptiveAvgPool2d(1))
            size = 1
        channels = out
    layers.append(nn.Flatten())
    features = channels * size * size
    if draw(st.booleans()):
        hidden = draw(st.integers(2, 10))
        layers += [nn.Linear(features, hidden), nn.ReLU()]
        features = hidden
    layers.append(nn.Linear(features, draw(st.integers(1, 4))))
    return nn.Sequential(*layers), shape


def _units(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def check_compress(data, network, method: str) -> None:
    """Draw weights, a mode, a dtype and a keep request; compress; check the properties."""
    model, shape = network
    seed = data.draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    _randomize_batchnorm(model, g)
    model = model.to(data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype"))
    model.train(data.draw(st.booleans(), label="training"))
    specs, _ = discover(model)
    sizes = {s.producer: _units(get_module(model, s.producer)) for s in specs}
    assert sizes, "every generated network has at least one hidden layer"
    keep: dict[str, float | int] = {}
    expected: dict[str, int] = {}
    for layer, n in sizes.items():
        if not data.draw(st.booleans(), label=f"compress {layer}") and keep:
            continue
        if data.draw(st.booleans(), label=f"{layer} as width"):
            keep[layer] = expected[layer] = data.draw(st.integers(1, n), label=f"{layer} width")
        else:
            frac = data.draw(st.floats(0.01, 1.0), label=f"{layer} fraction")
            keep[layer], expected[layer] = frac, max(1, round(frac * n))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]

    result = tropnnc.compress(model, keep, method, seed=seed)

    state = model.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert [m.training for m in model.modules()] == modes
    assert {b.layer: b.units_after for b in result.blocks} == expected
    for layer, n in sizes.items():
        assert _units(get_module(result.model, layer)) == expected.get(layer, n)
    x = torch.rand((3,) + shape, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        assert result.model.eval()(x).shape == model.eval()(x).shape
    model.train(modes[0])


@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(network=mlps(), data=st.data())
def test_compress_mlp_properties(method, network, data):
    check_compress(data, network, method)


@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(network=cnns(), data=st.data())
def test_compress_cnn_properties(method, network, data):
    check_compress(data, network, method)
