"""The channel spaces of group analysis: one per producer, merged (union-find) when an
addition, a product or a shared reader joins them."""

from __future__ import annotations

from .specs import Producer


class _Space:
    """The channels of one producer during group analysis; spaces joined by an addition,
    a product or a shared reader are merged (union-find)."""

    def __init__(self, width: int, order: int) -> None:
        self.parent = self
        self.width = width
        self.order = order
        self.producers: list[tuple[int, Producer]] = []
        self.channelwise: list[tuple[int, Producer]] = []
        self.consumers: list[tuple[int, str, tuple, int, bool]] = []
        self.acts: set[str] = set()
        self.ops: list[str] = []
        self.blocked: tuple[str, bool] | None = None  # (reason, refused)
        self.gated = False

    def find(self) -> _Space:
        root = self
        while root.parent is not root:
            root = root.parent
        self.parent = root
        return root

    def block(self, reason: str, refused: bool = False) -> None:
        root = self.find()
        if root.blocked is None:
            root.blocked = (reason, refused)


def _union(a: _Space, b: _Space, label: str) -> _Space:
    a, b = a.find(), b.find()
    if a is b:
        return a
    if a.width != b.width:
        a.block(f"is combined with {b.width} other channels by {label}")
    if b.order < a.order:
        a, b = b, a
    b.parent = a
    a.producers += b.producers
    a.channelwise += b.channelwise
    a.consumers += b.consumers
    a.acts |= b.acts
    a.ops += b.ops
    a.gated |= b.gated
    if a.blocked is None:
        a.blocked = b.blocked
    return a
