"""The default pipeline's merge: Model Folding on BatchNorm blocks, TropNNC elsewhere.

Measured (README "Results", results/expected-error): on blocks whose producer had BatchNorm,
Model Folding's clustering of [row, consumer slices] with its data-free repair (exact in mean
and std through the BN statistics) held up best at strong compression; on blocks without BN,
TropNNC's clustering of unit directions did. A ReLU channel group whose producers all had BN
(a ResNet stream) counts as a BN block, each producer's columns repaired with its own BN
(results/architectures). Followed by ``compress(reconstruct=...)``, as the default pipeline
runs it.
"""

from __future__ import annotations

import torch

from ..block import Block, Merge
from . import register
from ._base import Method
from .model_folding import ModelFolding
from .tropnnc import TropNNC


@register
class Adaptive(Method):
    """Per block: ``model-folding`` when the producer (every producer of a channel group) had
    BatchNorm, ``tropnnc`` otherwise.

    Takes the options of both: ``restarts`` and ``iters`` go to either, ``norm``,
    ``refine``, ``steps``, ``split_signs``, ``kernel`` and ``rows`` to tropnnc, ``features``,
    ``normalize`` and ``approx_repair`` to model-folding.
    """

    name = "adaptive"

    def __init__(
        self,
        *,
        restarts: int = 4,
        iters: int = 100,
        norm: str = "l2",
        refine: int = 0,
        steps: int = 1,
        split_signs: bool | None = None,
        kernel: str = "weights",
        rows: str = "directions",
        features: str = "both",
        normalize: bool | None = None,
        approx_repair: bool = True,
    ) -> None:
        self.restarts = restarts
        self.iters = iters
        self.norm = norm
        self.refine = refine
        self.steps = steps
        self.split_signs = split_signs
        self.kernel = kernel
        self.rows = rows
        self.features = features
        self.normalize = normalize
        self.approx_repair = approx_repair
        common = {"restarts": restarts, "iters": iters}  # both check their options here
        self._folding = ModelFolding(
            features=features, normalize=normalize, approx_repair=approx_repair, **common
        )
        self._tropnnc = TropNNC(
            norm=norm,
            refine=refine,
            steps=steps,
            split_signs=split_signs,
            kernel=kernel,
            rows=rows,
            **common,
        )

    def merge(self, block: Block, k: int, generator: torch.Generator) -> Merge:
        inner: Method = self._folding if has_batchnorm(block) else self._tropnnc
        return inner.merge(block, k, generator)


def has_batchnorm(block: Block) -> bool:
    """The block's producer had BatchNorm, or it is a ReLU channel group (a residual stream
    or a concatenation) whose every member is a layer with BatchNorm. Groups with depthwise
    members or other activations (MobileNet's expansions and linear bottlenecks) stay with
    TropNNC: not measured with Model Folding."""
    if block.members is not None:
        return block.activation == "relu" and all(
            m.bn is not None and not m.channelwise for m in block.members
        )
    return block.bn is not None
