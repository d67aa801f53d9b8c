"""Block discovery: which chains are blocks, and clear skips and refusals for the rest."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tropnnc
from tropnnc.graph import Consumer, GroupSpec, Producer, TraceError, discover


class Wrap(nn.Module):
    """conv a (3 -> 8) -> ReLU -> ``mid`` -> Linear head, written functionally in ``fn``."""

    def __init__(self, fn, features: int = 8 * 4 * 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(features, 6)
        self.head = nn.Linear(6, 2)
        self.fn = fn

    def forward(self, x):
        return self.head(F.relu(self.fc(self.fn(self, x))))


# every pass-through form between a conv producer and a Linear consumer on 8x8 inputs
PASS_FORMS = {
    "view-size0": lambda s, x: F.max_pool2d(F.relu(s.a(x)), 2).view(x.size(0), -1),
    "view-shape0": lambda s, x: F.avg_pool2d(torch.relu(s.a(x)), 2).view(x.shape[0], -1),
    "own-size0": lambda s, x: _own_size(F.max_pool2d(s.a(x).relu_(), 2)),
    "view-minus1-n": lambda s, x: F.max_pool2d(F.relu(s.a(x), inplace=True), 2).view(-1, 128),
    "reshape-fn": lambda s, x: torch.reshape(F.max_pool2d(torch.relu_(s.a(x)), 2), (x.size(0), -1)),
    "flatten-method": lambda s, x: F.adaptive_avg_pool2d(F.relu(s.a(x)), 4).flatten(1),
    "adaptive-max": lambda s, x: torch.flatten(F.adaptive_max_pool2d(F.relu(s.a(x)), 4), 1),
    "pool-before-relu": lambda s, x: torch.flatten(F.relu(F.max_pool2d(s.a(x), 2)), 1),
    "dropout2d": lambda s, x: torch.flatten(
        F.dropout2d(F.max_pool2d(F.relu(s.a(x)), 2), 0.2, s.training), 1
    ),
    "leaky-zero": lambda s, x: torch.flatten(F.max_pool2d(F.leaky_relu(s.a(x), 0.0), 2), 1),
    "view-computed": lambda s, x: _computed(F.max_pool2d(F.relu(s.a(x)), 2)),
}


def _computed(x):
    return x.view(x.size(0), x.size(1) * x.size(2) * x.size(3))


def _own_size(x):
    return x.view(x.size(0), -1)


@pytest.mark.parametrize("form", sorted(PASS_FORMS))
def test_pass_through_forms_are_blocks(form):
    blocks, skips = discover(Wrap(PASS_FORMS[form]))
    assert [(b.producer, b.consumer, b.flatten) for b in blocks] == [
        ("a", "fc", True),
        ("fc", "head", False),
    ]
    assert [s.layer for s in skips] == ["head"]


@pytest.mark.parametrize("form", ["global-mean", "adaptive-1-flatten"])
def test_global_average_then_linear(form):
    fns = {
        "global-mean": lambda s, x: F.relu(s.a(x)).mean((2, 3)),
        "adaptive-1-flatten": lambda s, x: torch.flatten(
            nn.functional.adaptive_avg_pool2d(F.relu(s.a(x)), (1, 1)), 1
        ),
    }
    blocks, _ = discover(Wrap(fns[form], features=8))
    assert blocks[0].producer == "a" and blocks[0].consumer == "fc" and blocks[0].flatten


def test_sequential_modules_inplace_relu_and_pools():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Dropout(0.1),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(2),
        nn.Dropout2d(0.1),
        nn.Conv2d(8, 8, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((2, 2)),
        nn.Flatten(),
        nn.Dropout(),
        nn.Linear(32, 4),
        nn.LeakyReLU(0.0),
        nn.Linear(4, 2),
    )
    blocks, skips = discover(model)
    assert [(b.producer, b.consumer, b.bn, b.between) for b in blocks] == [
        ("0", "5", "1", ("3", "4")),
        ("5", "9", None, ("7", "8")),
        ("9", "14", None, ("11", "12", "13")),
        ("14", "16", None, ()),
    ]
    assert [b.flatten for b in blocks] == [False, False, True, False]
    assert [s.layer for s in skips] == ["16"]


def build(bad: nn.Module | None = None, conv: bool = False) -> nn.Module:
    """A net with one compressible block ("0") and ``bad`` right after layer "2"."""
    if conv:
        layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)]
        tail = [nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 2)]
    else:
        layers = [nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8)]
        tail = [nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)]
    return nn.Sequential(*layers, *([bad] if bad is not None else []), *tail)


def check_refused(
    model: nn.Module, layer: str, *names: str, example=None, run: bool = True
) -> None:
    """``layer`` is skipped as refused with a reason naming ``names``; strict raises."""
    _, skips = discover(model)
    skip = next(s for s in skips if s.layer == layer)
    assert skip.refused, skip
    for name in names:
        assert name in skip.reason, (name, skip.reason)
    if run:  # the default: compress the rest, report the refusal
        result = tropnnc.compress(model, 0.5, example_inputs=example)
        assert any(s.layer == layer and s.refused for s in result.skipped)
        assert layer not in [b.layer for b in result.blocks]
    with pytest.raises(ValueError, match="strict=True") as err:
        tropnnc.compress(model, 0.5, strict=True, example_inputs=example)
    for name in (layer, *names):
        assert name in str(err.value)


@pytest.mark.parametrize(
    "act,name",
    [
        (nn.GELU(), "gelu"),
        (nn.SiLU(), "silu"),
        (nn.LeakyReLU(0.1), "leaky_relu:0.1"),
        (nn.ReLU6(), "relu6"),
        (nn.Hardswish(), "hardswish"),
    ],
)
def test_accepted_activations_are_blocks(act, name):
    blocks, _ = discover(build(act))
    assert [(b.producer, b.consumer, b.activation) for b in blocks] == [
        ("0", "2", "relu"),
        ("2", "4", name),
        ("4", "6", "relu"),
    ]


@pytest.mark.parametrize("act", [nn.Tanh(), nn.Sigmoid(), nn.ELU(), nn.PReLU()])
def test_other_activations_refused(act):
    kind = type(act).__name__
    check_refused(build(act), "2", f"3 ({kind})", "not a supported activation")


def test_non_relu_conv_and_functional():
    blocks, _ = discover(build(nn.SiLU(), conv=True))
    assert [(b.producer, b.activation) for b in blocks] == [
        ("0", "relu"),
        ("2", "silu"),
        ("4", "relu"),
    ]

    class Functional(nn.Module):
        def __init__(self, fn) -> None:
            super().__init__()
            self.inner = nn.Linear(6, 8)
            self.mid = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)
            self.fn = fn

        def forward(self, x):
            return self.out(F.relu(self.mid(self.fn(self.inner(x)))))

    blocks, _ = discover(Functional(F.gelu))
    assert [(b.producer, b.activation) for b in blocks] == [("inner", "gelu"), ("mid", "relu")]
    blocks, _ = discover(Functional(lambda x: F.leaky_relu(x, negative_slope=0.2)))
    assert blocks[0].activation == "leaky_relu:0.2"
    check_refused(Functional(torch.tanh), "inner", "tanh()", "not a supported activation")


def test_grouped_and_depthwise_convs_refused():
    grouped = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16, 2),
    )
    check_refused(grouped, "0", "0 (Conv2d)", "groups=2", example=torch.zeros(1, 4, 4, 4))
    depthwise = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16, 8),
        nn.ReLU(),
        nn.Linear(8, 2),
    )
    blocks, skips = discover(depthwise)  # the depthwise filters merge with the units
    group = blocks[0]
    assert isinstance(group, GroupSpec)
    assert group.producers == (Producer("0", "1"),) and group.channelwise == (Producer("3", None),)
    assert group.consumers == (Consumer("6", (("0", None),), 0, True),)
    assert group.activation == "relu+depthwise"
    assert [s.layer for s in skips] == ["8"]
    multiplier = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, groups=8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4, 8),
        nn.ReLU(),
        nn.Linear(8, 2),
    )
    check_refused(
        multiplier,
        "0",
        "read by 2 (Conv2d), a grouped convolution",
        "groups=8",
        example=torch.zeros(1, 3, 4, 4),
    )


class Reshaper(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.fc = nn.Linear(8 * 16, 8)
        self.out = nn.Linear(8, 2)
        self.how = how

    def forward(self, x):
        h = F.relu(self.a(x))
        if self.how == "channel-shuffle":
            n, c, hh, ww = h.shape
            h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
            h = self.b(h)
        elif self.how == "pixel-shuffle":
            h = self.b(F.pixel_unshuffle(self.shuffle(h), 2))
        elif self.how == "permute":
            h = self.b(h.permute(0, 1, 3, 2))
        else:  # flatten that keeps H separate: the Linear would read a mix
            h = self.b(h)
        return self.out(F.relu(self.fc(torch.flatten(F.relu(h), 1))))


@pytest.mark.parametrize(
    "how,names",
    [
        ("channel-shuffle", (".view()", "mixes channels")),
        ("pixel-shuffle", ("shuffle (PixelShuffle)", "mixes channels")),
        ("permute", (".permute()", "mixes channels")),
    ],
)
def test_channel_mixing_reshapes_refused(how, names):
    check_refused(Reshaper(how), "a", *names, example=torch.zeros(1, 3, 4, 4))


def test_bad_flatten_and_view_refused():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(2),
        nn.Linear(16, 8),
        nn.ReLU(),
        nn.Linear(8, 2),
    )
    _, skips = discover(model)
    assert "2 (Flatten)" in skips[0].reason and skips[0].refused

    class View(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 8)
            self.c = nn.Linear(8, 2)

        def forward(self, x):
            h = F.relu(self.a(x)).view(x.size(0), 2, 4).transpose(1, 2).reshape(x.size(0), 8)
            return self.c(F.relu(self.b(h)))

    check_refused(View(), "a", ".view()", "mixes channels")


def test_linear_read_through_flatten_of_tokens_refused():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 4)
            self.b = nn.Linear(12, 8)
            self.c = nn.Linear(8, 2)

        def forward(self, x):  # (B, 3, 6) tokens
            return self.c(F.relu(self.b(F.relu(self.a(x)).flatten(1))))

    check_refused(Tokens(), "a", "consumer b (Linear)", "12 features", example=torch.zeros(1, 3, 6))


def test_attention_left_alone():
    class Attn(nn.Module):
        def __init__(self, functional: bool) -> None:
            super().__init__()
            self.q = nn.Linear(6, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.mid = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)
            self.functional = functional

        def forward(self, x):  # (B, T, 6)
            h = F.relu(self.q(x))
            if self.functional:
                h = F.scaled_dot_product_attention(
                    h, x[..., :8].new_ones(1, 1, 8), x.new_ones(1, 1, 8)
                )
            else:
                h = self.attn(h, h, h)[0]
            return self.out(F.relu(self.mid(h)))

    for functional, name in (
        (False, "attn (MultiheadAttention)"),
        (True, "scaled_dot_product_attention()"),
    ):
        model = Attn(functional)
        _, skips = discover(model)
        skip = next(s for s in skips if s.layer == "q")
        assert not skip.refused and name in skip.reason and "left alone" in skip.reason
        x = torch.zeros(1, 3, 6)
        result = tropnnc.compress(model, 0.5, strict=True, example_inputs=x, attention=False)
        assert [b.layer for b in result.blocks] == ["mid"]
    # by default the heads are narrowed too; uncertified: their input is no norm's output
    result = tropnnc.compress(Attn(False), 0.5, strict=True, example_inputs=x)
    assert [b.layer for b in result.blocks] == ["mid", "attn"]
    assert math.isnan(result.blocks[1].certificate) and result.blocks[1].units_after == 4


def test_batchnorm_after_relu_and_unfoldable_batchnorm_refused():
    check_refused(
        build(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(8))),
        "2",
        "3.1 (BatchNorm1d)",
        "not positively homogeneous",
    )
    no_stats = nn.BatchNorm1d(8, track_running_stats=False)
    # (run=False: a one-sample MAC count cannot run BatchNorm without running statistics)
    check_refused(build(no_stats), "2", "3 (BatchNorm1d)", "no running statistics", run=False)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(6, 8)
            self.bn = nn.BatchNorm1d(8)
            self.c = nn.Linear(16, 8)
            self.d = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = F.relu(self.d(F.relu(self.bn(self.a(x)))))
            return self.out(F.relu(self.c(torch.cat([h, F.relu(self.bn(self.b(x)))], 1))))

    check_refused(Shared(), "a", "bn (BatchNorm1d)", "called 2 times")


def test_refusal_is_logged_as_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="tropnnc.api"):
        result = tropnnc.compress(build(nn.Tanh()), 0.5)
    assert [b.layer for b in result.blocks] == ["0", "4"]
    assert any("skipping 2" in r.getMessage() and "Tanh" in r.getMessage() for r in caplog.records)


class Branches(nn.Module):
    """A residual stream read by a branch, a side conv and (through a concatenation) fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.inner = nn.Conv2d(8, 8, 3, padding=1)
        self.last = nn.Conv2d(8, 8, 3, padding=1)
        self.side = nn.Conv2d(8, 4, 1)
        self.fuse = nn.Conv2d(12, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.last(F.relu(self.inner(x)))
        x = F.relu(x + y)
        x = torch.cat([x, self.side(x)], 1)
        return self.head(F.relu(self.fuse(x)).mean((2, 3)))


def test_residual_and_concat_channels_form_groups():
    blocks, skips = discover(Branches())
    assert [type(b).__name__ for b in blocks] == [
        "GroupSpec",
        "BlockSpec",
        "GroupSpec",
        "BlockSpec",
    ]
    stream, inner, side, fuse = blocks
    assert [p.layer for p in stream.producers] == ["stem", "last"]
    segments = (("stem", None), ("side", None))
    assert stream.consumers == (
        Consumer("inner", (("stem", None),), 0, False),
        Consumer("side", (("stem", None),), 0, False),
        Consumer("fuse", segments, 0, False),
    )
    assert stream.activation == "relu" and stream.between == ("add", "cat")
    assert (inner.producer, inner.consumer) == ("inner", "last")
    assert side.producers == (Producer("side", None),)
    assert side.consumers == (Consumer("fuse", segments, 1, False),)
    assert side.activation == "identity"  # no activation between side and fuse
    assert (fuse.producer, fuse.consumer) == ("fuse", "head")
    assert [s.layer for s in skips] == ["head"]


def test_shared_weights_and_untraceable():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(F.relu(self.a(F.relu(self.a(x)))))

    _, skips = discover(Twice())
    assert "a is called 2 times" in skips[0].reason

    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else x

    with pytest.raises(TraceError, match="cannot trace Dynamic"):
        discover(Dynamic())
