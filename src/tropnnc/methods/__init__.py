"""Registry of compression methods (one module each)."""

from __future__ import annotations

import inspect

from ._base import Method

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def methods() -> list[str]:
    """The names of all registered methods. ``compress(model, keep)`` without a method runs
    the default pipeline (``tropnnc.api.DEFAULT_PIPELINE``: ``adaptive`` followed by the
    least-squares reconstruction); ``"tropnnc"`` is the paper's algorithm alone."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; valid methods: {', '.join(methods())}"
        ) from None


def get_method(name: str, **options: object) -> Method:
    """Instantiate method ``name`` with ``options``; unknown options give a TypeError."""
    cls = method_class(name)
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"method {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    return cls(**options)


# Importing the modules registers them.
from . import (  # noqa: E402,F401
    adaptive,
    cup,
    l1,
    model_folding,
    neural_path_kmeans,
    neuron_merging,
    random,
    srinivas_babu,
    thinet,
    tropnnc,
    zonotope_kmeans,
)

__all__ = ["Method", "get_method", "method_class", "methods", "register"]
