"""Cost of the least-squares reconstruction on VGG-16, next to the Gram products.

Builds zoo ``vgg16`` with trained-like weights (as ``vgg16_speed.py``) and times, side by side
in one run (medians of ``--repeats``):

(a) ``compress(model, 0.5, "tropnnc")``: the paper's algorithm alone;
(b) ``compress(model, 0.5)``: the default pipeline (tropnnc + ``reconstruct="ls"``);
(c) the Gram products of the row shapes (a) clusters (float32, as ``vgg16_speed.py``),
and prints (b) - (a) (what the reconstruction adds), (b) / (c) and the per-block split.
Run from the repository root::

    .venv/bin/python benchmarks/reconstruct_speed.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vgg16_speed import (  # noqa: E402
    _row_dim,
    build_vgg16,
    loadavg,
    run_grams,
    timed,
    without_input_shape,
)

import tropnnc  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model = build_vgg16(args.seed)
    plain, full, grams = [], [], []
    per_block: dict[str, list[tuple[float, float]]] = {}
    print(f"load before: {loadavg()}  threads: {torch.get_num_threads()}")
    for rep in range(args.repeats):
        with without_input_shape(model):
            # radius=1: the input-domain bounds (timed elsewhere) are left out of both
            t_a, res_a = timed(
                lambda: tropnnc.compress(model, args.keep, "tropnnc", seed=args.seed, radius=1.0)
            )
            t_b, res_b = timed(
                lambda: tropnnc.compress(model, args.keep, seed=args.seed, radius=1.0)
            )
        shapes = [(b.units_before, _row_dim(res_a, b)) for b in res_a.blocks]
        t_c = run_grams(shapes, args.seed)["strips"]
        plain.append(t_a)
        full.append(t_b)
        grams.append(t_c)
        for a, b in zip(res_a.blocks, res_b.blocks, strict=True):
            per_block.setdefault(a.layer, []).append((a.seconds, b.seconds))
        print(
            f"repeat {rep}: (a) {t_a:.2f} s  (b) {t_b:.2f} s  (c) {t_c:.2f} s  "
            f"(b)/(c) {t_b / t_c:.2f}",
            flush=True,
        )
        del res_a, res_b
    a, b, c = (statistics.median(v) for v in (plain, full, grams))
    print(
        f"\nmedians over {args.repeats}: (a) tropnnc {a:.2f} s | (b) default pipeline "
        f"{b:.2f} s | (c) Gram products {c:.2f} s"
    )
    print(
        f"reconstruction adds (b)-(a) = {b - a:.2f} s; (b)/(a) = {b / a:.2f}; "
        f"(b)/(c) = {b / c:.2f} (goal <= 2)"
    )
    print(f"\n{'block':<16}{'tropnnc s':>11}{'+ls s':>9}")
    for layer, times in per_block.items():
        ta = statistics.median(t[0] for t in times)
        tb = statistics.median(t[1] for t in times)
        print(f"{layer:<16}{ta:>11.3f}{tb:>9.3f}")
    print(f"load after: {loadavg()}")


if __name__ == "__main__":
    main()
