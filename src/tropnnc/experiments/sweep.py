"""Sweeps: networks x methods x keep ratios x seeds, with resumable CSV/JSON, figures, tables.

Every finished compression appends one row to ``results.csv`` (so an interrupted sweep resumes
without redoing rows); ``results.json``, ``table.md`` and the PNG figures are regenerated from
all rows at the end (atomic writes). Method specs are ``name[+refit][:opt=value,...]``, e.g.
``tropnnc``, ``tropnnc:norm=l1,refine=5``, ``tropnnc+refit`` (the data-free merge followed by a
least-squares refit of the consumer on calibration inputs: data-driven), ``model-folding+ls``
(the data-free least-squares reconstruction, ``compress(reconstruct=...)``; options prefixed
``ls.`` go to it, e.g. ``model-folding+ls:ls.shrink=0.5``) or ``thinet``; ``torch-pruning``
runs an external anchor (:mod:`tropnnc.experiments.anchor`, optional extra ``anchor``) on
the same blocks at the same widths.

Run the committed experiments E1-E4 (results/SUMMARY.md; every command in results/run_all.sh)
with ``python -m tropnnc.experiments.sweep --experiment E3``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from ..api import DEFAULT_PIPELINE, CompressionResult, compress
from ..cli.sweep import add_grid_arguments
from ..counting import count_macs, count_params, infer_example_inputs
from ..graph import discover
from ..methods import method_class
from ..reconstruct import Reconstruction
from ..surgery import get_module
from ..zoo import CNN
from .anchor import EXTERNAL
from .report import write_outputs
from .train import evaluate
from .train_cache import load_split, outputs_of, trained_model

log = logging.getLogger(__name__)

FIELDS = [
    "dataset",
    "network",
    "layers",
    "method",
    "options",
    "keep",
    "seed",
    "accuracy",
    "parameters",
    "macs",
    "certificate",
    "seconds",
    "data_driven",
    "label",
    "params_before",
    "macs_before",
    "baseline_accuracy",
]
BASELINE = "uncompressed"  # label of the rows holding the uncompressed model
DEFAULT_LABEL = "default"  # label of compress()'s default pipeline


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method spec: registry name, options, and whether to refit on calibration."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    refit: bool = False
    reconstruct: dict[str, Any] | None = None  # Reconstruction options (``+ls``), else None

    @property
    def data_driven(self) -> bool:
        return self.refit or (self.name not in EXTERNAL and method_class(self.name).data_driven)

    @property
    def method(self) -> str:
        return (
            self.name
            + ("+refit" if self.refit else "")
            + ("+ls" if self.reconstruct is not None else "")
        )

    def reconstruction(self) -> Reconstruction | None:
        """The ``compress(reconstruct=...)`` argument of this spec."""
        return None if self.reconstruct is None else Reconstruction(**self.reconstruct)


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_method(spec: str) -> MethodSpec:
    """Parse ``name[+refit|+ls][:k=v,...]``, or ``default`` (what ``compress(model, keep)``
    runs: :data:`tropnnc.api.DEFAULT_PIPELINE`); unknown names or bad options raise
    ValueError."""
    if spec.strip() == DEFAULT_LABEL:
        name, options, recon = DEFAULT_PIPELINE
        return MethodSpec(DEFAULT_LABEL, name, dict(options), False, asdict(recon))
    head, _, opts = spec.strip().partition(":")
    refit = head.endswith("+refit")
    ls = head.endswith("+ls")
    name = head[: -len("+refit")] if refit else head[: -len("+ls")] if ls else head
    if name in EXTERNAL:
        if refit or ls:
            raise ValueError(
                f"method spec {spec!r}: {name} is an external anchor, no +refit or +ls"
            )
    else:
        method_class(name)
    options: dict[str, Any] = {}
    recon: dict[str, Any] | None = {} if ls else None
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"method option {item!r} in {spec!r} must be key=value")
        key = key.strip()
        if key.startswith("ls."):
            if recon is None:
                raise ValueError(f"option {key!r} in {spec!r} needs the '+ls' suffix")
            recon[key[3:]] = _value(val.strip())
        else:
            options[key] = _value(val.strip())
    parsed = MethodSpec(spec.strip(), name, options, refit, recon)
    parsed.reconstruction()  # bad reconstruction options fail here, not mid-sweep
    return parsed


def run_method(
    spec: MethodSpec,
    model: nn.Module,
    mapping: Mapping[str, float],
    seed: int,
    calibration: torch.Tensor | None,
) -> CompressionResult:
    """Compress ``model`` as one method spec says: a library method through
    :func:`tropnnc.compress` (calibration inputs only for data-driven specs), or an external
    anchor (:mod:`tropnnc.experiments.anchor`) on the same blocks and widths."""
    if spec.name in EXTERNAL:
        return EXTERNAL[spec.name](model, mapping, seed=seed, **spec.options)
    return compress(
        model,
        mapping,
        spec.name,
        seed=seed,
        calibration=calibration if spec.data_driven else None,
        reconstruct=spec.reconstruction(),
        **spec.options,
    )


def keep_mapping(model: nn.Module, layers: str | None, keep: float) -> dict[str, float]:
    """Keep ratio per producer layer: ``layers`` None/"all", "fc" (Linear producers),
    "conv" (Conv2d producers), or comma-separated producer names."""
    specs, _ = discover(model)
    names = [s.producer for s in specs]
    kinds = {n: "conv" if isinstance(get_module(model, n), nn.Conv2d) else "fc" for n in names}
    if layers in (None, "all"):
        chosen = names
    elif layers in ("fc", "linear", "conv"):
        want = "conv" if layers == "conv" else "fc"
        chosen = [n for n in names if kinds[n] == want]
    else:
        chosen = [n.strip() for n in layers.split(",") if n.strip()]
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            raise ValueError(
                f"layers {unknown} are not compressible blocks; blocks: {', '.join(names)}"
            )
    if not chosen:
        raise ValueError(f"layers={layers!r} selects no block of {type(model).__name__}")
    return {n: keep for n in chosen}


def _subset(ds: Dataset, size: int | None, seed: int) -> Dataset:
    if size is None or size >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:size]
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[idx] for t in ds.tensors))
    return torch.utils.data.Subset(ds, idx.tolist())


def calibration_inputs(train_set: Dataset, size: int, seed: int) -> torch.Tensor:
    """``size`` training inputs (labels dropped), a seeded random subset."""
    sub = _subset(train_set, size, 10_007 + seed)
    if isinstance(sub, TensorDataset):
        return sub.tensors[0]
    return torch.stack([sub[i][0] for i in range(len(sub))])


class Evaluator:
    """Test accuracy of compressed copies of one model.

    For zoo CNNs (``classifier(features(x))``) whose compressed copy keeps ``features``
    bit-identical (only FC layers compressed), the features of the test set are computed once
    and only the classifier is evaluated: the same numbers, much less CPU.
    """

    def __init__(self, model: nn.Module, test_set: Dataset) -> None:
        self.model = model
        self.test_set = test_set
        self.features: TensorDataset | None = None

    def __call__(self, compressed: nn.Module) -> float:
        if (
            isinstance(compressed, CNN)
            and isinstance(self.test_set, TensorDataset)
            and _same_params(self.model.features, compressed.features)
        ):
            if self.features is None:
                x, y = self.test_set.tensors[0], self.test_set.tensors[1]
                with torch.no_grad():
                    self.model.eval()
                    dev = next(self.model.parameters()).device
                    feats = torch.cat(
                        [
                            self.model.features(x[i : i + 1000].to(dev))
                            for i in range(0, len(x), 1000)
                        ]
                    )
                self.features = TensorDataset(feats, y)
            return evaluate(compressed.classifier, self.features)
        return evaluate(compressed, self.test_set)


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _key(row: Mapping[str, Any]) -> tuple[str, ...]:
    return (
        str(row["dataset"]),
        str(row["network"]),
        str(row["layers"]),
        str(row["label"]),
        f"{float(row['keep']):.6g}",
        str(int(row["seed"])),
    )


def read_rows(csv_path: Path) -> list[dict[str, Any]]:
    """Rows of a results CSV, with numbers and booleans parsed."""
    if not csv_path.is_file():
        return []
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("accuracy", "keep", "certificate", "seconds", "baseline_accuracy"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else math.nan
        for k in ("seed", "parameters", "params_before"):
            r[k] = int(r[k])
        for k in ("macs", "macs_before"):
            r[k] = int(r[k]) if r.get(k) not in (None, "") else None
        r["data_driven"] = r["data_driven"] in ("True", "true", "1")
    return rows


def _append(csv_path: Path, row: Mapping[str, Any]) -> None:
    new = not csv_path.is_file() or csv_path.stat().st_size == 0
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k) for k in FIELDS})
        f.flush()


def _as_list(value: str | Sequence[Any] | None) -> list[Any]:
    if value is None or isinstance(value, str):
        return [value]
    return list(value)


def run_sweep(
    networks: str | Sequence[str],
    methods: Sequence[str],
    keeps: Sequence[float],
    seeds: Sequence[int],
    dataset: str | Sequence[str],
    out_dir: str | Path,
    *,
    layers: str | Sequence[str | None] | None = None,
    calibration_size: int = 2000,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    train_kw: Mapping[str, Any] | None = None,
    test_size: int | None = None,
    data_root: str | Path | None = None,
    num_threads: int | None = None,
    title: str | None = None,
    executor: str = "local",
    address: str | None = None,
    device: str | None = None,
) -> Path:
    """Run (or resume) a sweep and write its outputs; returns the CSV path.

    ``networks``/``dataset``/``layers`` may be lists (all combinations). ``configs`` maps a
    network to zoo constructor overrides; ``train_kw`` goes to :func:`trained_model`
    (e.g. ``epochs``, ``train_size``); ``test_size`` evaluates on a seeded subset of the test
    split. Methods that cannot handle the network (single-output methods on multi-output
    blocks) are skipped with a note in ``results.json``.

    ``executor``: ``"local"`` runs the rows one after the other in this process; ``"ray"``
    (optional extra ``tropnnc[ray]``) runs every compressed row as a Ray task on the cluster
    at ``address`` (None: a local Ray instance is started, and stopped at the end). Networks
    are trained or loaded here and shared with the tasks through Ray's object store; the rows
    are appended to the CSV as they finish, in the local executor's order (a row waits for
    the rows before it), so both executors write the same CSV. ``device``: where the rows run
    (e.g. ``"cuda"``; None: the CPU); with Ray, rows on a GPU device request one GPU each.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    specs = [parse_method(m) for m in methods]
    done = {_key(r) for r in read_rows(csv_path)}
    notes: list[str] = []
    combos = [
        (ds, net, lay, seed)
        for ds in _as_list(dataset)
        for net in _as_list(networks)
        for lay in _as_list(layers)
        for seed in seeds
    ]
    total = len(combos) * (len(specs) * len(keeps) + 1)
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    quiet = not (progress and sys.stderr.isatty())
    bar = tqdm(total=total, desc="sweep", unit="run", disable=quiet)
    rows = _make_executor(executor, csv_path, bar, address, device, num_threads)
    try:
        for ds, net, lay, seed in combos:
            todo = [
                (s, k)
                for s in specs
                for k in keeps
                if _key(
                    {
                        "dataset": ds,
                        "network": net,
                        "layers": lay or "all",
                        "label": s.label,
                        "keep": k,
                        "seed": seed,
                    }
                )
                not in done
            ]
            base_key = _key(
                {
                    "dataset": ds,
                    "network": net,
                    "layers": lay or "all",
                    "label": BASELINE,
                    "keep": 1.0,
                    "seed": seed,
                }
            )
            bar.update(len(specs) * len(keeps) - len(todo) + (base_key in done))
            if not todo and base_key in done:
                continue
            model = trained_model(
                net,
                ds,
                seed,
                cache_dir,
                config=(configs or {}).get(net),
                data_root=data_root,
                **dict(train_kw or {}),
            )
            test_set = _subset(load_split(ds, "test", data_root), test_size, 20_011)
            calib = calibration_inputs(load_split(ds, "train", data_root), calibration_size, seed)
            common = {"dataset": ds, "network": net, "layers": lay or "all", "seed": seed}
            if device is not None and executor == "local":  # Ray tasks move their copies
                model, calib = model.to(device), calib.to(device)
            evaluator = Evaluator(model, test_set)
            baseline = evaluate(model, test_set)
            if base_key not in done:
                params = count_params(model)
                example = infer_example_inputs(model)
                macs = None if example is None else count_macs(model, example)
                rows.add(
                    {
                        **common,
                        "method": BASELINE,
                        "label": BASELINE,
                        "options": "{}",
                        "keep": 1.0,
                        "accuracy": baseline,
                        "parameters": params,
                        "params_before": params,
                        "macs": macs,
                        "macs_before": macs,
                        "certificate": 0.0,
                        "seconds": 0.0,
                        "data_driven": False,
                        "baseline_accuracy": baseline,
                    }
                )
            for spec, keep in todo:
                if (
                    spec.name not in EXTERNAL
                    and not method_class(spec.name).multi_output
                    and outputs_of(ds) > 1
                ):
                    note = f"{spec.label} skipped on {net}/{ds}: single-output method"
                    if note not in notes:
                        notes.append(note)
                        log.info(note)
                    bar.update(1)
                    continue
                rows.submit(
                    model,
                    test_set,
                    calib if spec.data_driven else None,
                    {**common, "baseline_accuracy": baseline},
                    spec,
                    keep,
                    evaluator,
                )
        rows.finish()
    finally:
        rows.close()
        bar.close()
        if num_threads is not None:
            torch.set_num_threads(old_threads)
    write_outputs(out, read_rows(csv_path), notes=notes, title=title)
    return csv_path


