"""Model zoo: the networks of the experiments, rebuilt from a name and constructor arguments.

Every zoo network stores ``config`` (its constructor arguments) and ``input_shape`` (one
sample), so saved weights plus the config reload without pickled code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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

    def __init__(self, sizes: Sequence[int] = (784, 300, 100, 10),
                 input_shape: Sequence[int] | None = None) -> None:
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

    def __init__(self, cfg: Sequence[int | str], hidden: Sequence[int] = (500,),
                 num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28),
                 kernel: int = 3, padding: int = 1, pool: int = 2,
                 batchnorm: bool = False) -> None:
        super().__init__()
        self.config = {"cfg": list(cfg), "hidden": list(hidden), "num_classes": num_classes,
                       "input_shape": list(input_shape), "kernel": kernel, "padding": padding,
                       "pool": pool, "batchnorm": batchnorm}
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
def mlp(sizes: Sequence[int] = (784, 300, 100, 10),
        input_shape: Sequence[int] | None = None) -> nn.Module:
    """Any fully connected ReLU network."""
    return MLP(sizes, input_shape)


@register("e1-mlp")
def e1_mlp(hidden: int = 1000) -> nn.Module:
    """E1: MLP 784-1000-1, a single-output binary classifier."""
    return MLP((784, hidden, 1))


@register("lenet-300-100")
def lenet_300_100(num_classes: int = 10) -> nn.Module:
    """E3: LeNet-300-100."""
    return MLP((784, 300, 100, num_classes))


@register("e2-cnn")
def e2_cnn(channels: int = 16, hidden: int = 500, num_classes: int = 10) -> nn.Module:
    """E2: Conv(c,5x5)-ReLU-MaxPool(3)-Conv(c,5x5)-ReLU-MaxPool(3)-FC(hidden)-ReLU-FC(10)."""
    return CNN([channels, "M", channels, "M"], [hidden], num_classes, (1, 28, 28),
               kernel=5, padding=0, pool=3)


@register("lenet5")
def lenet5(num_classes: int = 10) -> nn.Module:
    """LeNet-5 for 28x28 inputs: conv 6 and 16 (5x5), then FC 120-84."""
    return CNN([6, "M", 16, "M"], [120, 84], num_classes, (1, 28, 28), kernel=5, padding=0)


@register("vgg-small")
def vgg_small(num_classes: int = 10, hidden: int = 256) -> nn.Module:
    """E4: VGG-style CNN with BatchNorm, 32-32-M-64-64-M-128-128-M-256-256, then FC."""
    return CNN([32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256], [hidden], num_classes,
               (1, 28, 28), kernel=3, padding=1, pool=2, batchnorm=True)
