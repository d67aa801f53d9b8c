"""External anchors for the sweeps: structured pruning from other libraries, run on the same
blocks at the same widths as the library's methods, without fine-tuning.

``torch-pruning``: Torch-Pruning's ``MagnitudePruner`` (optional dependency, extra
``anchor``: ``pip install tropnnc[anchor]``) with its ``MagnitudeImportance`` (L2 norm of
every weight of a channel's dependency group: the producer row, a BatchNorm's affine
parameters and the consumer columns), local (per-layer) pruning in one step. Each block
named in the keep mapping keeps K = max(1, round(keep * n)) of its n units, as
``tropnnc.compress`` would; every other Linear/Conv2d layer is left whole. The result is a
:class:`tropnnc.api.CompressionResult` without block reports (no certificate).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..api import CompressionResult, _widths
from ..counting import count_macs, count_params, infer_example_inputs
from ..graph import discover, layer_width
from ..surgery import get_module

ANCHOR_EXTRA = "anchor"


def _import_tp():
    try:
        import torch_pruning
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "method 'torch-pruning' needs the optional dependency "
            f"torch-pruning: pip install 'tropnnc[{ANCHOR_EXTRA}]'"
        ) from err
    return torch_pruning


def torch_pruning(
    model: nn.Module,
    keep: Mapping[str, float | int],
    *,
    seed: int = 0,
    p: int = 2,
    example_inputs: torch.Tensor | None = None,
) -> CompressionResult:
    """Prune the producers named in ``keep`` (layer name -> keep fraction or width) of a
    copy of ``model`` with Torch-Pruning's magnitude pruner (``p``: the norm of its
    importance). ``seed`` is recorded only: the pruner is deterministic."""
    tp = _import_tp()
    inputs = example_inputs if example_inputs is not None else infer_example_inputs(model)
    if inputs is None:
        raise ValueError(
            f"method 'torch-pruning' needs the input shape of "
            f"{type(model).__name__}: set model.input_shape or pass example_inputs"
        )
    specs, _ = discover(model)
    widths = _widths(model, specs, keep)
    work = copy.deepcopy(model).eval()
    targets = {name: get_module(work, name) for name in widths}
    ratios = {}
    for name, mod in targets.items():
        n = layer_width(mod)
        # the pruner keeps int(n * (1 - ratio)) channels: aim half a channel above K
        ratios[mod] = 1.0 - (widths[name] + 0.5) / n
    ignored = [
        mod
        for mod in work.modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and all(mod is not t for t in targets.values())
    ]
    pruner = tp.pruner.MagnitudePruner(
        work,
        inputs,
        importance=tp.importance.MagnitudeImportance(p=p),
        global_pruning=False,
        pruning_ratio_dict=ratios,
        ignored_layers=ignored,
        iterative_steps=1,
    )
    pruner.step()
    got = {name: layer_width(mod) for name, mod in targets.items()}
    if got != widths:
        raise RuntimeError(f"torch-pruning pruned to {got}, expected {widths}")
    return CompressionResult(
        work,
        "torch-pruning",
        {"p": p, "global_pruning": False},
        seed,
        [],
        [],
        count_params(model),
        count_params(work),
        count_macs(model, inputs),
        count_macs(work, inputs),
    )


#: method specs run outside :func:`tropnnc.compress`: name -> f(model, keep mapping, seed=,
#: **options) -> CompressionResult
EXTERNAL: dict[str, Callable[..., CompressionResult]] = {"torch-pruning": torch_pruning}
