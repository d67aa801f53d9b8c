"""What discovery returns: :class:`BlockSpec` (a producer -> activation -> consumer chain),
:class:`GroupSpec` (channels shared by several layers, with its :class:`Producer` and
:class:`Consumer` members) and :class:`Skip` (a producer left alone, and why); and
:func:`layer_width`, the number of units a producer layer has."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BlockSpec:
    """Where one compressible block lives in a model (module paths, by qualified name)."""

    producer: str
    consumer: str
    bn: str | None  # BatchNorm folded into the producer
    between: tuple[str, ...]  # the ops on the path besides BatchNorm and the ReLU, for reports
    flatten: bool  # conv producer read by a Linear through a flatten (or a global mean)
    activation: str = "relu"  # relu, relu6, gelu, silu, hardswish or leaky_relu:<slope>

    @property
    def producers(self) -> tuple[Producer, ...]:
        return (Producer(self.producer, self.bn),)


@dataclass(frozen=True)
class Producer:
    """A layer writing into a channel group, with the BatchNorm folded into it."""

    layer: str
    bn: str | None


@dataclass(frozen=True)
class Consumer:
    """A layer reading a channel group: its input channels are ``segments`` in order, each
    (group name, width) or (None, width) for channels of no group (width None: whatever the
    layer's input has besides the others); the group is ``segments[index]``. ``flatten``:
    a Linear reading the channels through a flatten of (C, H, W) or a global mean."""

    layer: str
    segments: tuple[tuple[str | None, int | None], ...]
    index: int
    flatten: bool


@dataclass(frozen=True)
class GroupSpec:
    """Channels shared by several layers, clustered once and merged in every member.

    Every producer writes all n channels (their sum, product, or the same channels reached
    through residual additions and channel-wise ops); every consumer reads them (possibly as
    a range of a concatenation); ``channelwise`` are depthwise convolutions (with their
    BatchNorm) on the way, whose per-channel filters merge with the channels. Named by its
    first producer, like a block (``producer``, ``consumer`` and ``bn`` give the first
    members, for code that handles blocks).
    """

    producers: tuple[Producer, ...]
    consumers: tuple[Consumer, ...]
    channelwise: tuple[Producer, ...]
    activation: str  # "relu", "identity", or the channel-wise ops joined by "+"
    between: tuple[str, ...]  # additions, concatenations, pools, for reports

    @property
    def producer(self) -> str:
        return self.producers[0].layer

    @property
    def consumer(self) -> str:
        return self.consumers[0].layer

    @property
    def bn(self) -> str | None:
        return self.producers[0].bn

    @property
    def flatten(self) -> bool:
        return self.consumers[0].flatten

    @property
    def layers(self) -> tuple[str, ...]:
        """Every member layer, producers first."""
        names = [p.layer for p in self.producers] + [c.layer for c in self.channelwise]
        return tuple(names + [c.layer for c in self.consumers if c.layer not in names])


@dataclass(frozen=True)
class Skip:
    """A producer layer that is not compressed, and why."""

    layer: str
    reason: str
    refused: bool = False  # an op on the path the method cannot reason about


def layer_width(module: nn.Module) -> int:
    """The number of units of a Linear (output features) or Conv2d (output channels) layer."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels
