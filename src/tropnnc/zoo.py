"""Model zoo: the networks of the experiments, rebuilt from a name and constructor arguments.

Every zoo network stores ``config`` (its constructor arguments) and ``input_shape`` (one
sample), so saved weights plus the config reload without pickled code. All are traceable by
torch.fx (block discovery needs it). The VGG-16 and ResNet-18/50 layouts use torchvision's
module names, so torchvision state dicts load into them (no torchvision needed here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_ZOO: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a network builder available under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _ZOO[name] = fn
        return fn

    return wrap


def names() -> list[str]:
    """The names of the zoo networks."""
    return sorted(_ZOO)


def build(name: str, **config: object) -> nn.Module:
    """Build zoo network ``name`` with constructor arguments ``config``."""
    if name not in _ZOO:
        raise ValueError(f"unknown zoo network {name!r}; valid: {', '.join(names())}")
    model = _ZOO[name](**config)
    model.zoo_name = name
    model.zoo_config = dict(config)
    return model


class MLP(nn.Sequential):
    """Flatten -> (Linear -> ReLU)* -> Linear, with layer sizes ``sizes``."""

    def __init__(
        self, sizes: Sequence[int] = (784, 300, 100, 10), input_shape: Sequence[int] | None = None
    ) -> None:
        sizes = [int(s) for s in sizes]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.config = {"sizes": sizes, "input_shape": input_shape}
        shape = input_shape or ((1, 28, 28) if sizes[0] == 784 else (sizes[0],))
        self.input_shape = tuple(int(s) for s in shape)


class CNN(nn.Module):
    """A plain CNN: conv stages (``cfg``: channels, or "M" for a 2x2 max pool) then FC.

    ``kernel``/``padding`` shape every conv, ``pool`` is the max-pool size used by "M",
    ``batchnorm`` adds BatchNorm2d after every conv, ``hidden`` lists the FC hidden widths.
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        hidden: Sequence[int] = (500,),
        num_classes: int = 10,
        input_shape: Sequence[int] = (1, 28, 28),
        kernel: int = 3,
        padding: int = 1,
        pool: int = 2,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        self.config = {
            "cfg": list(cfg),
            "hidden": list(hidden),
            "num_classes": num_classes,
            "input_shape": list(input_shape),
            "kernel": kernel,
            "padding": padding,
            "pool": pool,
            "batchnorm": batchnorm,
        }
        self.input_shape = tuple(input_shape)
        layers: list[nn.Module] = []
        channels, size = input_shape[0], input_shape[1]
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(pool))
                size //= pool
                continue
            layers.append(nn.Conv2d(channels, int(item), kernel, padding=padding))
            if batchnorm:
                layers.append(nn.BatchNorm2d(int(item)))
            layers.append(nn.ReLU())
            channels, size = int(item), size + 2 * padding - kernel + 1
        self.features = nn.Sequential(*layers)
        sizes = [channels * size * size, *hidden, num_classes]
        fc: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            fc.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                fc.append(nn.ReLU())
        self.classifier = nn.Sequential(*fc)

    def forward(self, x):
        return self.classifier(self.features(x))


@register("mlp")
def mlp(
    sizes: Sequence[int] = (784, 300, 100, 10), input_shape: Sequence[int] | None = None
) -> nn.Module:
    """Any fully connected ReLU network."""
    return MLP(sizes, input_shape)


@register("e1-mlp")
def e1_mlp(hidden: int = 1000) -> nn.Module:
    """MLP 784-1000-1, a single-output binary classifier (experiment E1, results/E1)."""
    return MLP((784, hidden, 1))


@register("lenet-300-100")
def lenet_300_100(num_classes: int = 10) -> nn.Module:
    """LeNet-300-100 (experiment E3, results/E3)."""
    return MLP((784, 300, 100, num_classes))