def compress_row(
    model: nn.Module,
    test_set: Dataset,
    calib: torch.Tensor | None,
    common: Mapping[str, Any],
    spec: MethodSpec,
    keep: float,
    *,
    device: str | None = None,
    num_threads: int | None = None,
    evaluator: Evaluator | None = None,
) -> dict[str, Any]:
    """One sweep row: compress ``model`` with ``spec`` at ``keep`` and evaluate it (the unit
    of work of every executor; a Ray task runs exactly this on its own copy of the model,
    moved to ``device``). ``evaluator``: one reused across the rows of a model (it caches
    test-set features); None makes one."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if device is not None:
        model = model.to(device)
        calib = None if calib is None else calib.to(device)
    mapping = keep_mapping(model, common["layers"], keep)
    start = time.perf_counter()
    result = run_method(spec, model, mapping, int(common["seed"]), calib)
    seconds = time.perf_counter() - start
    acc = (evaluator or Evaluator(model, test_set))(result.model)
    certs = [b.certificate for b in result.blocks]
    return {
        **common,
        "method": spec.method,
        "label": spec.label,
        "options": json.dumps(result.options, sort_keys=True),
        "keep": keep,
        "accuracy": acc,
        "parameters": result.params_after,
        "params_before": result.params_before,
        "macs": result.macs_after,
        "macs_before": result.macs_before,
        "certificate": max(certs) if certs else math.nan,
        "seconds": seconds,
        "data_driven": spec.data_driven,
    }


class _LocalRows:
    """The local executor: every row is computed when submitted and appended at once."""

    def __init__(
        self, csv_path: Path, bar: tqdm, device: str | None, num_threads: int | None
    ) -> None:
        self.csv_path = csv_path
        self.bar = bar
        self.device = device
        self.num_threads = num_threads

    def add(self, row: Mapping[str, Any]) -> None:
        """Append a finished row."""
        _append(self.csv_path, row)
        if row["label"] != BASELINE:
            acc = f"{row['accuracy']:.3f}"
            self.bar.set_postfix(method=row["label"], keep=row["keep"], acc=acc, refresh=False)
        self.bar.update(1)

    def submit(
        self,
        model: nn.Module,
        test_set: Dataset,
        calib: torch.Tensor | None,
        common: Mapping[str, Any],
        spec: MethodSpec,
        keep: float,
        evaluator: Evaluator,
    ) -> None:
        """Compute a row (see :func:`compress_row`; ``model`` is on the device already)."""
        self.add(compress_row(model, test_set, calib, common, spec, keep, evaluator=evaluator))

    def finish(self) -> None:
        """Wait for every submitted row."""

    def close(self) -> None:
        """Release the executor's resources (after ``finish`` or an error)."""


