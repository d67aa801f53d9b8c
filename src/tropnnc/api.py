"""The public entry point: ``compress(model, keep, method=...)``.

Discover blocks once on the input model, then on a deep copy compress them in forward order:
each block is read with the weights it has at that moment (so block l+1 is clustered on the
consumer already rewritten by block l), merged by the chosen method, certified, and written
back as smaller layers. The input model is never modified.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .block import Block, Merge, certificate, select
from .budget import Allocation, allocate
from .calibration import as_batches, capture_reads, consumer_targets, refit
from .counting import count_macs, count_params, infer_example_inputs
from .graph import BlockSpec, Skip, discover
from .methods import get_method
from .repair import bn_repair, check_repair
from .surgery import apply, extract, get_module

log = logging.getLogger(__name__)

Keep = float | int
KeySpec = Keep | Mapping[str, Keep]


@dataclass(frozen=True)
class BlockReport:
    """What happened to one block."""

    layer: str
    consumer: str
    units_before: int
    units_after: int
    certificate: float  # max over outputs of the bound on |y_j - y~_j| (NaN: none)
    certificate_sum: float  # the same bound summed over outputs
    radius: float
    method: str
    seconds: float
    data_driven: bool  # read calibration data (thinet, or a least-squares refit)
    assignment: list[int] = field(repr=False)
    shares: list[float] | None = field(repr=False)
    repaired: bool = False  # compress(repair=...) corrected the consumer bias
    repair_note: str | None = None  # why a requested repair was a no-op (None: not asked/done)


@dataclass
class CompressionResult:
    """The compressed model and its report."""

    model: nn.Module
    method: str
    options: dict[str, object]
    seed: int
    blocks: list[BlockReport]
    skipped: list[Skip]
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    allocation: Allocation | None = None  # budgeted widths (compress(budget=...)), else None

    def table(self) -> str:
        """A plain-text table of the per-block report."""
        lines = [f"{'layer':<24}{'units':>14}{'certificate':>14}{'seconds':>9}"]
        for b in self.blocks:
            lines.append(f"{b.layer:<24}{f'{b.units_before} -> {b.units_after}':>14}"
                         f"{b.certificate:>14.4g}{b.seconds:>9.3f}")
        for s in self.skipped:
            lines.append(f"{s.layer:<24}  skipped: {s.reason}")
        lines.append(f"parameters {self.params_before} -> {self.params_after}")
        if self.macs_before is not None:
            lines.append(f"MACs {self.macs_before} -> {self.macs_after}")
        if self.allocation is not None:
            a = self.allocation
            lines.append(f"budget {a.budget:g} of {a.unit} ({a.allocator}): "
                         f"{a.achieved} of {a.total} (target {a.target:.0f})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary of the report (without the model)."""
        return {
            "method": self.method, "options": self.options, "seed": self.seed,
            "blocks": [asdict(b) for b in self.blocks],
            "skipped": [asdict(s) for s in self.skipped],
            "params_before": self.params_before, "params_after": self.params_after,
            "macs_before": self.macs_before, "macs_after": self.macs_after,
            "allocation": None if self.allocation is None else asdict(self.allocation),
        }


def compress(model: nn.Module, keep: KeySpec | None = None, method: str = "tropnnc", *,
             seed: int = 0, example_inputs: torch.Tensor | None = None, strict: bool = False,
             radius: float = 1.0, calibration: torch.Tensor | Iterable[torch.Tensor] | None = None,
             budget: float | None = None, budget_unit: str = "params",
             allocator: str | None = None, min_width: int = 1, round_to: int = 1,
             repair: str | None = None, **options: object) -> CompressionResult:
    """Compress every compressible hidden layer of ``model`` without data.

    ``keep``: a float in (0, 1] is the fraction of units kept per block
    (K = max(1, round(keep * n))); an int is the width itself; a mapping from producer
    layer name to either compresses only the layers it names; None means 0.5, unless
    ``budget`` is given. ``budget``: instead of ``keep``, the fraction in (0, 1] of the
    parameters (``budget_unit='params'``) or MACs (``'macs'``) of the compressible layers
    (every Linear/Conv2d that is a producer or consumer of a block; all blocks are then
    compressed) to keep; per-block widths are chosen by :func:`tropnnc.budget.allocate`
    (``allocator``: 'tropnnc' certificate curves with per-block floors, 'tropnnc-log',
    'tropnnc-sum' (no floors), or 'method': the method's
    own, e.g. CUP's global threshold; every width >= ``min_width`` and a multiple of
    ``round_to`` or the full width) and reported in ``result.allocation``. ``method``: one of
    :func:`tropnnc.methods`; ``options`` go to the method. ``seed`` fixes every random
    choice. ``radius`` bounds the norm of each block's input for the certificates.
    ``strict`` turns a refused block (an op the method cannot reason about) into an error.
    ``example_inputs`` gives the input shape for MAC counts when the model does not.
    ``calibration``: unlabeled inputs (a tensor or an iterable of batches). Data-driven
    methods (``thinet``) need them; with any other method they trigger a least-squares
    refit of the consumer after the data-free merge (reported as data-driven, no
    certificate). ``repair="bn"``: after each share-form merge, shift the consumer's bias
    so its expected pre-activation is unchanged, modelling each unit's pre-activation as
    Gaussian with its BatchNorm's beta and |gamma| (:mod:`tropnnc.repair`; data-free; the
    shift is added to the certificate); a no-op, noted in the block's report, without BN
    statistics, for merges without shares, or when a calibration refit runs.
    ``repair="bn-var"`` also rescales each merged unit's consumer slices to keep the
    variance it feeds the consumer (same model; see :mod:`tropnnc.repair`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress: model must be a torch.nn.Module, got {type(model).__name__}")
    algo = get_method(method, **options)
    check_repair(repair)
    batches = None if calibration is None else as_batches(calibration)
    if algo.data_driven and batches is None:
        raise ValueError(f"method {method!r} is data-driven: pass calibration=<unlabeled "
                         "inputs> (a tensor or an iterable of batches)")
    _check_finite(model)
    specs, skipped = discover(model)
    if strict and any(s.refused for s in skipped):
        bad = next(s for s in skipped if s.refused)
        raise ValueError(f"compress(strict=True): cannot compress {bad.layer}: {bad.reason}")
    for s in skipped:  # an output layer or a residual branch is normal; a refusal is not
        log.log(logging.WARNING if s.refused else logging.INFO, "skipping %s: %s",
                s.layer, s.reason)
    if not specs:
        reasons = "; ".join(f"{s.layer}: {s.reason}" for s in skipped) or "no Linear/Conv2d"
        raise ValueError(f"compress: {type(model).__name__} has no compressible block "
                         f"(producer -> ReLU -> consumer): {reasons}")
    allocation = None
    if budget is not None:
        if keep is not None:
            raise ValueError("compress: pass either keep or budget, not both (with a budget "
                             "the per-layer widths are chosen by the allocator)")
        allocation = allocate(model, specs, budget, unit=budget_unit, method=method,
                              options=algo.options(), allocator=allocator,
                              min_width=min_width, round_to=round_to,
                              example_inputs=example_inputs)
        widths = allocation.widths
    else:
        if (min_width, round_to, allocator, budget_unit) != (1, 1, None, "params"):
            raise ValueError("compress: budget_unit, allocator, min_width and round_to apply "
                             "to a budget only; pass budget=...")
        widths = _widths(model, specs, 0.5 if keep is None else keep)
    if not algo.multi_output:
        _check_single_output(model, specs, widths, method)
    if radius <= 0 or not math.isfinite(radius):
        raise ValueError(f"compress: radius must be a positive number, got {radius}")

    inputs = example_inputs if example_inputs is not None else infer_example_inputs(model)
    # a block kept at full width without BatchNorm to fold, calibration or repair is left as
    # it is (the merge would be the identity): no copy of its layers, no consumer rewrite
    sizes = {s.producer: _units(get_module(model, s.producer)) for s in specs}
    whole = ({s.producer for s in specs if widths.get(s.producer) == sizes[s.producer]
              and s.bn is None} if batches is None and repair is None else set())
    work = _working_copy(model, specs, {n: k for n, k in widths.items() if n not in whole})
    # blocks stay on the weights' device (and GPU) for methods that merge there, unless a
    # calibration refit or a BN repair (CPU float64 code) runs
    on_device = (None if getattr(algo, "device_aware", False) and batches is None
                 and repair is None else "cpu")
    reports = []
    for spec in specs:
        if spec.producer not in widths:
            continue
        if spec.producer in whole:
            n = sizes[spec.producer]
            reports.append(BlockReport(spec.producer, spec.consumer, n, n, 0.0, 0.0, radius,
                                       method, 0.0, False, list(range(n)), [1.0] * n))
            continue
        start = time.perf_counter()
        generator = _generator(seed, spec.producer)
        block = extract(work, spec, radius, device=on_device)
        positions = None
        if batches is not None:
            reads, positions = capture_reads(work, spec, batches, None, generator)
            block = replace(block, reads=reads)
        merge = compress_block(algo, block, widths[spec.producer], generator)
        repair_note = None
        if repair is not None:
            if batches is not None and not algo.data_driven:
                repair_note = "replaced by the least-squares refit on calibration data"
            else:
                merge, repair_note = bn_repair(block, merge, variance=repair == "bn-var")
        apply(work, spec, merge)
        if batches is not None and not algo.data_driven:
            new_reads, _ = capture_reads(work, spec, batches, positions, generator)
            merge = refit(merge, new_reads, consumer_targets(block, block.reads))
            apply(work, spec, merge)
        bound = certificate(block, merge)
        reports.append(BlockReport(
            spec.producer, spec.consumer, block.n, merge.k, float(bound.max()),
            float(bound.sum()), radius, method, time.perf_counter() - start,
            batches is not None, merge.assignment.tolist(),
            None if merge.shares is None else merge.shares.tolist(),
            repair is not None and repair_note is None, repair_note))
        log.info("%s: %d -> %d units, certificate %.4g", spec.producer, block.n, merge.k,
                 reports[-1].certificate)
    return CompressionResult(
        work, method, algo.options(), seed, reports, skipped, count_params(model),
        count_params(work), None if inputs is None else count_macs(model, inputs),
        None if inputs is None else count_macs(work, inputs), allocation)


def compress_block(algo, block: Block, k: int, generator: torch.Generator) -> Merge:
    """Merge ``block`` to width ``k``: dead units (w_i = 0 or c_i = 0) are dropped first
    at no error; if no more than k units are live they are all kept (with dead ones as
    padding), otherwise the method merges the live ones."""
    live = block.live()
    n_live = int(live.sum())
    if n_live <= k:
        kept = torch.cat([live.nonzero().squeeze(1), (~live).nonzero().squeeze(1)[:k - n_live]])
        return select(block, kept.sort().values)
    if n_live == block.n:  # nothing to drop: no subset copy of the block
        inner = algo.merge(block, k, generator)
        return Merge(inner.rows, inner.out, inner.assignment, inner.shares, inner.kept)
    idx = live.nonzero().squeeze(1)
    inner = algo.merge(block.subset(idx), k, generator)
    assignment = torch.full((block.n,), -1, dtype=torch.long, device=idx.device)
    assignment[idx] = inner.assignment
    shares = None
    if inner.shares is not None:
        shares = torch.zeros(block.n, dtype=block.weight.dtype, device=idx.device)
        shares[idx] = inner.shares
    kept = None if inner.kept is None else torch.where(inner.kept >= 0, idx[inner.kept], -1)
    return Merge(inner.rows, inner.out, assignment, shares, kept)


def _working_copy(model: nn.Module, specs: list[BlockSpec], widths: dict[str, int]
                  ) -> nn.Module:
    """A deep copy of ``model`` that shares, instead of copying, the parameters and buffers
    of the modules compression replaces (producer, consumer and folded BatchNorm of every
    block in ``widths``): they are only read, then swapped for new modules by
    :func:`tropnnc.surgery.apply`, so the result still owns all its tensors and the input
    is never modified, without a transient copy of its largest layers. Tensors that any
    other module also uses are copied as usual."""
    replaced = set()
    for spec in specs:
        if spec.producer in widths:
            replaced.update(n for n in (spec.producer, spec.consumer, spec.bn) if n)
    shared: dict[int, torch.Tensor] = {}
    used_elsewhere: set[int] = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        tensors = [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
        if name in replaced:
            shared.update((id(t), t) for t in tensors)
        else:
            used_elsewhere.update(id(t) for t in tensors)
    memo = {key: t for key, t in shared.items() if key not in used_elsewhere}
    return copy.deepcopy(model, memo)


def _generator(seed: int, layer: str) -> torch.Generator:
    """A generator for one block, fixed by the seed and the layer name."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(layer.encode()))


def _widths(model: nn.Module, specs: list[BlockSpec], keep: KeySpec) -> dict[str, int]:
    """Target width per producer layer; ValueError for anything out of range."""
    sizes = {s.producer: _units(get_module(model, s.producer)) for s in specs}
    if isinstance(keep, Mapping):
        unknown = sorted(set(keep) - set(sizes))
        if unknown:
            raise ValueError(f"keep names layers that are not compressible blocks: "
                             f"{', '.join(unknown)}; compressible: {', '.join(sizes)}")
        return {name: _width(name, sizes[name], k) for name, k in keep.items()}
    return {name: _width(name, n, keep) for name, n in sizes.items()}


def _width(layer: str, n: int, keep: Keep) -> int:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep for {layer} must be a float fraction in (0, 1] or an int width, "
                        f"got {keep!r}")
    if isinstance(keep, int):
        if not 1 <= keep <= n:
            raise ValueError(f"keep width {keep} for {layer} must be between 1 and the "
                             f"layer's {n} units")
        return keep
    if not (0.0 < keep <= 1.0):
        raise ValueError(f"keep fraction {keep} for {layer} must be in (0, 1] "
                         "(use an int for an absolute width)")
    return max(1, round(keep * n))


def _units(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _check_single_output(model: nn.Module, specs: list[BlockSpec], widths: dict[str, int],
                         method: str) -> None:
    """Fail before any work when a single-output method meets a multi-output block."""
    for spec in specs:
        consumer = get_module(model, spec.consumer)
        n = _units(get_module(model, spec.producer))
        reads = (consumer.in_features // n if isinstance(consumer, nn.Linear)
                 else consumer.weight[0, 0].numel())
        if spec.producer in widths and consumer.weight.shape[0] * reads != 1:
            raise ValueError(f"{method} handles single-output blocks only; block "
                             f"{spec.producer} -> {spec.consumer} has "
                             f"{consumer.weight.shape[0]} outputs: use 'tropnnc' or "
                             "'neural-path-kmeans'")


def _check_finite(model: nn.Module) -> None:
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if (p.is_floating_point() and p.numel()  # min and max: NaN/inf show up there
                and not bool(torch.isfinite(torch.stack(torch.aminmax(p))).all())):
            raise ValueError(f"compress: {name} of {type(model).__name__} contains NaN or inf "
                             "values; fix or retrain the model first")
