"""The README's main job: compress a small Fashion-MNIST network with every method.

``run_demo(out_dir)`` trains LeNet-300-100 on Fashion-MNIST on first use (cached), compresses
both hidden layers with the default pipeline (what ``compress(model, keep)`` runs), every
registered method that applies, and ``tropnnc+refit`` at a few
keep ratios (``thinet`` and ``tropnnc+refit`` read 2,000 training images), and writes the
results, a Markdown table and the accuracy-vs-kept plot into ``out_dir``. A couple of minutes
on two CPU cores, most of it training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..methods import method_class, methods
from .sweep import run_sweep
from .train_cache import outputs_of

log = logging.getLogger(__name__)


def demo_methods(dataset: str) -> tuple[list[str], list[str]]:
    """The default pipeline, every registered method that applies to ``dataset``'s network,
    plus tropnnc+refit; and notes on the ones left out."""
    chosen, notes = [], []
    for name in methods():
        if not method_class(name).multi_output and outputs_of(dataset) > 1:
            notes.append(f"{name} left out: it handles single-output networks only")
            continue
        chosen.append(name)
    chosen.insert(
        chosen.index("tropnnc") + 1 if "tropnnc" in chosen else len(chosen), "tropnnc+refit"
    )
    return ["default", *chosen], notes


def run_demo(
    out_dir: str | Path,
    quick: bool = False,
    *,
    network: str = "lenet-300-100",
    dataset: str = "fashion-mnist",
    config: dict[str, Any] | None = None,
    keeps: Sequence[float] | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    calibration_size: int = 2000,
    progress: bool = True,
    train_kw: dict[str, Any] | None = None,
) -> Path:
    """Run the demo; returns the path of the Markdown table (``out_dir/table.md``).

    ``config`` overrides the zoo network's constructor arguments.
    ``quick=True`` uses two keep ratios, two training epochs and a 2,000-image test subset.
    """
    chosen, notes = demo_methods(dataset)
    for note in notes:
        log.info(note)
    keeps = list(keeps) if keeps is not None else ([0.5, 0.1] if quick else [0.5, 0.3, 0.1])
    kw = dict(train_kw or {})
    if quick:
        kw.setdefault("epochs", 2)
    csv_path = run_sweep(
        network,
        chosen,
        keeps,
        [seed],
        dataset,
        out_dir,
        calibration_size=calibration_size,
        progress=progress,
        cache_dir=cache_dir,
        train_kw=kw,
        configs=None if config is None else {network: config},
        test_size=2000 if quick else None,
        title=f"Demo: {network} on {dataset}, seed {seed}",
    )
    table = csv_path.parent / "table.md"
    if notes:
        with table.open("a") as f:
            f.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return table