class _RayRows(_LocalRows):
    """The Ray executor: a task per row, rows appended as they finish in submission order."""

    def __init__(
        self,
        csv_path: Path,
        bar: tqdm,
        device: str | None,
        num_threads: int | None,
        address: str | None,
    ) -> None:
        super().__init__(csv_path, bar, device, num_threads)
        try:
            import ray
        except ModuleNotFoundError:
            raise ValueError(
                "executor='ray' needs the optional package ray: pip install 'tropnnc[ray]'"
            ) from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        gpus = 1 if device is not None and torch.device(device).type == "cuda" else 0
        threads = num_threads or torch.get_num_threads()
        self.task = ray.remote(compress_row).options(num_cpus=1, num_gpus=gpus)
        self.threads = threads
        self.queue: list[Any] = []  # finished rows (dicts) and pending tasks, in order
        self.shared: dict[int, Any] = {}  # id(object) -> (object, its object-store ref)

    def _ref(self, obj: Any) -> Any:
        """``obj`` in the object store, put once per model (the object is kept next to its
        ref so that its id stays unique; submitted tasks hold their own refs)."""
        if id(obj) not in self.shared:
            self.shared[id(obj)] = (obj, self.ray.put(obj))
        return self.shared[id(obj)][1]

    def add(self, row: Mapping[str, Any]) -> None:
        self.queue.append(dict(row))
        self._flush(wait=False)

    def submit(
        self,
        model: nn.Module,
        test_set: Dataset,
        calib: torch.Tensor | None,
        common: Mapping[str, Any],
        spec: MethodSpec,
        keep: float,
        evaluator: Evaluator,
    ) -> None:
        if id(model) not in self.shared:  # a new model: drop the previous one's objects
            self.shared.clear()
        model_ref = self._ref(model)
        calib_ref = None if calib is None else self._ref(calib)
        self.queue.append(
            self.task.remote(
                model_ref,
                self._ref(test_set),
                calib_ref,
                dict(common),
                spec,
                keep,
                device=self.device,
                num_threads=self.threads,
            )
        )
        self._flush(wait=False)

    def _flush(self, wait: bool) -> None:
        """Append the finished rows at the head of the queue (all of them when ``wait``)."""
        while self.queue:
            head = self.queue[0]
            if not isinstance(head, dict):
                if not wait and not self.ray.wait([head], timeout=0)[0]:
                    return
                head = self.ray.get(head)
            self.queue.pop(0)
            super().add(head)

    def finish(self) -> None:
        self._flush(wait=True)

    def close(self) -> None:
        self.queue.clear()
        self.shared.clear()
        if self.started:
            self.ray.shutdown()