@register("e2-cnn")
def e2_cnn(channels: int = 16, hidden: int = 500, num_classes: int = 10) -> nn.Module:
    """Conv(c,5x5)-ReLU-MaxPool(3)-Conv(c,5x5)-ReLU-MaxPool(3)-FC(hidden)-ReLU-FC(10)
    (experiment E2, results/E2)."""
    return CNN(
        [channels, "M", channels, "M"],
        [hidden],
        num_classes,
        (1, 28, 28),
        kernel=5,
        padding=0,
        pool=3,
    )


@register("lenet5")
def lenet5(num_classes: int = 10) -> nn.Module:
    """LeNet-5 for 28x28 inputs: conv 6 and 16 (5x5), then FC 120-84."""
    return CNN([6, "M", 16, "M"], [120, 84], num_classes, (1, 28, 28), kernel=5, padding=0)


@register("vgg-small")
def vgg_small(num_classes: int = 10, hidden: int = 256) -> nn.Module:
    """VGG-style CNN with BatchNorm, 32-32-M-64-64-M-128-128-M-256-256, then FC (experiment E4,
    results/E4)."""
    return CNN(
        [32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256],
        [hidden],
        num_classes,
        (1, 28, 28),
        kernel=3,
        padding=1,
        pool=2,
        batchnorm=True,
    )


def _features(
    cfg: Sequence[int | str],
    in_channels: int,
    batchnorm: bool,
    kernel: int = 3,
    padding: int = 1,
    pool: int = 2,
) -> tuple[nn.Sequential, int, int]:
    """VGG-style conv stages (torchvision's layout: conv, [BN], ReLU(inplace), "M" pools).

    Returns the stack, its output channels, and its total downsampling factor.
    """
    layers: list[nn.Module] = []
    channels, factor = in_channels, 1
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(pool, pool))
            factor *= pool
            continue
        layers.append(nn.Conv2d(channels, int(item), kernel, padding=padding))
        if batchnorm:
            layers.append(nn.BatchNorm2d(int(item)))
        layers.append(nn.ReLU(inplace=True))
        channels = int(item)
    return nn.Sequential(*layers), channels, factor


