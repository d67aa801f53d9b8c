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
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import attention as heads_math
from .block import Block, Merge, certificate, homogeneous, rescale_units, select
from .bounds import block_radii, domain_std
from .budget import Allocation, Budget, allocate
from .calibration import (
    as_batches,
    capture_group,
    capture_reads,
    consumer_targets,
    group_targets,
    least_squares,
    refit,
)
from .counting import count_macs, count_params, infer_example_inputs
from .graph import (
    BlockSpec,
    GroupSpec,
    Skip,
    discover,
    input_readers,
    layer_width,
    norm_radius,
    reads_directly,
)
from .graph.attention import AttentionSpec, find_attention
from .heads import apply_heads, extract_heads, input_norm
from .methods import Method, get_method, method_class, methods
from .moments import Gaussian
from .reconstruct import Reconstruction, reconstruct_merge
from .repair import bn_repair, check_repair
from .surgery import apply, apply_consumer_slices, extract, get_module, read_range

log = logging.getLogger(__name__)

Keep = float | int
KeepSpec = Keep | Mapping[str, Keep]


@dataclass(frozen=True)
class BlockReport:
    """What happened to one block."""

    layer: str
    consumer: str
    units_before: int
    units_after: int
    certificate: float  # max over outputs of the bound on |y_j - y~_j| (NaN: none)
    certificate_sum: float  # the same bound summed over outputs
    radius: float  # the block input's norm bound the certificate holds for (NaN: unknown)
    method: str
    seconds: float
    data_driven: bool  # read calibration data (thinet, or a least-squares refit)
    assignment: list[int] = field(repr=False)
    shares: list[float] | None = field(repr=False)
    repaired: bool = False  # compress(repair=...) corrected the consumer bias
    repair_note: str | None = None  # why a requested repair was a no-op (None: not asked/done)
    reconstructed: bool = False  # compress(reconstruct=...) rebuilt the consumer
    reconstruct_note: str | None = None  # why a requested reconstruction was not done


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
    reconstruction: Reconstruction | None = None  # compress(reconstruct=...) options, else None
    #: the input domain the radii were derived from ({"range", "stats"}); None: radius= given
    input_domain: dict[str, object] | None = None

    def table(self) -> str:
        """A plain-text table of the per-block report."""
        lines = [f"{'layer':<24}{'units':>14}{'radius':>10}{'certificate':>14}{'seconds':>9}"]
        for b in self.blocks:
            lines.append(
                f"{b.layer:<24}{f'{b.units_before} -> {b.units_after}':>14}"
                f"{b.radius:>10.4g}{b.certificate:>14.4g}{b.seconds:>9.3f}"
            )
        for s in self.skipped:
            lines.append(f"{s.layer:<24}  skipped: {s.reason}")
        lines.append(f"parameters {self.params_before} -> {self.params_after}")
        if self.macs_before is not None:
            lines.append(f"MACs {self.macs_before} -> {self.macs_after}")
        if self.allocation is not None:
            a = self.allocation
            lines.append(
                f"budget {a.budget:g} of {a.unit} ({a.allocator}): "
                f"{a.achieved} of {a.total} (target {a.target:.0f})"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary of the report (without the model)."""
        return {
            "method": self.method,
            "options": self.options,
            "seed": self.seed,
            "blocks": [asdict(b) for b in self.blocks],
            "skipped": [asdict(s) for s in self.skipped],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "allocation": None if self.allocation is None else asdict(self.allocation),
            "reconstruction": (
                None if self.reconstruction is None else asdict(self.reconstruction)
            ),
            "input_domain": self.input_domain,
        }


#: what ``compress(model, keep)`` runs when no method is named: the best data-free pipeline
#: we measured (README "Results"): a method with options, and a reconstruction
DEFAULT_PIPELINE: tuple[str, dict[str, object], Reconstruction] = (
    "adaptive",
    {},
    Reconstruction(bn_shrink=0.8),
)


def compress(
    model: nn.Module,
    keep: KeepSpec | None = None,
    method: str | None = None,
    *,
    seed: int = 0,
    example_inputs: torch.Tensor | None = None,
    strict: bool = False,
    radius: float | None = None,
    input_range: tuple[object, object] | None = None,
    input_stats: tuple[object, object] | None = None,
    calibration: torch.Tensor | Iterable[torch.Tensor] | None = None,
    budget: float | Budget | None = None,
    repair: str | None = None,
    reconstruct: str | Reconstruction | None = "auto",
    attention: bool = True,
    **options: object,
) -> CompressionResult:
    """Compress every compressible hidden layer of ``model`` without data.

    ``keep``: a float in (0, 1] is the fraction of units kept per block
    (K = max(1, round(keep * n))); an int is the width itself; a mapping from producer
    layer name to either compresses only the layers it names; None means 0.5, unless
    ``budget`` is given. ``budget``: instead of ``keep``, a :class:`~tropnnc.budget.Budget`
    (or just its fraction): keep that fraction in (0, 1] of the parameters
    (``unit='params'``) or MACs (``'macs'``) of the compressible layers (every
    Linear/Conv2d that is a producer or consumer of a block or a member of a channel
    group; all blocks and groups are then compressed); per-block widths are chosen by
    :func:`tropnnc.budget.allocate`
    (``allocator``: 'tropnnc' certificate curves with per-block floors, 'tropnnc-log',
    'tropnnc-sum' (no floors), or 'method': the method's own, e.g. CUP's global
    threshold; every width >= ``min_width`` and a multiple of ``round_to`` or the full
    width) and reported in ``result.allocation``. ``method``: one of
    :func:`tropnnc.methods`; ``options`` go to the method. ``seed`` fixes every random
    choice. Certificates bound each block's output error for the inputs the network can
    see: every element of the network input in ``input_range=(lo, hi)`` (default (0, 1):
    images as tensors), read as (x - mean) / std when ``input_stats=(mean, std)`` is given
    (the normalisation the model was trained with); ends, means and stds are numbers, one
    value per channel, or tensors broadcasting to one input. Each block's input norm bound
    (one patch for a convolution) is derived from that domain by interval arithmetic on
    the network compressed so far (:mod:`tropnnc.bounds`) and reported as its ``radius``
    (NaN, with a warning, where the domain cannot be propagated, e.g. an unknown input
    shape: pass ``example_inputs``). ``radius``: instead, one given norm bound for every
    block's input.
    ``strict`` turns a refused block (an op the method cannot reason about) into an error.
    ``example_inputs`` gives the input shape for MAC counts when the model does not.
    ``calibration``: unlabeled inputs (a tensor or an iterable of batches). Data-driven
    methods (``thinet``) need them; with any other method they trigger a least-squares
    refit of the consumer after the data-free merge (reported as data-driven, no
    certificate): for a channel group, of the columns through which each of its
    consumers reads its channels (a data-driven method leaves groups alone, reported).
    ``repair="bn"``: after each share-form merge, shift the consumer's bias so its
    expected pre-activation is unchanged, modelling each unit's pre-activation as
    Gaussian with its BatchNorm's beta and |gamma| (:mod:`tropnnc.repair`; data-free; the
    shift is added to the certificate); a no-op, noted in the block's report, without BN
    statistics, for merges without shares, or when a calibration refit runs.
    ``repair="bn-var"`` also rescales each merged unit's consumer slices to keep the
    variance it feeds the consumer (same model; see :mod:`tropnnc.repair`).
    ``reconstruct="ls"`` (or a :class:`~tropnnc.reconstruct.Reconstruction` with its
    options; "auto": the default pipeline's when ``method`` is None, else none): after each
    merge, rebuild the consumer slices and bias by least squares under
    a Gaussian model of the block's input (from BatchNorm statistics when the producer had
    BN; data-free; the certificate covers the result). Exclusive with ``repair``; replaced
    by the refit when ``calibration`` is given.
    ``attention``: also narrow the heads of attention modules (timm ``Attention``,
    ``nn.MultiheadAttention`` as self-attention) to a fraction ``keep`` of their query/key
    and value width by truncated SVD of each head's two circuits (:mod:`tropnnc.attention`;
    data-free, certified when the input comes from a LayerNorm/RMSNorm); a float ``keep``
    or a mapping naming the module (value: fraction or per-head width) applies, an int
    ``keep`` or a budget leaves attention alone.
    """
    run = _settings(model, method, options, seed, budget, repair, reconstruct, calibration)
    _check_finite(model)
    _check_dtypes(model)
    sites, site_skips = find_attention(model) if attention else ([], [])
    keep, ranks = _split_keep(keep, sites, run)
    specs, skipped = _blocks(model, run, strict, bool(ranks))
    skipped += site_skips
    if not isinstance(keep, Mapping):  # a budget or an int keep sizes blocks only
        why = "a budget" if run.budget is not None else "an int keep (a block width)"
        skipped += [
            Skip(s.path, f"attention left alone: {why} sizes blocks only; pass a fraction")
            for s in sites
            if s.path not in ranks
        ]
    widths, allocation = _plan_widths(model, specs, keep, run, example_inputs)
    _check_domain(radius, input_range, input_stats)
    if run.recon is not None and run.recon.sigma is None:  # the input domain's std
        std = domain_std(input_range, input_stats)
        run = replace(run, input_sigma=dict.fromkeys(input_readers(model), std))
    inputs = example_inputs if example_inputs is not None else infer_example_inputs(model)
    unchanged = _unchanged(model, specs, widths, run)
    work = _working_copy(model, specs, set(widths) - unchanged)
    radius_of = (
        block_radii(work, inputs, input_range, input_stats)
        if radius is None
        else lambda layer: radius
    )
    reports = _compress_blocks(work, specs, widths, unchanged, run, radius_of)
    reports += [_narrow_heads(work, s, ranks[s.path], radius) for s in sites if s.path in ranks]
    return CompressionResult(
        work,
        run.method,
        run.algo.options(),
        seed,
        reports,
        skipped,
        count_params(model),
        count_params(work),
        None if inputs is None else count_macs(model, inputs),
        None if inputs is None else count_macs(work, inputs),
        allocation,
        run.recon,
        None if radius is not None else _domain_record(input_range, input_stats),
    )


#: compress() keywords that became fields of :class:`~tropnnc.budget.Budget`
_BUDGET_FIELDS = {"budget_unit", "allocator", "min_width", "round_to"}


@dataclass(frozen=True)
class _Settings:
    """What :func:`compress` resolved from its arguments, shared by its steps."""

    method: str
    algo: Method
    seed: int
    budget: Budget | None
    repair: str | None
    recon: Reconstruction | None
    batches: list[torch.Tensor] | None
    #: the reconstruction's input std of blocks that read the network input (sigma None)
    input_sigma: Mapping[str, float] = field(default_factory=dict)

    @property
    def refit(self) -> bool:
        """Whether a least-squares refit on calibration data follows each merge (it
        replaces a repair or reconstruction)."""
        return self.batches is not None and not self.algo.data_driven


def _settings(
    model: nn.Module,
    method: str | None,
    options: dict[str, object],
    seed: int,
    budget: float | Budget | None,
    repair: str | None,
    reconstruct: str | Reconstruction | None,
    calibration: torch.Tensor | Iterable[torch.Tensor] | None,
) -> _Settings:
    """Check the arguments of :func:`compress` that need no block discovery, and resolve
    the method (the default pipeline when None), its options and the corrections to run."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress: model must be a torch.nn.Module, got {type(model).__name__}")
    check_repair(repair)
    moved = _BUDGET_FIELDS & set(options)
    if moved:
        raise TypeError(
            f"compress: {', '.join(sorted(moved))} apply to a budget only; pass "
            "budget=tropnnc.Budget(fraction, unit=..., allocator=..., min_width=..., "
            "round_to=...)"
        )
    if method is None:
        method, defaults, default_recon = DEFAULT_PIPELINE
        options = {**defaults, **options}
        if reconstruct == "auto":
            reconstruct = None if repair is not None else default_recon
    elif reconstruct == "auto":
        reconstruct = None
    algo = get_method(method, **options)
    recon = _reconstruction(reconstruct)
    if recon is not None and repair is not None:
        raise ValueError(
            "compress: pass either repair or reconstruct, not both "
            "(reconstruct='ls' supersedes the BatchNorm repair)"
        )
    batches = None if calibration is None else as_batches(calibration)
    if algo.data_driven and batches is None:
        raise ValueError(
            f"method {method!r} is data-driven: pass calibration=<unlabeled "
            "inputs> (a tensor or an iterable of batches)"
        )
    if not 0 <= int(seed) < 1 << 32:
        raise ValueError(f"compress: seed must be an integer in [0, 2**32), got {seed}")
    if budget is not None and not isinstance(budget, Budget):
        budget = Budget(budget)  # type: ignore[arg-type]  # Budget checks the value
    return _Settings(method, algo, int(seed), budget, repair, recon, batches)


def _check_domain(
    radius: object,
    input_range: tuple[object, object] | None,
    input_stats: tuple[object, object] | None,
) -> None:
    """``radius`` (one norm bound for every block's input) excludes an input domain."""
    if radius is None:
        return
    if input_range is not None or input_stats is not None:
        raise ValueError(
            "compress: pass either radius (one norm bound for every block's "
            "input) or input_range/input_stats (derive each block's), not both"
        )
    if (
        isinstance(radius, bool)
        or not isinstance(radius, (int, float))
        or radius <= 0
        or not math.isfinite(radius)
    ):
        raise ValueError(f"compress: radius must be a positive number, got {radius!r}")
    if not math.isfinite(radius * radius):  # sqrt(radius^2 + 1)
        raise ValueError(
            f"compress: radius {radius:g} is too large (its square overflows "
            "float64): use a radius below 1e150"
        )


def _blocks(
    model: nn.Module, run: _Settings, strict: bool, heads: bool = False
) -> tuple[list[BlockSpec], list[Skip]]:
    """The blocks of ``model`` this run can compress, and the layers it skips (logged);
    ValueError when there is none (and no attention to narrow: ``heads``)."""
    specs, skipped = discover(model)
    if run.batches is not None and run.algo.data_driven:  # it selects from one consumer's reads
        skipped += [
            Skip(
                s.producer,
                f"channel group {', '.join(s.layers)} is not compressed by {run.method} "
                "(a data-driven method selects units from one consumer's reads; a group "
                "has several consumers)",
            )
            for s in specs
            if isinstance(s, GroupSpec)
        ]
        specs = [s for s in specs if not isinstance(s, GroupSpec)]
    if strict and any(s.refused for s in skipped):
        bad = next(s for s in skipped if s.refused)
        raise ValueError(f"compress(strict=True): cannot compress {bad.layer}: {bad.reason}")
    if model.training and any(s.bn for s in specs):
        log.warning(
            "compress: %s is in train mode, but its BatchNorms are folded with their "
            "running statistics (eval-mode behaviour); call model.eval() first to "
            "compare like with like",
            type(model).__name__,
        )
    for s in skipped:  # an output layer or a residual branch is normal; a refusal is not
        log.log(
            logging.WARNING if s.refused else logging.INFO, "skipping %s: %s", s.layer, s.reason
        )
    if not specs and not heads:
        raise ValueError(
            f"compress: {type(model).__name__} has no compressible block "
            f"(producer -> ReLU -> consumer); {_skip_summary(skipped)}"
        )
    return specs, skipped


def _plan_widths(
    model: nn.Module,
    specs: list[BlockSpec],
    keep: KeepSpec | None,
    run: _Settings,
    example_inputs: torch.Tensor | None,
) -> tuple[dict[str, int], Allocation | None]:
    """The width of every block to compress: from ``keep``, or allocated for the budget
    (by the method's own rule when it has one)."""
    allocation = None
    if run.budget is None:
        widths = _widths(model, specs, 0.5 if keep is None else keep)
    elif keep is not None:
        raise ValueError(
            "compress: pass either keep or budget, not both (with a budget "
            "the per-layer widths are chosen by the allocator)"
        )
    else:
        own = run.algo.own_allocation()
        if run.budget.allocator == "method" and own is None:
            raise ValueError(
                f"allocator='method': {run.method!r} has no allocator of its own; "
                "use allocator='tropnnc'"
            )
        allocation = allocate(
            model,
            specs,
            run.budget,
            norm=run.algo.curve_norm(),
            own=own,
            example_inputs=example_inputs,
        )
        widths = allocation.widths
    if not run.algo.multi_output:
        _check_single_output(model, specs, widths, run.method)
    return widths, allocation


def _compress_blocks(
    work: nn.Module,
    specs: list[BlockSpec],
    widths: dict[str, int],
    unchanged: set[str],
    run: _Settings,
    radius_of: Callable[[str], float],
) -> list[BlockReport]:
    """Compress the blocks in ``widths`` of ``work`` (the copy of the model being
    compressed) in forward order, each read with the weights it has then, but the
    ``unchanged`` ones; a report each."""
    # blocks stay on the weights' device (and GPU) for methods that merge there, unless a
    # calibration refit, a repair or a reconstruction (CPU float64 code) runs
    plain = run.batches is None and run.repair is None and run.recon is None
    device = None if run.algo.device_aware and plain else "cpu"
    todo = [s for s in specs if s.producer in widths]
    reports = []
    carried: dict[str, Gaussian] = {}  # modelled inputs of the next blocks of FC chains
    bar = tqdm(  # on a terminal only
        total=len(todo), desc="compress", unit="block", leave=False, disable=not sys.stderr.isatty()
    )
    for spec in todo:
        bar.set_postfix_str(spec.producer, refresh=False)
        if spec.producer in unchanged:
            n = widths[spec.producer]
            report = BlockReport(
                layer=spec.producer,
                consumer=spec.consumer,
                units_before=n,
                units_after=n,
                certificate=0.0,
                certificate_sum=0.0,
                radius=radius_of(spec.producer),
                method=run.method,
                seconds=0.0,
                data_driven=False,
                assignment=list(range(n)),
                shares=[1.0] * n,
            )
        else:
            report = _compress_one(
                work, spec, widths[spec.producer], radius_of, run, device, carried
            )
        reports.append(report)
        bar.update(1)
    bar.close()
    return reports


def _unchanged(
    model: nn.Module, specs: list[BlockSpec], widths: dict[str, int], run: _Settings
) -> set[str]:
    """The blocks left as they are: kept at full width, with no BatchNorm to fold (in any
    producer or depthwise member of a group) and no calibration or repair (the merge would
    be the identity), so no copy of their layers and no consumer rewrite."""
    if run.batches is not None or run.repair is not None:
        return set()
    return {
        s.producer
        for s in specs
        if all(p.bn is None for p in s.producers + getattr(s, "channelwise", ()))
        and widths.get(s.producer) == layer_width(get_module(model, s.producer))
    }


def _compress_one(
    work: nn.Module,
    spec: BlockSpec,
    k: int,
    radius_of: Callable[[str], float],
    run: _Settings,
    device: str | None,
    carried: dict[str, Gaussian],
) -> BlockReport:
    """Merge one block of ``work`` to width ``k``, correct it, write it back, certify it.
    ``carried``: modelled inputs of blocks in FC chains, read for this block and written for
    the block its consumer starts (chained input models, docs/expected-error.md)."""
    start = time.perf_counter()
    generator = _generator(run.seed, spec.producer)
    block_radius = radius_of(spec.producer)
    block = extract(work, spec, block_radius, device=device)
    before = None  # the reads before merging (and their positions), for the refit
    if isinstance(spec, GroupSpec) and run.refit:
        before = capture_group(work, spec, run.batches, None, generator)
    elif run.batches is not None:
        before = capture_reads(work, spec, run.batches, None, generator)
        block = replace(block, reads=before[0])
    merge = compress_block(run.algo, block, k, generator)
    if not homogeneous(block.activation):  # keep merged units at their members' scale
        merge = rescale_units(merge)
    merge, repair_note, recon_note, activations = _correct(
        block, merge, spec, run, generator, carried.pop(spec.producer, None)
    )
    if activations is not None and reads_directly(work, spec):
        carried[spec.consumer] = activations  # the next block's input model
    apply(work, spec, merge)
    if run.refit:
        merge = _refit(work, spec, block, merge, run.batches, generator, before)
    bound = certificate(block, merge)
    worst = float(bound.max())
    log.info("%s: %d -> %d units, certificate %.4g", spec.producer, block.n, merge.k, worst)
    return BlockReport(
        spec.producer,
        spec.consumer,
        block.n,
        merge.k,
        worst,
        float(bound.sum()),
        block_radius,
        run.method,
        time.perf_counter() - start,
        run.batches is not None,
        merge.assignment.tolist(),
        None if merge.shares is None else merge.shares.tolist(),
        run.repair is not None and repair_note is None,
        repair_note,
        run.recon is not None and recon_note is None,
        recon_note,
    )


def _refit(
    work: nn.Module,
    spec: BlockSpec | GroupSpec,
    block: Block,
    merge: Merge,
    batches: list[torch.Tensor],
    generator: torch.Generator,
    before: tuple,
) -> Merge:
    """Refit by least squares the consumer slices of the merged units (of every consumer of
    a group) of ``work`` so each consumer reproduces, from what it reads now at the same
    samples, what the original slices gave on the reads ``before`` the merge; write them
    back and return the merge with them (no shares: no certificate). A group's slices are
    shrunk towards the merged ones (a stream's consumers read channels that calibration
    inputs may hardly excite); a block's towards zero, as they always were."""
    if not isinstance(spec, GroupSpec):
        new_reads, _ = capture_reads(work, spec, batches, before[1], generator)
        merge = refit(merge, new_reads, consumer_targets(block, before[0]))
        apply(work, spec, merge)
        return merge
    reads, positions = before
    outputs = [get_module(work, c.layer).weight.shape[0] for c in spec.consumers]
    targets = group_targets(block, reads, outputs)  # (S_c, m_c) per consumer
    merged = merge.out.split(outputs, dim=1)  # (k, m_c, most): the ridge's prior
    slices = []
    # in forward order, each read after the earlier ones are rewritten: a consumer may feed
    # (through a residual branch) a producer of the group that a later consumer reads
    for consumer, target, prior, places in zip(
        spec.consumers, targets, merged, positions, strict=True
    ):
        channels = read_range(work, consumer)
        new_reads, _ = capture_reads(
            work, consumer.layer, batches, places, generator, channels=channels
        )  # (S_c, k, r_c)
        part = least_squares(new_reads, target, prior=prior[:, :, : channels[2]])
        apply_consumer_slices(work, consumer, part)
        slices.append(part)
    most = max(part.shape[2] for part in slices)  # joined like extract_group's slices
    out = torch.cat([F.pad(part, (0, most - part.shape[2])) for part in slices], dim=1)
    return Merge(merge.rows, out, merge.assignment, None, merge.kept)


def _correct(
    block: Block,
    merge: Merge,
    spec: BlockSpec,
    run: _Settings,
    generator: torch.Generator,
    inputs: Gaussian | None,
) -> tuple[Merge, str | None, str | None, Gaussian | None]:
    """The merge after the requested BatchNorm repair or reconstruction (under the modelled
    block input ``inputs``, None: the block's own model), why either was not done (None:
    done, or not asked), and the merged units' modelled activations (None: not modelled)."""
    repair_note = recon_note = activations = None
    refit_note = "replaced by the least-squares refit on calibration data"
    if run.repair is not None:
        if run.refit:
            repair_note = refit_note
        else:
            merge, repair_note = bn_repair(block, merge, variance=run.repair == "bn-var")
    if run.recon is not None:
        if run.refit:
            recon_note = refit_note
        elif isinstance(spec, GroupSpec):  # rows of several producers: no input model
            recon_note = "a channel group keeps the method's slices"
        else:
            recon = run.recon
            if recon.sigma is None:
                recon = replace(recon, sigma=run.input_sigma.get(spec.producer, 1.0))
            merge, recon_note, activations = reconstruct_merge(
                block, merge, recon, generator, inputs
            )
            if recon_note is not None:
                log.warning("%s: reconstruction skipped: %s", spec.producer, recon_note)
    return merge, repair_note, recon_note, activations


def _reconstruction(value: str | Reconstruction | None) -> Reconstruction | None:
    """The reconstruction options for ``compress(reconstruct=...)``."""
    if value is None or isinstance(value, Reconstruction):
        return value
    if value == "ls":
        return Reconstruction()
    raise ValueError(
        f"reconstruct must be None, 'auto', 'ls' or a "
        f"tropnnc.reconstruct.Reconstruction, got {value!r}"
    )


def _domain_record(
    input_range: tuple[object, object] | None, input_stats: tuple[object, object] | None
) -> dict[str, object]:
    """The input domain as plain numbers and lists, for reports and manifests."""

    def plain(value: object) -> object:
        return torch.as_tensor(value, dtype=torch.float64).tolist()

    ends = (0.0, 1.0) if input_range is None else input_range
    return {
        "range": [plain(v) for v in ends],
        "stats": None
        if input_stats is None
        else {"mean": plain(input_stats[0]), "std": plain(input_stats[1])},
    }


def compress_block(algo, block: Block, k: int, generator: torch.Generator) -> Merge:
    """Merge ``block`` to width ``k``: dead units (w_i = 0 or c_i = 0) are dropped first
    at no error; if no more than k units are live they are all kept (with dead ones as
    padding), otherwise the method merges the live ones."""
    live = block.live()
    n_live = int(live.sum())
    if n_live <= k:
        kept = torch.cat([live.nonzero().squeeze(1), (~live).nonzero().squeeze(1)[: k - n_live]])
        return select(block, kept.sort().values)
    if n_live == block.n:  # nothing to drop: no subset copy of the block
        inner = algo.merge(block, k, generator)
        return Merge(
            inner.rows, inner.out, inner.assignment, inner.shares, inner.kept, gram=inner.gram
        )
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


def _working_copy(model: nn.Module, specs: list[BlockSpec], changed: set[str]) -> nn.Module:
    """A deep copy of ``model`` that shares, instead of copying, the parameters and buffers
    of the modules compression replaces (producer, consumer and folded BatchNorm of every
    block in ``changed``): they are only read, then swapped for new modules by
    :func:`tropnnc.surgery.apply`, so the result still owns all its tensors and the input
    is never modified, without a transient copy of its largest layers. Tensors that any
    other module also uses are copied as usual."""
    replaced = set()
    for spec in specs:
        if spec.producer in changed:
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


def _split_keep(
    keep: KeepSpec | None, sites: list[AttentionSpec], run: _Settings
) -> tuple[KeepSpec | None, dict[str, int]]:
    """``keep`` without the attention modules it names, and the per-head width of every
    attention module to narrow: a float keep narrows all, a mapping those it names; an
    int keep (a block width) or a budget none."""
    by_path = {s.path: s for s in sites}
    if isinstance(keep, Mapping):
        named = {p: k for p, k in keep.items() if p in by_path}
        keep = {p: k for p, k in keep.items() if p not in by_path}
    elif run.budget is None and not isinstance(keep, int):
        named = dict.fromkeys(by_path, 0.5 if keep is None else keep)
    else:
        named = {}
    ranks = {p: _width(f"{p} (per-head width)", by_path[p].head_dim, k) for p, k in named.items()}
    return keep, ranks


def _narrow_heads(
    work: nn.Module, spec: AttentionSpec, rank: int, radius: float | None
) -> BlockReport:
    """Narrow the heads of one attention module of ``work`` to average width ``rank``,
    split between query/key and values by :func:`tropnnc.attention.split_width` (a report
    like a block's: units are the attention width, heads x average per-head width)."""
    start = time.perf_counter()
    heads = extract_heads(work, spec)
    e_out = heads.wo.shape[0]
    gamma, beta = input_norm(work, spec)
    if spec.norm is not None:  # the normalised input has norm <= sqrt(E) for any input
        rho = math.sqrt(heads.wq.shape[-1])
        x_radius = norm_radius(get_module(work, spec.norm))
    else:
        rho = x_radius = math.nan if radius is None else radius
    if rank == spec.head_dim:
        bound = 0.0
    else:
        qk_rank, v_rank = heads_math.split_width(rank, spec.head_dim)
        narrowed = heads_math.narrow(heads, qk_rank, v_rank, gamma, beta)
        apply_heads(work, spec, narrowed.heads)
        bound = heads_math.certificate(narrowed, rho)
    log.info("%s: heads %d -> %d wide, certificate %.4g", spec.path, spec.head_dim, rank, bound)
    return BlockReport(
        spec.path,
        spec.path,
        spec.heads * spec.head_dim,
        spec.heads * rank,
        bound,
        bound * math.sqrt(e_out),  # l1 <= sqrt(E_out) l2 over the outputs
        x_radius,
        "svd",
        time.perf_counter() - start,
        False,
        [],
        None,
    )


def _generator(seed: int, layer: str) -> torch.Generator:
    """A generator for one block, fixed by the seed and the layer name."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(layer.encode()))


def _widths(model: nn.Module, specs: list[BlockSpec], keep: KeepSpec) -> dict[str, int]:
    """Target width per producer layer; ValueError for anything out of range."""
    sizes = {s.producer: layer_width(get_module(model, s.producer)) for s in specs}
    if isinstance(keep, Mapping):
        unknown = sorted(set(keep) - set(sizes))
        if unknown:
            raise ValueError(
                f"keep names layers that are not compressible blocks: "
                f"{', '.join(unknown)}; compressible: {', '.join(sizes)}"
            )
        return {name: _width(name, sizes[name], k) for name, k in keep.items()}
    if keep == 1 and isinstance(keep, int) and not isinstance(keep, bool):
        raise ValueError(
            "keep=1 (an int) would shrink every layer to ONE unit: pass keep=1.0 "
            "to keep every unit, or a mapping {layer: 1} for chosen layers"
        )
    widths = {name: _width(name, n, keep) for name, n in sizes.items()}
    if isinstance(keep, int):
        log.info(
            "keep=%d is a width: %s",
            keep,
            ", ".join(f"{name} {sizes[name]} -> {k}" for name, k in widths.items()),
        )
    return widths


def _width(layer: str, n: int, keep: Keep) -> int:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(
            f"keep for {layer} must be a float fraction in (0, 1] or an int width, got {keep!r}"
        )
    if isinstance(keep, int):
        if not 1 <= keep <= n:
            raise ValueError(
                f"keep width {keep} for {layer} must be between 1 and the layer's {n} units"
            )
        return keep
    if not (0.0 < keep <= 1.0):
        raise ValueError(
            f"keep fraction {keep} for {layer} must be in (0, 1] (use an int for an absolute width)"
        )
    return max(1, round(keep * n))


def _check_single_output(
    model: nn.Module, specs: list[BlockSpec], widths: dict[str, int], method: str
) -> None:
    """Fail before any work when a single-output method meets a multi-output block."""
    for spec in specs:
        consumer = get_module(model, spec.consumer)
        n = layer_width(get_module(model, spec.producer))
        reads = (
            consumer.in_features // n
            if isinstance(consumer, nn.Linear)
            else consumer.weight[0, 0].numel()
        )
        if spec.producer in widths and consumer.weight.shape[0] * reads != 1:
            several = [name for name in methods() if method_class(name).multi_output]
            raise ValueError(
                f"{method} handles single-output blocks only; block "
                f"{spec.producer} -> {spec.consumer} has "
                f"{consumer.weight.shape[0]} outputs: use a multi-output method "
                f"({', '.join(several)})"
            )


#: short names for the reasons a layer is not compressed (first match in the reason text)
SKIP_KINDS = (
    ("output", "output layer"),
    ("residual", "residual connection"),
    ("concatenation", "concatenation"),
    ("grouped or depthwise", "grouped conv"),
    ("not a supported activation", "unsupported activation"),
    ("times", "shared module"),
    ("multiplies", "attention/gating"),
    ("reshape", "reshape"),
    ("linear bottleneck", "no activation"),
    ("before the ReLU", "op before the ReLU"),
)


def _skip_summary(skipped: list[Skip], first: int = 3) -> str:
    """Why no layer was compressed, in one short line: counts per kind of reason and the
    first few layers (a model with hundreds of layers would otherwise give pages)."""
    if not skipped:
        return "no Linear/Conv2d layer"
    counts: dict[str, int] = {}
    for s in skipped:
        kind = next((name for key, name in SKIP_KINDS if key in s.reason), "other op")
        counts[kind] = counts.get(kind, 0) + 1
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda c: -c[1]))
    shown = "; ".join(f"{s.layer}: {s.reason}" for s in skipped[:first])
    more = f" (and {len(skipped) - first} more)" if len(skipped) > first else ""
    return f"skipped: {kinds}; first: {shown}{more}; verbose logging (-v) lists every layer"


def _check_dtypes(model: nn.Module) -> None:
    """One floating dtype for all parameters (a mixed model fails deep inside the merge)."""
    found: dict[torch.dtype, str] = {}
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            raise ValueError(
                f"compress: {name} of {type(model).__name__} is {p.dtype}; "
                "parameters must be floating point: convert the model or its "
                "weights file (e.g. to float32)"
            )
        found.setdefault(p.dtype, name)
    if len(found) > 1:
        kinds = ", ".join(f"{dtype} (e.g. {name})" for dtype, name in found.items())
        raise ValueError(
            f"compress: the parameters of {type(model).__name__} have several "
            f"dtypes: {kinds}; convert the model or its weights file to one "
            "dtype first (e.g. model.float())"
        )


def _check_finite(model: nn.Module) -> None:
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if (
            p.is_floating_point()
            and p.numel()  # min and max: NaN/inf show up there
            and not bool(torch.isfinite(torch.stack(torch.aminmax(p))).all())
        ):
            raise ValueError(
                f"compress: {name} of {type(model).__name__} contains NaN or inf "
                "values; fix or retrain the model first"
            )
