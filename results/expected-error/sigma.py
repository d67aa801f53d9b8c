"""The std of the isotropic input model, measured: what decided ``Reconstruction(sigma=None)``.

``python results/expected-error/sigma.py [--out-root results/expected-error/sigma]`` reruns
(or resumes: each sweep reads its ``results.csv``) the sweeps of ``sigma/``:
tropnnc + least squares with the input std of blocks without BatchNorm set to 0.25 / 0.5 /
0.7 / 1 (``ls.sigma=`` sets every such block's std; with chained input models only the first
block's std matters on FC chains), on Fashion-MNIST networks (E3's LeNet-300-100, 5 seeds;
MLP 784-500-300-100-10, LeNet-5's FC layers, e2-cnn's FC layer, 3 seeds), LeNet-5 with every
layer (the default std from the input domain against std 1), and the MNIST subset
(LeNet-300-100, 3 seeds). ``tropnnc+ls`` without ``ls.sigma`` is the default std.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tropnnc.experiments.sweep import run_sweep

STDS = [f"tropnnc+ls:ls.sigma={s}" for s in ("0.25", "0.5", "0.7", "1")]
KEEPS = [0.5, 0.3, 0.2, 0.1, 0.05]
MLP4 = {"mlp": {"sizes": [784, 500, 300, 100, 10]}}
BASELINES = ["model-folding", "neural-path-kmeans", "tropnnc"]
#: folder: (network, dataset, layers, labels, keeps, seeds, zoo configs)
RUNS = {
    "E3": ("lenet-300-100", "fashion-mnist", "all", STDS, KEEPS, [0, 1, 2, 3, 4], None),
    "mlp4": ("mlp", "fashion-mnist", "all", STDS, KEEPS, [0, 1, 2], MLP4),
    "lenet5-fc": ("lenet5", "fashion-mnist", "fc", STDS, KEEPS, [0, 1, 2], None),
    "e2-cnn-fc": ("e2-cnn", "fashion-mnist", "fc", STDS, [0.5, 0.25, 0.1, 0.05], range(5), None),
    "lenet5-all": (
        "lenet5",
        "fashion-mnist",
        "all",
        ["tropnnc+ls", "tropnnc+ls:ls.sigma=1", "model-folding", "tropnnc"],
        [0.5, 0.3, 0.2, 0.1],
        [0, 1, 2],
        None,
    ),
    "mnist-subset": (
        "lenet-300-100",
        "mnist-subset",
        "all",
        ["default", "tropnnc+ls:ls.sigma=1", *BASELINES],
        KEEPS,
        [0, 1, 2],
        None,
    ),
    "mnist-subset-std": (
        "lenet-300-100",
        "mnist-subset",
        "all",
        [f"tropnnc+ls:ls.sigma={s}" for s in ("0.25", "0.7", "1.5")],
        [0.2, 0.1, 0.05],
        [0, 1, 2],
        None,
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-root", type=Path, default=Path("results/expected-error/sigma"))
    p.add_argument("--only", choices=sorted(RUNS), help="run one of the sweeps")
    args = p.parse_args()
    for name, (net, dataset, layers, labels, keeps, seeds, configs) in RUNS.items():
        if args.only in (None, name):
            run_sweep(
                net,
                labels,
                keeps,
                list(seeds),
                dataset,
                args.out_root / name,
                layers=layers,
                configs=configs,
                num_threads=1,
                progress=False,
            )


if __name__ == "__main__":
    main()
