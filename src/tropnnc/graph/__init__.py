"""Block discovery: find producer -> ReLU -> [pass-through ops] -> consumer chains with torch.fx.

Works on any module torch.fx can trace. A chain qualifies when every tensor on it has
exactly one user (so no unit also feeds a residual addition or a concatenation; shape
queries such as ``x.size(0)`` do not count), the producer and consumer are ungrouped
Linear/Conv2d layers each called once, and every op in between is channel-wise and
positively homogeneous (max/avg/adaptive pools, dropout, flatten of the non-batch dims).
Max pools and dropout may also sit between the producer (or its BatchNorm) and the ReLU:
they commute with it. Everything else is reported as a :class:`Skip` with the reason;
``refused`` marks the cases strict mode turns into errors (an op on the path the method
cannot reason about), as opposed to layers left alone by design (residual streams, the
output layer).

One job a file, in the order discovery runs:

* :mod:`.tracing`: tracing with torch.fx, and the layers that read an input as it is;
* :mod:`.groups`: channel groups (residual streams, concatenations, depthwise chains,
  squeeze-and-excitation gates) over :mod:`.spaces` (union-find of channel spaces), turned
  into specs by :mod:`.group_specs`;
* :mod:`.blocks`: the plain producer -> activation -> consumer walk, with :mod:`.skips` saying
  why a walk stops;
* :mod:`.discovery`: :func:`discover`, groups first, then blocks;
* :mod:`.specs`: what it returns (BlockSpec, GroupSpec, Producer, Consumer, Skip);
* :mod:`.norms`: token norms (LayerNorm/RMSNorm) and the Linear layers reading them, whose
  input they bound; :mod:`.attention`: attention modules whose heads can be narrowed;
* helpers: :mod:`._ops` (the op tables), :mod:`._nodes` (what one fx node does).
"""

from __future__ import annotations

from .discovery import discover
from .norms import norm_radius, norm_readers
from .specs import BlockSpec, Consumer, GroupSpec, Producer, Skip, layer_width
from .tracing import TraceError, input_readers, reads_directly, trace

__all__ = [
    "BlockSpec",
    "Consumer",
    "GroupSpec",
    "Producer",
    "Skip",
    "TraceError",
    "discover",
    "input_readers",
    "layer_width",
    "norm_radius",
    "norm_readers",
    "reads_directly",
    "trace",
]
