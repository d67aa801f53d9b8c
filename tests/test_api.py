"""The public compress API on whole networks: surgery, counts, discovery, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tropnnc
from tropnnc import zoo

METHODS = tropnnc.methods()
MULTI = [m for m in METHODS if m not in ("zonotope-kmeans", "thinet")]  # data-free, any block


def lenet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.build("lenet-300-100")


class Functional(nn.Module):
    """A non-Sequential network using functional ReLU, flatten and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 20)
        self.b = nn.Linear(20, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.relu(self.a(x))
        x = F.dropout(torch.relu(self.b(x)), 0.1, self.training)
        return self.head(x)


@pytest.mark.parametrize("method", MULTI)
def test_keep_one_is_identity(method):
    model = lenet()
    result = tropnnc.compress(model, 1.0, method)
    x = torch.rand(64, 1, 28, 28)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
    assert [b.units_after for b in result.blocks] == [300, 100]


@pytest.mark.parametrize("method", MULTI)
def test_param_counts_match_hand_computation(method):
    result = tropnnc.compress(lenet(), 0.5, method)
    expected = (784 * 150 + 150) + (150 * 50 + 50) + (50 * 10 + 10)
    assert result.params_after == expected
    assert sum(p.numel() for p in result.model.parameters()) == expected
    assert result.params_before == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert result.macs_after == 784 * 150 + 150 * 50 + 50 * 10
    assert result.model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_input_model_is_never_modified():
    model = lenet()
    before = copy.deepcopy(model.state_dict())
    model.train()
    tropnnc.compress(model, 0.3)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_same_seed_identical_weights_different_seed_differs():
    a = tropnnc.compress(lenet(), 0.2, seed=3).model.state_dict()
    b = tropnnc.compress(lenet(), 0.2, seed=3).model.state_dict()
    c = tropnnc.compress(lenet(), 0.2, seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_discovery_on_functional_model_and_output_layer_untouched():
    model = Functional()
    result = tropnnc.compress(model, 0.5)
    assert [(b.layer, b.units_after) for b in result.blocks] == [("a", 10), ("b", 8)]
    assert result.model.head.out_features == 3 and result.model.head.in_features == 8
    assert any(s.layer == "head" and "output layer" in s.reason for s in result.skipped)


def test_keep_width_and_mapping():
    result = tropnnc.compress(lenet(), {"1": 40})
    assert [(b.layer, b.units_after) for b in result.blocks] == [("1", 40)]
    assert result.model[3].in_features == 40 and result.model[3].out_features == 100
    result = tropnnc.compress(lenet(), 7)
    assert [b.units_after for b in result.blocks] == [7, 7]


def test_report_certificates_and_table():
    result = tropnnc.compress(lenet(), 0.5, radius=2.0)
    assert all(b.certificate > 0 for b in result.blocks)
    assert all(b.certificate_sum > b.certificate for b in result.blocks)  # several outputs
    assert "1" in result.table() and "parameters" in result.table()
    d = result.to_dict()
    assert d["method"] == "adaptive" and len(d["blocks"]) == 2  # the default pipeline
    assert d["reconstruction"]["bn_shrink"] == 0.8 and all(b.reconstructed for b in result.blocks)
    paper = tropnnc.compress(lenet(), 0.5, "tropnnc", radius=2.0).to_dict()
    assert paper["method"] == "tropnnc" and paper["reconstruction"] is None


def test_single_output_network_with_zonotope_kmeans():
    torch.manual_seed(0)
    model = zoo.build("e1-mlp", hidden=50)
    result = tropnnc.compress(model, 0.2, "zonotope-kmeans")
    assert result.blocks[0].units_after == 10
    x = torch.rand(5, 1, 28, 28)
    assert result.model(x).shape == (5, 1)


@pytest.mark.parametrize(
    "keep,match",
    [
        (0.0, "must be in \\(0, 1\\]"),
        (-0.5, "must be in \\(0, 1\\]"),
        (1.5, "must be in \\(0, 1\\]"),
        (301, "between 1 and the layer's"),
        (0, "between 1 and the layer's"),
        ({"nope": 0.5}, "not compressible blocks: nope"),
    ],
)
def test_bad_keep(keep, match):
    with pytest.raises(ValueError, match=match):
        tropnnc.compress(lenet(), keep)


def test_bad_keep_type():
    with pytest.raises(TypeError, match="must be a float fraction"):
        tropnnc.compress(lenet(), "half")


def test_unknown_method_lists_valid():
    with pytest.raises(ValueError, match="valid methods: adaptive, cup, l1, "):
        tropnnc.compress(lenet(), 0.5, "magic")


def test_no_compressible_block():
    with pytest.raises(ValueError, match="no compressible block.*output layer"):
        tropnnc.compress(nn.Sequential(nn.Linear(4, 2)), 0.5)


def test_nan_weights_rejected():
    model = lenet()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="1.weight .*NaN or inf"):
        tropnnc.compress(model, 0.5)


def test_zonotope_kmeans_on_multi_output_network():
    with pytest.raises(ValueError, match="single-output blocks only.*10 outputs|100 outputs"):
        tropnnc.compress(lenet(), 0.5, "zonotope-kmeans")


def test_not_a_module():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        tropnnc.compress({"weight": torch.zeros(2)}, 0.5)


def test_unsupported_activation_skipped_or_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    result = tropnnc.compress(model, 0.5)
    assert [b.layer for b in result.blocks] == ["2"]
    assert any("1 (Tanh) after 0 is not a supported activation" in s.reason for s in result.skipped)
    with pytest.raises(ValueError, match="strict=True.*Tanh"):
        tropnnc.compress(model, 0.5, strict=True)


def test_macs_agree_with_flop_counter():
    for name in ("lenet-300-100", "e2-cnn", "vgg-small"):
        torch.manual_seed(0)
        model = zoo.build(name).eval()
        result = tropnnc.compress(model, 0.5)
        x = torch.zeros((1,) + model.input_shape)
        for net, macs in ((model, result.macs_before), (result.model, result.macs_after)):
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                net(x)
            assert counter.get_total_flops() == 2 * macs, name


def test_conv_network_compresses_and_keep_one_identity():
    torch.manual_seed(0)
    model = zoo.build("vgg-small").eval()
    with torch.no_grad():  # non-trivial BN statistics
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
    x = torch.rand(4, 1, 28, 28)
    same = tropnnc.compress(model, 1.0)
    torch.testing.assert_close(same.model(x), model(x), rtol=1e-4, atol=1e-5)
    half = tropnnc.compress(model, 0.5)
    assert len(half.blocks) == 9  # 7 conv -> conv, the last conv -> FC, the FC hidden
    assert half.model(x).shape == (4, 10)


# ------------------------------------------------------------------------------------------
# behaviour a user does not expect (issue 15)
# ------------------------------------------------------------------------------------------


def test_bare_int_keep_of_one_is_refused_and_int_widths_are_logged(caplog):
    with pytest.raises(
        ValueError,
        match=r"keep=1 \(an int\) would shrink every layer to ONE "
        r"unit: pass keep=1.0 to keep every unit, or a mapping",
    ):
        tropnnc.compress(lenet(), 1)
    assert tropnnc.compress(lenet(), {"1": 1}).model[1].out_features == 1  # asked by name
    with caplog.at_level("INFO", logger="tropnnc"):
        tropnnc.compress(lenet(), 40, "l1")
    assert "keep=40 is a width: 1 300 -> 40, 3 100 -> 40" in caplog.text


def bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model


def test_train_mode_model_warns(caplog):
    model = bn_mlp()
    with caplog.at_level("WARNING", logger="tropnnc"):
        tropnnc.compress(model.eval(), 1.0)
    assert "train mode" not in caplog.text
    with caplog.at_level("WARNING", logger="tropnnc"):
        tropnnc.compress(model.train(), 1.0)
    assert (
        "Sequential is in train mode, but its BatchNorms are folded with their running "
        "statistics" in caplog.text
    )


def test_replaced_layers_keep_requires_grad():
    model = bn_mlp().eval()
    model[0].weight.requires_grad_(False)  # frozen producer weight, trainable bias
    model[3].requires_grad_(False)  # frozen consumer
    new = tropnnc.compress(model, 0.5).model
    assert (new[0].weight.requires_grad, new[0].bias.requires_grad) == (False, True)
    assert (new[3].weight.requires_grad, new[3].bias.requires_grad) == (False, False)
    assert all(p.requires_grad for p in tropnnc.compress(bn_mlp().eval(), 0.5).model.parameters())


def test_strict_avg_pool_before_the_relu_says_why():
    """DenseNet's transitions put an AvgPool2d between a conv and the next ReLU: refused in
    strict mode, with a reason that does not contradict itself."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.AvgPool2d(2),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
    with pytest.raises(ValueError) as err:
        tropnnc.compress(model, 0.5, strict=True, example_inputs=torch.zeros(1, 1, 10, 10))
    message = str(err.value)
    assert (
        "cannot compress 0: 1 (AvgPool2d) directly after 0 comes before the ReLU, where "
        "only max pools and dropout are allowed" in message
    )
    assert "allowed: ReLU, max/avg" not in message


@pytest.mark.parametrize(
    "calibration,match",
    [
        (torch.full((8, 1, 28, 28), math.nan), "calibration batch 0 contains NaN or inf"),
        (
            [torch.rand(4, 1, 28, 28), torch.full((4, 1, 28, 28), math.inf)],
            "calibration batch 1 contains NaN or inf",
        ),
        (torch.zeros(0, 1, 28, 28), r"calibration holds no inputs \(0 samples\)"),
    ],
)
def test_bad_calibration_is_refused_before_any_work(calibration, match):
    with pytest.raises(ValueError, match=match):
        tropnnc.compress(lenet(), 0.5, "thinet", calibration=calibration)


def test_seed_and_radius_ranges():
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        tropnnc.compress(lenet(), 0.5, seed=1 << 63)
    with pytest.raises(ValueError, match="radius 1e\\+200 is too large"):
        tropnnc.compress(lenet(), 0.5, radius=1e200)
    assert tropnnc.compress(lenet(), 0.5, "l1", radius=1e100).blocks


def test_no_compressible_block_message_is_a_summary():
    """Dozens of skipped layers give one short line: counts per reason, the first three."""
    layers = [m for _ in range(30) for m in (nn.Linear(4, 4), nn.Tanh())] + [nn.Linear(4, 2)]
    with pytest.raises(ValueError) as err:
        tropnnc.compress(nn.Sequential(*layers), 0.5)
    message = str(err.value)
    assert message.startswith(
        "compress: Sequential has no compressible block (producer -> "
        "ReLU -> consumer); skipped: 30 unsupported activation, 1 output "
        "layer; first: 0: 1 (Tanh) after 0 is not a supported activation"
    )
    assert message.endswith("(and 28 more); verbose logging (-v) lists every layer")
    assert len(message) < 500 and "\n" not in message


def test_linear_bottleneck_is_a_block_with_the_identity_activation():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    specs, _ = tropnnc.graph.discover(model)
    assert [(s.producer, s.consumer, s.activation) for s in specs] == [
        ("0", "1", "identity"),
        ("1", "3", "relu"),
    ]


def test_compress_shows_block_progress_on_a_terminal_only(monkeypatch, capsys):
    import io
    import sys

    model = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 2)
    )
    tropnnc.compress(model, 0.5)
    assert capsys.readouterr().err == ""  # not a terminal: quiet

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    tropnnc.compress(model, 0.5)
    shown = term.getvalue()
    assert "compress:" in shown and "| 0/2 " in shown  # a bar over the 2 blocks
