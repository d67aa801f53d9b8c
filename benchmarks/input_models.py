"""How much the input model limits the data-free reconstruction (LeNet-300-100, E3).

Compresses the E3 networks (zoo ``lenet-300-100`` trained on Fashion-MNIST, cached like the
sweeps) with ``tropnnc`` + the least-squares reconstruction under three input models and
prints the test accuracy side by side:

- ``local``: every block an isotropic input (``Reconstruction(inputs="local")``);
- ``chained``: the library's default (a hidden layer's input model is the previous block's
  modelled activations);
- ``measured``: an oracle, not a method: each block's pre-activation mean and covariance
  measured on 2,000 training images (the best any Gaussian input model could do).

Run from the repository root (about a minute per seed)::

    .venv/bin/python benchmarks/input_models.py --seeds 0 1 2 3 4 --keeps 0.3 0.2 0.1 0.05
"""

from __future__ import annotations

import argparse
import copy
from unittest import mock

import torch

import tropnnc
import tropnnc.moments as moments
from tropnnc.experiments.train import evaluate
from tropnnc.experiments.train_cache import load_split, trained_model
from tropnnc.reconstruct import Reconstruction

MODES = ("local", "chained", "measured")


@torch.no_grad()
def measured_statistics(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """Mean and covariance of every Linear layer's pre-activations on ``x``, by layer name."""
    stats, h = {}, x.flatten(1).double()
    for name, layer in model.named_children():
        if isinstance(layer, torch.nn.Linear):
            z = h @ layer.weight.double().T + layer.bias.double()
            stats[name] = (z.mean(0), torch.cov(z.T))
            h = z
        elif not isinstance(layer, torch.nn.Flatten):
            h = layer(h)
    return stats


def compress(model: torch.nn.Module, keep: float, seed: int, mode: str, x: torch.Tensor):
    """tropnnc + reconstruction, one layer at a time (forward order, as compress does)."""
    work = copy.deepcopy(model)
    recon = Reconstruction(inputs="local" if mode == "local" else "chained")
    if mode != "measured":
        return tropnnc.compress(work, keep, "tropnnc", reconstruct=recon, seed=seed).model
    for name in ("1", "3"):  # the two hidden layers; the statistics of the compressed-so-far net
        stats = measured_statistics(work, x)[name]

        def oracle(weight, bn, sigma=1.0, gram=None, inputs=None, stats=stats):
            return stats

        with mock.patch.object(moments, "block_statistics", oracle):
            work = tropnnc.compress(work, {name: keep}, "tropnnc", reconstruct=recon, seed=seed)
            work = work.model
    return work


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--keeps", type=float, nargs="+", default=[0.3, 0.2, 0.1, 0.05])
    args = p.parse_args()
    torch.set_num_threads(1)
    test = load_split("fashion-mnist", "test")
    x = load_split("fashion-mnist", "train").tensors[0][:2000]
    sums = {(k, m): 0.0 for k in args.keeps for m in MODES}
    print("seed keep " + " ".join(f"{m:>9}" for m in MODES))
    for seed in args.seeds:
        model = trained_model("lenet-300-100", "fashion-mnist", seed)
        for keep in args.keeps:
            acc = [100 * evaluate(compress(model, keep, seed, m, x), test) for m in MODES]
            for m, a in zip(MODES, acc, strict=True):
                sums[keep, m] += a / len(args.seeds)
            print(f"{seed:4d} {keep:4.2f} " + " ".join(f"{a:9.2f}" for a in acc), flush=True)
    for keep in args.keeps:
        print(" mean " + f"{keep:4.2f} " + " ".join(f"{sums[keep, m]:9.2f}" for m in MODES))


if __name__ == "__main__":
    main()