def _head(sizes: Sequence[int], dropout: float, batchnorm: bool) -> nn.Sequential:
    """FC classifier: (Linear -> [BN1d] -> ReLU -> [Dropout])* -> Linear."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if batchnorm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _scaled(cfg: Sequence[int | str], width: float) -> list[int | str]:
    return [item if item == "M" else max(1, round(int(item) * width)) for item in cfg]


VGG16_CFG: list[int | str] = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
]


class VGG(nn.Module):
    """features -> avgpool -> flatten -> classifier, in torchvision's layout.

    ``pool`` is the AdaptiveAvgPool2d output size (None: no pool, flatten the features);
    ``hidden`` the classifier's hidden widths; ``dropout`` after each hidden ReLU (as in
    torchvision); ``fc_batchnorm`` adds BatchNorm1d to the hidden FC layers.
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        hidden: Sequence[int],
        num_classes: int = 10,
        input_shape: Sequence[int] = (3, 32, 32),
        batchnorm: bool = False,
        pool: int | None = None,
        dropout: float = 0.5,
        fc_batchnorm: bool = False,
    ) -> None:
        super().__init__()
        self.config = {
            "cfg": list(cfg),
            "hidden": list(hidden),
            "num_classes": num_classes,
            "input_shape": list(input_shape),
            "batchnorm": batchnorm,
            "pool": pool,
            "dropout": dropout,
            "fc_batchnorm": fc_batchnorm,
        }
        self.input_shape = tuple(int(s) for s in input_shape)
        self.features, channels, factor = _features(cfg, input_shape[0], batchnorm)
        if pool is None:
            self.avgpool: nn.Module = nn.Identity()
            spatial = (input_shape[1] // factor) * (input_shape[2] // factor)
        else:
            self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
            spatial = pool * pool
        self.classifier = _head([channels * spatial, *hidden, num_classes], dropout, fc_batchnorm)

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register("alexnet-cifar")
def alexnet_cifar(
    num_classes: int = 10,
    hidden: Sequence[int] = (2048, 2048),
    input_shape: Sequence[int] = (3, 32, 32),
    dropout: float = 0.5,
) -> nn.Module:
    """AlexNet for 32x32 inputs (the paper's CIFAR experiments): conv 64-192-384-256-256 (5x5,
    5x5, then 3x3; 2x2 max pools after conv 1, 2 and 5), flatten 256*4*4, FC head 2048-2048
    (ImageNet's 4096-4096 scaled to the 4096 flattened features)."""
    return AlexNetCIFAR(num_classes, hidden, input_shape, dropout)


class AlexNetCIFAR(nn.Module):
    """AlexNet's conv stack and FC head, sized for CIFAR (see :func:`alexnet_cifar`)."""

    def __init__(
        self,
        num_classes: int = 10,
        hidden: Sequence[int] = (2048, 2048),
        input_shape: Sequence[int] = (3, 32, 32),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.config = {
            "num_classes": num_classes,
            "hidden": list(hidden),
            "input_shape": list(input_shape),
            "dropout": dropout,
        }
        self.input_shape = tuple(int(s) for s in input_shape)
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 64, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        sizes = [256 * (input_shape[1] // 8) * (input_shape[2] // 8), *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):  # torchvision's head order
            layers += [nn.Dropout(dropout), nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


@register("vgg16-cifar")
def vgg16_cifar(
    num_classes: int = 10,
    width: float = 1.0,
    hidden: int | None = None,
    input_shape: Sequence[int] = (3, 32, 32),
    dropout: float = 0.5,
) -> nn.Module:
    """VGG-16 for CIFAR (the paper's CIFAR experiments): the 13 convs of VGG-16 with BatchNorm, then
    FC 512-BN-ReLU-512-BN-ReLU-classes. ``width`` scales every width (tests use small ones);
    ``hidden`` defaults to the last conv's width."""
    cfg = _scaled(VGG16_CFG, width)
    h = int(hidden) if hidden is not None else int(cfg[-2])
    return VGG(
        cfg,
        [h, h],
        num_classes,
        input_shape,
        batchnorm=True,
        pool=None,
        dropout=dropout,
        fc_batchnorm=True,
    )


@register("vgg16")
def vgg16(
    num_classes: int = 1000,
    batchnorm: bool = False,
    width: float = 1.0,
    hidden: int = 4096,
    input_shape: Sequence[int] = (3, 224, 224),
    dropout: float = 0.5,
) -> nn.Module:
    """torchvision's VGG-16 layout, as in the paper's ImageNet experiment (224x224;
    AdaptiveAvgPool2d(7, 7); fc6 25088 -> 4096, fc7 4096 -> 4096, fc8 -> classes as
    classifier.0/3/6), random weights."""
    return _TorchvisionVGG(
        _scaled(VGG16_CFG, width), hidden, num_classes, input_shape, batchnorm, dropout
    )


class _TorchvisionVGG(VGG):
    """VGG with torchvision's classifier order: Linear, ReLU, Dropout, Linear, ReLU, Dropout,
    Linear (state-dict compatible with torchvision.models.vgg16 / vgg16_bn)."""

    def __init__(
        self,
        cfg: Sequence[int | str],
        hidden: int,
        num_classes: int,
        input_shape: Sequence[int],
        batchnorm: bool,
        dropout: float,
    ) -> None:
        super().__init__(
            cfg, [hidden, hidden], num_classes, input_shape, batchnorm, pool=7, dropout=dropout
        )
        self.config = {
            "cfg": list(cfg),
            "hidden": hidden,
            "num_classes": num_classes,
            "input_shape": list(input_shape),
            "batchnorm": batchnorm,
            "dropout": dropout,
        }


class PadShortcut(nn.Module):
    """ResNet option A shortcut: subsample by ``stride`` and zero-pad the new channels."""

    def __init__(self, extra: int, stride: int) -> None:
        super().__init__()
        self.extra = extra
        self.stride = stride

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (torchvision's names)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN, plus the shortcut, then ReLU
    (torchvision's ResNet v1.5 layout and names)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet in torchvision's layout (conv1, bn1, relu, maxpool, layer1..N, avgpool, fc).

    ``stem="imagenet"``: 7x7 stride-2 conv and a 3x3 stride-2 max pool; ``stem="cifar"``: a
    3x3 conv, no pool. ``shortcut`` for stride/width changes: "conv" (1x1 conv + BN,
    torchvision's ``downsample``) or "pad" (He et al.'s CIFAR option A, parameter-free).
    """

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        input_size: int = 224,
        stem: str = "imagenet",
        shortcut: str = "conv",
    ) -> None:
        super().__init__()
        if (
            block not in ("basic", "bottleneck")
            or stem not in ("imagenet", "cifar")
            or shortcut not in ("conv", "pad")
        ):
            raise ValueError(
                f"ResNet: block must be basic/bottleneck, stem imagenet/cifar, "
                f"shortcut conv/pad; got {block!r}, {stem!r}, {shortcut!r}"
            )
        self.config = {
            "block": block,
            "layers": list(layers),
            "widths": list(widths),
            "num_classes": num_classes,
            "in_channels": in_channels,
            "input_size": input_size,
            "stem": stem,
            "shortcut": shortcut,
        }
        self.input_shape = (in_channels, input_size, input_size)
        cls = BasicBlock if block == "basic" else Bottleneck
        self.inplanes = int(widths[0])
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        self.stages = len(layers)
        for i, (count, planes) in enumerate(zip(layers, widths, strict=True)):
            stage = self._stage(cls, int(planes), int(count), 1 if i == 0 else 2, shortcut)
            setattr(self, f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(
        self, cls: type[nn.Module], planes: int, count: int, stride: int, shortcut: str
    ) -> nn.Sequential:
        blocks: list[nn.Module] = []
        for j in range(count):
            s = stride if j == 0 else 1
            out = planes * cls.expansion
            downsample = None
            if s != 1 or self.inplanes != out:
                if shortcut == "conv":
                    downsample = nn.Sequential(
                        nn.Conv2d(self.inplanes, out, 1, s, bias=False), nn.BatchNorm2d(out)
                    )
                else:
                    downsample = PadShortcut(out - self.inplanes, s)
            blocks.append(cls(self.inplanes, planes, s, downsample))
            self.inplanes = out
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register("resnet20")
def resnet20(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    width: int = 16,
    shortcut: str = "pad",
) -> nn.Module:
    """ResNet-20 for CIFAR (He et al. 2016): 3x3 stem, 3 stages of 3 basic blocks with
    16/32/64 channels (``width`` scales them), option A shortcuts by default. Fashion-MNIST:
    ``in_channels=1, input_size=28``."""
    return ResNet(
        "basic",
        [3, 3, 3],
        [width, 2 * width, 4 * width],
        num_classes,
        in_channels,
        input_size,
        "cifar",
        shortcut,
    )


@register("resnet18")
def resnet18(
    num_classes: int = 1000, in_channels: int = 3, input_size: int = 224, width: int = 64
) -> nn.Module:
    """ResNet-18 (ImageNet layout, basic blocks [2, 2, 2, 2], widths 64-128-256-512)."""
    return ResNet(
        "basic",
        [2, 2, 2, 2],
        [width * 2**i for i in range(4)],
        num_classes,
        in_channels,
        input_size,
    )


@register("resnet50")
def resnet50(
    num_classes: int = 1000, in_channels: int = 3, input_size: int = 224, width: int = 64
) -> nn.Module:
    """ResNet-50 (ImageNet layout, bottleneck blocks [3, 4, 6, 3], v1.5 stride on the 3x3)."""
    return ResNet(
        "bottleneck",
        [3, 4, 6, 3],
        [width * 2**i for i in range(4)],
        num_classes,
        in_channels,
        input_size,
    )


# --------------------------------------------------------------------------------------------
# small networks with the structures of modern architectures (channel groups, other
# activations, attention), for tests and the architecture experiments
# --------------------------------------------------------------------------------------------


@register("resnet-mini")
def resnet_mini(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    widths: Sequence[int] = (8, 16),
    blocks: int = 1,
) -> nn.Module:
    """A 2-stage CIFAR-style ResNet of basic blocks with 1x1 projection shortcuts: stage 1
    keeps the stem's width (identity shortcuts), stage 2 doubles it with stride 2."""
    return ResNet(
        "basic",
        [blocks] * len(widths),
        list(widths),
        num_classes,
        in_channels,
        input_size,
        "cifar",
        "conv",
    )


class DenseMini(nn.Module):
    """A DenseNet-like net: stem conv-BN-ReLU, a dense block whose layers (conv3x3-BN-ReLU,
    ``growth`` channels each) read the concatenation of all earlier features, a 1x1
    transition conv-BN-ReLU with a 2x2 average pool, global average, Linear. (torchvision's
    DenseNet normalises the concatenation before each conv instead: BN-ReLU-conv.)"""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        stem: int = 8,
        growth: int = 4,
        layers: int = 3,
        transition: int = 12,
    ) -> None:
        super().__init__()
        self.config = {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "input_size": input_size,
            "stem": stem,
            "growth": growth,
            "layers": layers,
            "transition": transition,
        }
        self.input_shape = (in_channels, input_size, input_size)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
        )
        self.dense = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(stem + i * growth, growth, 3, padding=1, bias=False),
                nn.BatchNorm2d(growth),
                nn.ReLU(inplace=True),
            )
            for i in range(layers)
        )
        self.transition = nn.Sequential(
            nn.Conv2d(stem + layers * growth, transition, 1, bias=False),
            nn.BatchNorm2d(transition),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2),
        )
        self.fc = nn.Linear(transition, num_classes)

    def forward(self, x):
        features = self.stem(x)
        for layer in self.dense:
            features = torch.cat([features, layer(features)], 1)
        return self.fc(self.transition(features).mean((2, 3)))


@register("densenet-mini")
def densenet_mini(**config: object) -> nn.Module:
    """See :class:`DenseMini`."""
    return DenseMini(**config)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1
    projection-BN (linear bottleneck), plus the input when stride 1 keeps the width."""

    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.residual = stride == 1 and inp == out
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileMini(nn.Module):
    """A MobileNetV2-like net: stem conv-BN-ReLU6, inverted residuals (``cfg``: (out
    channels, stride) each, expansion ``expand``), 1x1 conv-BN-ReLU6, global average,
    Linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        stem: int = 8,
        cfg: Sequence[Sequence[int]] = ((8, 1), (12, 2), (12, 1)),
        expand: int = 4,
        last: int = 32,
    ) -> None:
        super().__init__()
        self.config = {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "input_size": input_size,
            "stem": stem,
            "cfg": [list(c) for c in cfg],
            "expand": expand,
            "last": last,
        }
        self.input_shape = (in_channels, input_size, input_size)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU6(inplace=True),
        ]
        channels = stem
        for out, stride in cfg:
            layers.append(InvertedResidual(channels, int(out), int(stride), expand))
            channels = int(out)
        layers += [
            nn.Conv2d(channels, last, 1, bias=False),
            nn.BatchNorm2d(last),
            nn.ReLU6(inplace=True),
        ]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


@register("mobilenetv2-mini")
def mobilenetv2_mini(**config: object) -> nn.Module:
    """See :class:`MobileMini`."""
    return MobileMini(**config)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + fc2(GELU(fc1(LN(x))))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class ViTMini(nn.Module):
    """A ViT-like net: patch-embedding conv, learned position embedding, ``depth`` pre-norm
    encoder blocks (attention and a GELU MLP on (B, T, C) tokens), LayerNorm, mean over
    tokens, Linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        patch: int = 7,
        dim: int = 16,
        depth: int = 2,
        heads: int = 2,
        hidden: int = 32,
    ) -> None:
        super().__init__()
        self.config = {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "input_size": input_size,
            "patch": patch,
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "hidden": hidden,
        }
        self.input_shape = (in_channels, input_size, input_size)
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (input_size // patch) ** 2, dim))
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(tokens)).mean(1))


@register("vit-mini")
def vit_mini(**config: object) -> nn.Module:
    """See :class:`ViTMini`."""
    return ViTMini(**config)
