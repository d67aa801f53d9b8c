"""vit-mini: how to split a head's width budget between the query-key and value circuits.

Narrows only the attention heads of the trained vit-mini networks (the cache of
``benchmarks/architectures_accuracy.py``, seeds 0-2) to query/key width ``qk`` and value
width ``v`` per head (2 * average width = qk + v, so the same MACs for every split) and
prints the mean accuracy on the 2,000-image test subset of that script.

    OMP_NUM_THREADS=1 .venv/bin/python results/architectures/heads_split.py \
        --cache <dir> --dataset fashion-mnist
"""

from __future__ import annotations

import argparse
import statistics
from unittest import mock

import torch

import tropnnc
from tropnnc import attention
from tropnnc.experiments.train import evaluate
from tropnnc.experiments.train_cache import load_split, trained_model

#: (keep, qk, v) per head of width 8
SPLITS = [
    (0.9, 7, 7), (0.9, 6, 8), (0.9, 5, 8),
    (0.75, 8, 4), (0.75, 7, 5), (0.75, 6, 6), (0.75, 5, 7), (0.75, 4, 8),
    (0.5, 6, 2), (0.5, 5, 3), (0.5, 4, 4), (0.5, 3, 5), (0.5, 2, 6), (0.5, 1, 7),
    (0.25, 2, 2), (0.25, 1, 3),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None)
    parser.add_argument("--dataset", default="fashion-mnist")
    args = parser.parse_args()
    test = load_split(args.dataset, "test")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    test = torch.utils.data.Subset(test, idx[:2000].tolist())
    models = [
        trained_model("vit-mini", args.dataset, s, args.cache, epochs=4, batch_size=128)
        for s in (0, 1, 2)
    ]
    narrow = attention.narrow
    print("| keep | query/key | value | accuracy |\n| --- | --- | --- | --- |")
    for keep, qk, v in SPLITS:
        accuracies = []
        for seed, model in enumerate(models):
            fixed = lambda heads, _qk, _v, *norm, qk=qk, v=v: narrow(heads, qk, v, *norm)  # noqa: E731
            with mock.patch.object(attention, "narrow", fixed):
                keeps = {"blocks.0.attn": keep, "blocks.1.attn": keep}
                result = tropnnc.compress(model, keeps, seed=seed)
            accuracies.append(evaluate(result.model, test))
        print(f"| {keep} | {qk} | {v} | {100 * statistics.mean(accuracies):.2f} |", flush=True)


if __name__ == "__main__":
    main()