EXECUTORS = ("local", "ray")


def _make_executor(
    name: str,
    csv_path: Path,
    bar: tqdm,
    address: str | None,
    device: str | None,
    num_threads: int | None,
) -> _LocalRows:
    if name not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
    if name == "local":
        if address is not None:
            raise ValueError("address applies to executor='ray' only")
        return _LocalRows(csv_path, bar, device, num_threads)
    return _RayRows(csv_path, bar, device, num_threads, address)


# ------------------------------------------------------------------------------------------
# the committed experiments E1-E4 (results/SUMMARY.md)
# ------------------------------------------------------------------------------------------

MULTI_METHODS = [
    "random",
    "l1",
    "neuron-merging",
    "cup",
    "neural-path-kmeans",
    "srinivas-babu",
    "tropnnc",
    "tropnnc:norm=l1",
    "tropnnc:refine=5",
    "tropnnc+refit",
    "l1+refit",
    "thinet",
]
SINGLE_METHODS = [
    "random",
    "l1",
    "neuron-merging",
    "cup",
    "zonotope-kmeans",
    "neural-path-kmeans",
    "srinivas-babu",
    "tropnnc",
    "tropnnc:norm=l1",
    "tropnnc+refit",
    "thinet",
]

EXPERIMENTS: dict[str, dict[str, Any]] = {
    "E1": {
        "networks": ["e1-mlp"],
        "dataset": ["mnist-3v5", "mnist-4v9"],
        "methods": SINGLE_METHODS,
        "keeps": [0.5, 0.25, 0.1, 0.05, 0.02, 0.01],
        "seeds": [0, 1, 2, 3, 4],
        "layers": "all",
        "train_kw": {"epochs": 40, "patience": 5},
    },  # ~1,600 training digits per pair
    "E2": {
        "networks": ["e2-cnn"],
        "dataset": "fashion-mnist",
        "methods": MULTI_METHODS,
        "keeps": [0.9, 0.75, 0.5, 0.25, 0.1, 0.05],
        "seeds": [0, 1, 2, 3, 4],
        "layers": "fc",
    },
    "E3": {
        "networks": ["lenet-300-100"],
        "dataset": "fashion-mnist",
        "methods": MULTI_METHODS,
        "keeps": [0.5, 0.4, 0.3, 0.2, 0.1, 0.05],
        "seeds": [0, 1, 2, 3, 4],
        "layers": "all",
    },
    "E4": {
        "networks": ["vgg-small"],
        "dataset": "fashion-mnist",
        "methods": [
            "random",
            "l1",
            "neuron-merging",
            "cup",
            "neural-path-kmeans",
            "srinivas-babu",
            "tropnnc",
            "tropnnc+refit",
            "thinet",
        ],
        "keeps": [0.9, 0.75, 0.6, 0.5, 0.25, 0.1],
        "seeds": [0, 1, 2, 3, 4],
        "layers": ["conv", "all"],
        # CPU budget: at most 4 epochs on 30,000 training images, 2,000 test images
        "train_kw": {"epochs": 4, "train_size": 30000},
        "test_size": 2000,
        "calibration_size": 256,
    },
}


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m tropnnc.experiments.sweep --experiment E3 [--out results/E3] ...``"""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--out", type=Path)
    add_grid_arguments(p)
    p.add_argument("--layers", nargs="+")
    p.add_argument("--calibration-size", type=int)
    p.add_argument("--test-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--train-size", type=int)
    p.add_argument(
        "--train-option",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra train() options, e.g. patience=none val_fraction=0",
    )
    p.add_argument("--threads", type=int)
    p.add_argument("--cache-dir", type=Path)
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="ray: one Ray task per row (needs the extra tropnnc[ray])",
    )
    p.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    p.add_argument("--device", help="where the rows run, e.g. cuda (default: cpu)")
    args = p.parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = dict(EXPERIMENTS.get(args.experiment, {}))
    for name in ("networks", "dataset", "methods", "keeps", "seeds", "layers"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    train_kw = dict(cfg.get("train_kw", {}))
    if args.epochs is not None:
        train_kw["epochs"] = args.epochs
    if args.train_size is not None:
        train_kw["train_size"] = args.train_size
    for item in args.train_option:
        key, eq, val = item.partition("=")
        if not eq:
            p.error(f"--train-option {item!r} must be KEY=VALUE")
        train_kw[key] = _value(val)
    missing = [k for k in ("networks", "dataset", "methods", "keeps", "seeds") if k not in cfg]
    if missing:
        p.error(f"give --experiment or all of: {', '.join('--' + m for m in missing)}")
    out = args.out or Path("results") / (args.experiment or "sweep")
    csv_path = run_sweep(
        cfg["networks"],
        cfg["methods"],
        cfg["keeps"],
        cfg["seeds"],
        cfg["dataset"],
        out,
        layers=cfg.get("layers"),
        train_kw=train_kw,
        cache_dir=args.cache_dir,
        calibration_size=args.calibration_size or cfg.get("calibration_size", 2000),
        test_size=args.test_size or cfg.get("test_size"),
        num_threads=args.threads,
        title=args.experiment,
        executor=args.executor,
        address=args.address,
        device=args.device,
    )
    print((csv_path.parent / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
