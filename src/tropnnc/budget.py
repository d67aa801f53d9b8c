"""Budgeted non-uniform compression: choose every block's width from a parameter/MAC budget.

The budget is a fraction of the *compressible layers*: every Linear/Conv2d layer that is the
producer or the consumer of a compressed block, or a member of a compressed channel group
(its producers, depthwise members and readers; with ``budget=...`` every discovered block and
group is compressed). Their parameters are weights plus biases, a BatchNorm folded into a
producer counting as that producer's bias (as in the compressed model); their MACs are
counted analytically like :func:`tropnnc.counting.count_macs`. Layer counts are bilinear in
the widths: a layer's output width is a block's width or fixed, its input width a sum of
the widths of the blocks it reads (several for a reader of a concatenation) plus fixed
channels, so removing one unit of block l saves its producer rows (whose length depends on
the width of the blocks they read) and its consumer slices (whose height depends on the
width of the block they write), and every saving is computed exactly from the shapes at the
current widths. A depthwise member holds one kernel per unit, whatever the width. Below,
"block" means a block or a channel group.

A :class:`Budget` names the fraction, the unit, the allocator and the width constraints.
Two kinds of allocator:

* ``tropnnc`` curves: for each block, the certificate curve e_l(K), K = 1..n, is the tropnnc
  clustering objective sum_i m_i r_i (r_i = sin of the angle between unit i's direction and
  its cluster's direction u = normalize(sum m_i d_i), 1 when the cosine is negative; with
  norm='l1' this is the merge certificate, the bound on one block's output error summed over
  outputs, without the input-radius factor rho) divided by sum_i m_i.
  It is measured along one agglomerative hierarchy per layer (see :func:`agglomerate`), on the
  block's original weights (before any other block is merged), dead units dropping first at no
  cost. Widths are then allocated greedily: starting from the full widths, repeatedly shrink
  the block whose next step raises its normalised certificate least per parameter (or MAC)
  saved, until the count is at most budget * total. The increments are taken from the lower
  convex envelope of each curve, so a noisy step cannot hide cheaper steps behind it. A heap
  with lazily refreshed entries makes each step O(log L) for L blocks. The ``tropnnc-log``
  variant runs the same greedy on -log(1 - e_l(K)), i.e. it maximises the product over blocks
  of the fraction of mass each one keeps.

  Floors. The plain sum of normalised certificates (``tropnnc-sum``) can empty a layer: e_l
  saturates near 1, so taking a layer down to one or two units costs at most 1 in the sum,
  and when its curve is close to linear (random-like directions) every step of it costs the
  same per unit saved, so the greedy takes all of them; shrinking a block also lowers the
  per-unit savings of its neighbours (the counts are bilinear in the widths), so the same
  block stays the cheapest one. The curves are measured on each layer alone and cannot see
  that a layer of two units is a bottleneck for every layer after it (zoo vgg16 at half its
  MACs: 256 -> 1 channels). ``tropnnc`` and ``tropnnc-log`` therefore give no block less than
  FLOOR_FRACTION of the width uniform compression gives it at the same budget (the largest
  keep ratio u whose widths meet the budget, ``Allocation.uniform_keep``); those floors meet
  the budget by construction, so the budget never forces a block below them.
* A method's own rule (``allocator='method'``), which the method supplies through
  :meth:`tropnnc.methods.Method.own_allocation`: either one of the curve allocators above
  (with the method's :meth:`~tropnnc.methods.Method.curve_norm`), or a
  :class:`ThresholdRule`, one global threshold over per-block merge heights (e.g. the
  heights of a Ward linkage of the units): at threshold t a block keeps
  K_l(t) = n_l - #{merge heights <= t} units (dead units have height 0). The count is
  monotone in t, so a bisection over the sorted merge heights finds the smallest t whose
  widths meet the budget.

``min_width`` bounds every width from below and ``round_to`` restricts widths to multiples of
it (or the full width), for hardware-friendly shapes. The greedy allocation ends at most one
step (one unit, or ``round_to`` units) below the target, so the gap is bounded by the largest
per-step saving, reported as ``Allocation.max_step_saving``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .block import Block
from .cluster import cosine_gram
from .counting import infer_example_inputs, output_positions
from .graph import BlockSpec, Consumer, GroupSpec, layer_width
from .surgery import extract, get_module, read_range

__all__ = [
    "Allocation",
    "Budget",
    "LayerAllocation",
    "ThresholdRule",
    "agglomerate",
    "allocate",
    "certificate_curve",
    "compressible_count",
    "ward_curve",
]

UNITS = ("params", "macs")
#: the greedy allocators on certificate curves (see :func:`allocate`)
CURVE_ALLOCATORS = ("tropnnc", "tropnnc-log", "tropnnc-sum")
ALLOCATORS = (*CURVE_ALLOCATORS, "method")
#: no block narrower than this fraction of the width uniform compression gives it at the
#: same budget (greedy allocators but ``tropnnc-sum``)
FLOOR_FRACTION = 0.25
_TINY = np.finfo(np.float64).tiny
_WARD_ROWS = 256  # rows per chunk when the Ward costs are made from the cosines


@dataclass(frozen=True)
class Budget:
    """What ``compress(model, budget=...)`` keeps: ``fraction`` in (0, 1] of the params
    (``unit='params'``) or MACs (``'macs'``) of the compressible layers, with per-block
    widths chosen by ``allocator`` (None: the method's own rule when it has one, else
    ``'tropnnc'``; see :func:`allocate`), every width at least ``min_width`` and a multiple
    of ``round_to`` or the full width. Checked when made: a bad value fails here."""

    fraction: float
    unit: str = "params"
    allocator: str | None = None
    min_width: int = 1
    round_to: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "fraction", _check_budget(self.fraction))
        _check_unit(self.unit)
        _check_int("min_width", self.min_width)
        _check_int("round_to", self.round_to)
        if self.allocator is not None and self.allocator not in ALLOCATORS:
            raise ValueError(
                f"allocator must be one of {', '.join(map(repr, ALLOCATORS))} or None, "
                f"got {self.allocator!r}"
            )


@dataclass(frozen=True)
class ThresholdRule:
    """A method's own allocation by one global threshold t over all blocks: ``heights(block)``
    gives, ascending, the heights at which the block's units merge (0 for a dead unit); at
    t a block of n units keeps n - #{heights <= t}, and the smallest t whose widths meet the
    budget wins. ``name`` is reported as ``Allocation.allocator``."""

    name: str
    heights: Callable[[Block], np.ndarray]


@dataclass(frozen=True)
class LayerAllocation:
    """The width chosen for one block or channel group (named by its (first) producer)."""

    layer: str
    units: int  # width before compression
    width: int  # width chosen
    certificate: float  # normalised certificate curve e_l(width), in [0, 1]
    #: params or MACs of the layers writing its units at the chosen widths (a block's
    #: producer; a group's producers and depthwise members)
    count: int
    share: float  # count / Allocation.achieved (the output layer is no block's producer)
    floor: int  # smallest width the allocator could give this block (see Allocation)


@dataclass(frozen=True)
class Allocation:
    """A budgeted allocation of widths, and what it achieves.

    ``total``: params or MACs of the compressible layers at full width; ``target`` =
    budget * total; ``achieved``: the count at the chosen widths (<= target).
    ``max_step_saving`` bounds target - achieved for the greedy allocator. ``threshold``:
    the global merge height chosen (a method's :class:`ThresholdRule` only).
    ``uniform_keep``: the largest keep ratio u whose uniform widths (each block's smallest
    allowed width >= u n_l) meet the budget; the greedy allocators but ``tropnnc-sum`` give
    no block less than its allowed width at FLOOR_FRACTION * u (its ``floor``).
    ``curves``: e_l(K), K = 1..n.
    """

    unit: str
    budget: float
    allocator: str  # "tropnnc-curves", "tropnnc-log-curves", ... or a ThresholdRule's name
    total: int
    target: float
    achieved: int
    max_step_saving: int
    min_width: int
    round_to: int
    threshold: float | None
    uniform_keep: float | None
    layers: list[LayerAllocation]
    curves: dict[str, list[float]] = field(repr=False)

    @property
    def widths(self) -> dict[str, int]:
        """Width per producer layer, in forward order."""
        return {a.layer: a.width for a in self.layers}


# --------------------------------------------------------------------------------------------
# certificate curves
# --------------------------------------------------------------------------------------------


def agglomerate(
    directions: Tensor | np.ndarray, mass: Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted Ward agglomeration on the sphere, with the exact objective along the way.

    ``directions`` (n, D) unit rows d_i, ``mass`` (n,) weights m_i > 0. Clusters are merged
    by the weighted Ward criterion M_A M_B / (M_A + M_B) ||mu_A - mu_B||^2 (mu: m-weighted
    mean direction): a squared surrogate of the increase of the merge certificate, zero
    for units pointing the same way. The objective sum_i m_i r_i of every partition along
    the hierarchy is computed exactly from Gram-space sums (u_C = normalize(sum_{i in C}
    m_i d_i)).

    Returns ``merges`` (n-1, 2): the pair (a, b), a < b, merged at each step, a cluster
    being labelled by its smallest member (b joins a), and ``cost`` (n,):
    cost[K-1] = the objective of the partition into K clusters (cost[n-1] = 0).
    """
    d = torch.as_tensor(np.asarray(directions, dtype=np.float64))
    return ward_curve((d @ d.T).numpy(), np.asarray(mass, dtype=np.float64))


def ward_curve(cosines: np.ndarray, mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`agglomerate` from the (n, n) cosines of the directions (float32 or float64;
    clipped to [-1, 1] in place) and the masses (n,).

    The merge order comes from the Ward costs alone (one float64 (n, n) matrix,
    Lance-Williams updates, nearest-neighbour bookkeeping); the objective is then replayed
    along it, each merge touching only the cosines between its two clusters.
    """
    m = np.asarray(mass, dtype=np.float64)
    n = m.size
    if n <= 1:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(n)
    g = np.clip(cosines, -1.0, 1.0, out=cosines)
    merges = _ward_merges(g, m)
    return merges, _replay(g, m, merges)


def _ward_merges(g: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The weighted Ward merges (n-1, 2) of the units with cosines ``g`` and masses ``m``,
    one at a time, cheapest first; a cluster is labelled (and its distances kept in the row
    of) its smallest member. Ward is reducible, so after a merge only the rows whose nearest
    neighbour was one of the two clusters need a new nearest neighbour."""
    n = m.size
    dist = np.empty((n, n))  # Ward costs of singletons, made in row chunks
    for s in range(0, n, _WARD_ROWS):
        e = min(n, s + _WARD_ROWS)
        ms = m[s:e, None]
        np.multiply(
            ms * m[None, :] / np.maximum(ms + m[None, :], _TINY),
            np.maximum(2.0 - 2.0 * g[s:e].astype(np.float64), 0.0),
            out=dist[s:e],
        )
    np.fill_diagonal(dist, np.inf)
    weight = m.copy()  # cluster masses M_c
    merges = np.zeros((n - 1, 2), dtype=np.int64)
    near = dist.argmin(axis=1)  # (n,) nearest neighbour
    near_d = dist[np.arange(n), near]
    gone = np.zeros(n, dtype=bool)  # merged into another cluster (its row and column stale)
    for step in range(n - 1):
        a = int(near_d.argmin())
        b = int(near[a])
        a, b = min(a, b), max(a, b)
        merges[step] = (a, b)
        ma, mb, dab = weight[a], weight[b], dist[a, b]
        new = (weight + ma) * dist[a]  # Lance-Williams, from rows (the matrix is symmetric)
        new += (weight + mb) * dist[b]
        new -= weight * dab
        new /= np.maximum(weight + (ma + mb), _TINY)
        gone[b] = True
        np.copyto(new, np.inf, where=gone)
        new[a] = np.inf
        dist[a] = new
        dist[:, a] = new  # column b is left stale: masked by ``gone`` where it is read
        weight[a] = ma + mb
        near_d[b] = np.inf
        stale = (near == a) | (near == b)
        stale &= ~gone
        stale[a] = True
        rows = stale.nonzero()[0]
        sub = dist[rows]
        np.copyto(sub, np.inf, where=gone)
        near[rows] = sub.argmin(axis=1)
        near_d[rows] = sub[np.arange(rows.size), near[rows]]
        better = new < near_d
        np.copyto(near, a, where=better)
        np.copyto(near_d, new, where=better)
    return merges


def _replay(g: np.ndarray, m: np.ndarray, merges: np.ndarray) -> np.ndarray:
    """The objective sum_i m_i r_i after every merge of ``merges`` (cost[K-1] for K
    clusters), from <d_i, S_C> of each unit with its cluster's sum, updated per merge from
    the cosines between the two clusters only."""
    n = m.size
    cost = np.zeros(n)
    members = [np.array([i]) for i in range(n)]
    inner = m.copy()  # <d_i, S_C(i)>
    s2 = m * m  # ||S_C||^2 per cluster label
    ccost = np.zeros(n)
    total = 0.0
    for step, (a, b) in enumerate(merges):
        ia, ib = members[a], members[b]
        sub = g[np.ix_(ia, ib)].astype(np.float64)  # (|A|, |B|) cosines
        to_b = sub @ m[ib]  # <d_i, S_B>, i in A
        inner[ia] += to_b
        inner[ib] += m[ia] @ sub
        s2[a] += s2[b] + 2.0 * float(m[ia] @ to_b)
        members[a] = both = np.concatenate([ia, ib])
        cos = inner[both] / math.sqrt(max(s2[a], _TINY))
        mm = m[both]
        resid = np.where(cos >= 0, mm * np.sqrt(np.maximum(1.0 - cos * cos, 0.0)), mm)
        merged = float(resid.sum())
        total += merged - ccost[a] - ccost[b]
        ccost[a], ccost[b] = merged, 0.0
        cost[n - 2 - step] = max(total, 0.0)
    return cost


def certificate_curve(block: Block, norm: str = "l2") -> Tensor:
    """Normalised certificate curve e(K), K = 1..n (entry K-1), of one block, float64.

    e(K) = sum_i m_i r_i / sum_i m_i along the hierarchy of :func:`agglomerate` over the live
    units (w_i != 0 and c_i != 0); dead units are dropped first at no cost, so e(K) = 0 for
    K >= the number of live units. Made non-increasing in K (a running maximum), since more
    units never have to cost more. Cost: one Gram matrix of the rows, as tropnnc's own
    clustering makes it (:func:`tropnnc.cluster.cosine_gram`: float32 for large blocks),
    plus O(n^2) vectorised work.
    """
    mass = block.unit_mass(norm).to(torch.float64)
    live = mass > 0
    rows, norms = block.weight, block.row_norms
    if not bool(live.all()):
        rows, norms = rows[live], norms[live]
    curve = np.zeros(block.n)
    if rows.shape[0] > 1:
        g = cosine_gram(rows, norms).cpu().numpy()
        _, cost = ward_curve(g, mass[live].cpu().numpy())
        del g
        total = float(mass.sum())
        if total > 0:
            curve[: cost.size] = cost / total
    curve = np.maximum.accumulate(curve[::-1])[::-1]  # e(K-1) >= e(K)
    return torch.from_numpy(np.clip(curve, 0.0, 1.0))


def _lower_hull(values: np.ndarray) -> np.ndarray:
    """Lower convex envelope of the points (K, values[K-1]), evaluated at every K."""
    n = values.size
    hull: list[int] = []
    for k in range(n):  # monotone chain, once per layer
        while len(hull) >= 2:
            i, j = hull[-2], hull[-1]
            if (values[j] - values[i]) * (k - i) >= (values[k] - values[i]) * (j - i):
                hull.pop()
            else:
                break
        hull.append(k)
    return np.interp(np.arange(n), hull, values[hull])


# --------------------------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """The compressible layers as arrays, linear in the block widths k (B,) on each side:
    out = out_fixed + writes @ k units, in = in_fixed + reads @ k inputs per output unit,
    count = coef * out * in + bias * out per layer."""

    names: list[str]  # every member layer once, in the order of the specs
    out_fixed: np.ndarray  # (L,) output units of no block (0 for a layer that writes one)
    writes: np.ndarray  # (L, B) 1 where the layer writes block b (producer, depthwise member)
    in_fixed: np.ndarray  # (L,) inputs per output unit from no block (a depthwise member: 1)
    reads: np.ndarray  # (L, B) inputs per unit of block b (H*W after flatten, else 1; 0: none)
    coef: np.ndarray  # (L,) kernel size (params) or kernel size * output positions (MACs)
    bias: np.ndarray  # (L,) 1 when the layer carries a bias (params only)

    def counts(self, widths: np.ndarray, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Counts at block widths ``widths`` (B,) of the layers ``rows`` (default: all,
        (L,))."""
        k = np.asarray(widths, dtype=np.int64)
        out = self.out_fixed[rows] + self.writes[rows] @ k
        inn = self.in_fixed[rows] + self.reads[rows] @ k
        return self.coef[rows] * out * inn + self.bias[rows] * out

    def count(self, widths: np.ndarray) -> int:
        return int(self.counts(widths).sum())

    def touches(self) -> np.ndarray:
        """(L, B) whether the layer's count depends on block b's width."""
        return (self.writes != 0) | (self.reads != 0)


def _layout(
    model: nn.Module, specs: list[BlockSpec | GroupSpec], unit: str, inputs: Tensor | None
) -> _Layout:
    """The layout of the member layers of ``specs`` in ``model`` at the widths it has now:
    a block's producer and consumer; a group's producers, depthwise members and readers (a
    reader of a concatenation reads several groups, and fixed channels besides them). A
    layer in several specs (a block's producer reading a residual stream) is listed once."""
    members: list[str] = []  # every member layer, in the order of the specs
    wrote: list[tuple[str, int, bool]] = []  # (layer, block, BatchNorm folded into it)
    read: list[tuple[str, int, int]] = []  # (layer, block, inputs per unit of the block)
    for b, s in enumerate(specs):
        writers = s.producers + (s.channelwise if isinstance(s, GroupSpec) else ())
        if isinstance(s, GroupSpec):
            readers = [(c.layer, b, _reads_per_unit(model, c)) for c in s.consumers]
        else:
            consumer = get_module(model, s.consumer)
            units = layer_width(get_module(model, s.producer))
            per = consumer.in_features // units if isinstance(consumer, nn.Linear) else 1
            readers = [(s.consumer, b, per)]
        wrote += [(p.layer, b, p.bn is not None) for p in writers]
        read += readers
        members += [p.layer for p in writers] + [name for name, _, _ in readers]
    names = list(dict.fromkeys(members))
    index = {name: i for i, name in enumerate(names)}
    size = len(names)
    writes = np.zeros((size, len(specs)), dtype=np.int64)  # (L, B)
    reads = np.zeros((size, len(specs)), dtype=np.int64)  # (L, B)
    folded = np.zeros(size, dtype=bool)  # (L,)
    for name, b, bn in wrote:
        writes[index[name], b] = 1
        folded[index[name]] |= bn
    for name, b, per in read:
        reads[index[name], b] = per
    mods = [get_module(model, name) for name in names]
    width = np.array([layer_width(get_module(model, s.producer)) for s in specs], dtype=np.int64)
    out_dim = np.array([layer_width(mod) for mod in mods], dtype=np.int64)
    in_dim = np.array(  # inputs per output unit (a depthwise convolution's: 1)
        [
            mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels // mod.groups
            for mod in mods
        ],
        dtype=np.int64,
    )
    kernel = np.array(
        [1 if isinstance(mod, nn.Linear) else math.prod(mod.kernel_size) for mod in mods],
        dtype=np.int64,
    )
    if unit == "params":
        bias = np.array(
            [mod.bias is not None or f for mod, f in zip(mods, folded, strict=True)], dtype=np.int64
        )
        coef = kernel
    else:
        positions = output_positions(model, inputs)
        coef = kernel * np.array([positions[name] for name in names], dtype=np.int64)
        bias = np.zeros(size, dtype=np.int64)
    return _Layout(
        names, out_dim - writes @ width, writes, in_dim - reads @ width, reads, coef, bias
    )


def _reads_per_unit(model: nn.Module, consumer: Consumer) -> int:
    """Inputs per output unit that ``consumer`` reads from each channel of its group: the
    positions of a flatten for a Linear (else 1); a convolution's kernel is in its coef."""
    if isinstance(get_module(model, consumer.layer), nn.Linear):
        return read_range(model, consumer)[2]
    return 1


def _inputs_for(model: nn.Module, unit: str, example_inputs: Tensor | None) -> Tensor | None:
    if unit != "macs":
        return None
    inputs = example_inputs if example_inputs is not None else infer_example_inputs(model)
    if inputs is None:
        raise ValueError(
            f"counting MACs (unit='macs') needs the input shape of {type(model).__name__}: "
            "set model.input_shape (one sample, e.g. (3, 32, 32)) or pass "
            "example_inputs=<a batch of inputs>"
        )
    return inputs


def compressible_count(
    model: nn.Module,
    specs: list[BlockSpec | GroupSpec],
    unit: str = "params",
    example_inputs: Tensor | None = None,
) -> int:
    """Params or MACs of the compressible layers of ``model`` (the producers and consumers
    of ``specs``, every member of a channel group), at the widths the model has now (works
    on a compressed copy too: module paths are unchanged). A producer (or depthwise member)
    followed by a BatchNorm counts its folded bias."""
    _check_unit(unit)
    layout = _layout(model, specs, unit, _inputs_for(model, unit, example_inputs))
    widths = np.array([layer_width(get_module(model, s.producer)) for s in specs], dtype=np.int64)
    return layout.count(widths)


# --------------------------------------------------------------------------------------------
# allocation
# --------------------------------------------------------------------------------------------


def _check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise ValueError(f"budget unit must be one of {', '.join(map(repr, UNITS))}, got {unit!r}")


def _check_budget(budget: object) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a number in (0, 1], got {budget!r}")
    value = float(budget)
    if not (0.0 < value <= 1.0):
        raise ValueError(
            f"budget {budget} must be in (0, 1]: the fraction of the compressible "
            "layers' parameters (or MACs) to keep"
        )
    return value


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _allowed(n: int, min_width: int, round_to: int) -> np.ndarray:
    """Widths a block of n units may take, descending: n, then multiples of round_to that
    are >= min_width (all of them when round_to = 1); just n when none is below n."""
    low = max(min_width, 1)
    low = -(-low // round_to) * round_to
    steps = np.arange(low, n, round_to, dtype=np.int64) if low < n else np.zeros(0, np.int64)
    return np.concatenate([[n], steps[::-1]]).astype(np.int64)


def allocate(
    model: nn.Module,
    specs: list[BlockSpec | GroupSpec],
    budget: Budget,
    *,
    norm: str = "l2",
    own: str | ThresholdRule | None = None,
    example_inputs: Tensor | None = None,
) -> Allocation:
    """Choose the width of every block in ``specs`` so the compressible layers of ``model``
    keep at most ``budget.fraction`` of their params or MACs (``budget.unit``).

    ``budget.allocator``: ``'tropnnc'`` (greedy on tropnnc certificate curves, for any
    method, so methods compare at equal budgets, with no block pushed beyond the
    certificate cap), ``'tropnnc-log'`` (the same on -log(1 - e)), ``'tropnnc-sum'`` (the
    plain greedy on the sum of the curves, without the cap: it can empty a layer),
    ``'method'`` (``own``, the method's own rule: the name of one of the allocators above,
    or a :class:`ThresholdRule`), or None: ``own`` when given, ``'tropnnc'`` otherwise.
    ``norm``: the norm of the output slices in the curves' unit masses (the method's
    :meth:`~tropnnc.methods.Method.curve_norm`). The curves are computed on the original
    weights of each block (a channel group: the one block of all its members that
    :func:`~tropnnc.surgery.extract_group` makes, as the methods merge it).
    """
    rule = _rule(budget.allocator, own)
    unit, min_width, round_to = budget.unit, budget.min_width, budget.round_to
    layout = _layout(model, specs, unit, _inputs_for(model, unit, example_inputs))
    full = np.array([layer_width(get_module(model, s.producer)) for s in specs], dtype=np.int64)
    allowed = [_allowed(int(n), min_width, round_to) for n in full]
    total = layout.count(full)
    target = budget.fraction * total
    floors = np.array([a[-1] for a in allowed], dtype=np.int64)
    floor = layout.count(floors)
    if floor > target:
        extra = f", round_to={round_to}" if round_to > 1 else ""
        raise ValueError(
            f"budget {budget.fraction} is below {floor / total:.6g}, the smallest fraction "
            f"of the compressible layers' {unit} that the minimum widths allow "
            f"(min_width={min_width}{extra}: {floor} of {total})"
        )
    # one block at a time: only one block's float copies are alive while its curve is made
    curves = [certificate_curve(extract(model, s), norm).numpy() for s in specs]
    threshold = uniform = None
    if isinstance(rule, ThresholdRule):
        widths, threshold = _threshold_widths(model, specs, allowed, layout, target, rule)
        name = rule.name
    else:
        if rule != "tropnnc-sum":
            uniform = _uniform_keep(allowed, layout, target)
            floors = _uniform_widths(allowed, FLOOR_FRACTION * uniform)
        if rule == "tropnnc-log":  # maximise the product of the fractions of mass kept
            costs = [-np.log(np.maximum(1.0 - c, 1e-12)) for c in curves]
        else:
            costs = curves
        widths = _greedy(costs, allowed, layout, target, floors)
        name = f"{rule}-curves"
    counts = layout.counts(widths)
    achieved = int(counts.sum())
    written = layout.writes.T @ counts  # (B,) counts of the layers writing each block
    layers = [
        LayerAllocation(
            s.producer,
            int(full[b]),
            int(widths[b]),
            float(curves[b][widths[b] - 1]),
            int(written[b]),
            float(written[b]) / max(achieved, 1),
            int(floors[b]),
        )
        for b, s in enumerate(specs)
    ]
    return Allocation(
        unit,
        budget.fraction,
        name,
        total,
        target,
        achieved,
        _max_step_saving(allowed, layout, full),
        min_width,
        round_to,
        threshold,
        uniform,
        layers,
        {s.producer: c.tolist() for s, c in zip(specs, curves, strict=True)},
    )


def _rule(allocator: str | None, own: str | ThresholdRule | None) -> str | ThresholdRule:
    """The rule to run: a curve allocator's name, or the method's own rule ``own``."""
    if allocator not in (None, "method"):
        return allocator
    if own is None:
        if allocator == "method":
            raise ValueError("allocator='method' needs the method's own rule (own=...)")
        return "tropnnc"
    if not isinstance(own, ThresholdRule) and own not in CURVE_ALLOCATORS:
        raise ValueError(
            f"a method's own allocator must be a ThresholdRule or one of "
            f"{', '.join(map(repr, CURVE_ALLOCATORS))}, got {own!r}"
        )
    return own


def _uniform_widths(allowed: list[np.ndarray], keep: float) -> np.ndarray:
    """Per block, the smallest allowed width >= keep * n (the full width n always is); the
    ratios a / n are compared with a relative tolerance, so keep = a / n gives exactly a."""
    bound = keep * (1.0 - 1e-12)
    return np.array([a[np.nonzero(a / a[0] >= bound)[0][-1]] for a in allowed], dtype=np.int64)


def _uniform_keep(allowed: list[np.ndarray], layout: _Layout, target: float) -> float:
    """The largest keep ratio u whose uniform widths (:func:`_uniform_widths`) meet the
    target: bisection over the ratios a / n at which some block's width changes (the count
    grows with u; at u = 0 every block has its smallest allowed width, which meets it)."""
    ratios = np.unique(np.concatenate([[0.0]] + [a / a[0] for a in allowed]))
    lo, hi = 0, ratios.size - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if layout.count(_uniform_widths(allowed, float(ratios[mid]))) <= target:
            lo = mid
        else:
            hi = mid - 1
    return float(ratios[lo])


def _max_step_saving(allowed: list[np.ndarray], layout: _Layout, full: np.ndarray) -> int:
    """The largest saving of one allocation step of any block, at full widths.

    A block's count is linear in its own width when the others are fixed, and its per-unit
    saving only shrinks as the other widths do, so (largest step in units) x (per-unit saving
    at full widths) bounds every step the allocation can take: the gap below the target.
    """
    base = layout.count(full)
    best = 0
    for b, a in enumerate(allowed):
        if a.size > 1:
            k = full.copy()
            k[b] -= 1
            best = max(best, int(np.diff(-a).max()) * (base - layout.count(k)))
    return int(best)


def _greedy(
    curves: list[np.ndarray],
    allowed: list[np.ndarray],
    layout: _Layout,
    target: float,
    floors: np.ndarray,
) -> np.ndarray:
    """Shrink blocks one allowed step at a time, cheapest certificate increase per unit of
    count saved first, none below its width in ``floors``, until the count is at most
    ``target`` (the floors meet it). Lazy heap over blocks."""
    hulls = [_lower_hull(c) for c in curves]
    last = [int(np.nonzero(a == f)[0][0]) for a, f in zip(allowed, floors, strict=True)]
    widths = np.array([a[0] for a in allowed], dtype=np.int64)
    pos = np.zeros(len(allowed), dtype=np.int64)
    version = np.zeros(len(allowed), dtype=np.int64)
    touches = layout.touches()  # (L, B)
    layer_of = [np.nonzero(touches[:, b])[0] for b in range(len(allowed))]
    # blocks sharing a layer with block b: their savings change when b shrinks
    touching = [np.nonzero(touches[lay].any(axis=0))[0] for lay in layer_of]

    def delta(b: int, width: int) -> int:
        """Change of the count when block b moves to ``width`` (the others unchanged)."""
        lay, now = layer_of[b], widths[b]
        before = layout.counts(widths, lay).sum()
        widths[b] = width
        after = layout.counts(widths, lay).sum()
        widths[b] = now
        return int(after - before)

    def saving(b: int) -> int:
        return -delta(b, allowed[b][pos[b] + 1])

    heap: list[tuple[float, int, int, int]] = []

    def push(b: int) -> None:
        if pos[b] >= last[b]:
            return
        save = saving(b)
        rise = hulls[b][allowed[b][pos[b] + 1] - 1] - hulls[b][widths[b] - 1]
        heapq.heappush(heap, (max(rise, 0.0) / save, -save, b, int(version[b])))

    for b in range(len(allowed)):
        push(b)
    count = layout.count(widths)
    while count > target and heap:
        _, neg_save, b, ver = heapq.heappop(heap)
        if ver != version[b]:
            continue
        pos[b] += 1
        widths[b] = allowed[b][pos[b]]
        count += neg_save
        for c in touching[b]:  # b itself among them
            version[c] += 1
            push(int(c))
    # The last step may overshoot by up to one (large) unit: give steps back while they fit,
    # the largest certificate decrease per unit of count first (O(blocks) per step).
    while True:
        best, best_gain, best_grow = -1, 0.0, 0
        for b in range(len(allowed)):
            if pos[b] == 0:
                continue
            wider = allowed[b][pos[b] - 1]
            grow = delta(b, wider)
            if count + grow > target:
                continue
            gain = (hulls[b][widths[b] - 1] - hulls[b][wider - 1]) / grow
            if best < 0 or gain > best_gain:
                best, best_gain, best_grow = b, gain, grow
        if best < 0:
            return widths
        pos[best] -= 1
        widths[best] = allowed[best][pos[best]]
        count += best_grow


def _threshold_widths(
    model: nn.Module,
    specs: list[BlockSpec | GroupSpec],
    allowed: list[np.ndarray],
    layout: _Layout,
    target: float,
    rule: ThresholdRule,
) -> tuple[np.ndarray, float]:
    """One global threshold: bisection over the sorted merge heights of all blocks (from
    ``rule``) for the smallest t whose widths K_l(t) (clamped to the allowed widths) meet
    the target."""
    events = []
    sizes = []
    for spec in specs:
        block = extract(model, spec)
        sizes.append(block.n)
        events.append(rule.heights(block))
    ascending = [a[::-1] for a in allowed]

    def widths_at(t: float) -> np.ndarray:
        k = np.array(
            [n - np.searchsorted(e, t, side="right") for n, e in zip(sizes, events, strict=True)],
            dtype=np.int64,
        )
        k = np.maximum(k, [a[0] for a in ascending])
        return np.array(
            [a[min(np.searchsorted(a, w), a.size - 1)] for a, w in zip(ascending, k, strict=True)],
            dtype=np.int64,
        )

    candidates = np.concatenate([[-np.inf], np.unique(np.concatenate(events))])
    lo, hi = 0, candidates.size - 1  # count(candidates[hi]) <= target is checked by caller
    while lo < hi:
        mid = (lo + hi) // 2
        if layout.count(widths_at(candidates[mid])) <= target:
            hi = mid
        else:
            lo = mid + 1
    t = float(candidates[lo])
    return widths_at(t), t
