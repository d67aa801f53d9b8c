"""Chained against layer-local input models on deeper fully connected chains (issue 13).

``python results/expected-error/chains.py [--out-root results/expected-error]`` writes
``chains-mlp4`` (MLP 784-500-300-100-10, every layer, 5 seeds) and ``chains-lenet5`` (LeNet-5,
its FC layers, 3 seeds), on Fashion-MNIST; each sweep resumes from its ``results.csv``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tropnnc.experiments.sweep import run_sweep

KEEPS = [0.5, 0.3, 0.2, 0.1, 0.05]
SEEDS = {"chains-mlp4": [0, 1, 2, 3, 4], "chains-lenet5": [0, 1, 2]}
BASE = [
    "tropnnc+ls",
    "tropnnc+ls:ls.inputs=local",
    "model-folding",
    "neural-path-kmeans",
    "tropnnc",
]
RUNS = {
    "chains-mlp4": dict(
        networks="mlp",
        layers="all",
        configs={"mlp": {"sizes": [784, 500, 300, 100, 10]}},
        methods=BASE + ["model-folding+ls", "model-folding+ls:ls.inputs=local"],
    ),
    "chains-lenet5": dict(networks="lenet5", layers="fc", configs=None, methods=BASE),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-root", type=Path, default=Path("results/expected-error"))
    p.add_argument("--only", choices=sorted(RUNS), help="run one of the two sweeps")
    args = p.parse_args()
    for name, run in RUNS.items():
        if args.only in (None, name):
            run_sweep(
                run["networks"],
                run["methods"],
                KEEPS,
                SEEDS[name],
                "fashion-mnist",
                args.out_root / name,
                layers=run["layers"],
                configs=run["configs"],
                num_threads=1,
            )


if __name__ == "__main__":
    main()
