"""How tight the narrowed heads' certificate is on trained vit-mini networks.

For each attention of the three cached vit-mini networks (``benchmarks/
architectures_accuracy.py``), narrow its heads at keep 0.75 and 0.5 (the split of
``tropnnc.attention.split_width``) and compare the certificate with the largest l2 change
of an output token over the first 2,000 Fashion-MNIST test images (the attention's input
is its LayerNorm's output in the original network).

    OMP_NUM_THREADS=1 .venv/bin/python results/architectures/heads_certificate.py --cache <dir>
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

from tropnnc import attention
from tropnnc.experiments.train_cache import load_split, trained_model
from tropnnc.graph.attention import find_attention
from tropnnc.heads import apply_heads, extract_heads, input_norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None)
    args = parser.parse_args()
    test = load_split("fashion-mnist", "test")
    x = torch.stack([test[i][0] for i in range(2000)])
    print("| seed | attention | keep | certificate | worst error | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed in (0, 1, 2):
        model = trained_model(
            "vit-mini", "fashion-mnist", seed, args.cache, epochs=4, batch_size=128
        )
        for spec in find_attention(model)[0]:
            seen: list[torch.Tensor] = []
            hook = model.get_submodule(spec.norm).register_forward_hook(
                lambda mod, i, out, seen=seen: seen.append(out.detach())
            )
            with torch.no_grad():
                model(x)
            hook.remove()
            h = seen[0]  # (2000, tokens, dim): what the attention reads
            for keep in (0.75, 0.5):
                heads = extract_heads(model, spec)
                ranks = attention.split_width(round(keep * spec.head_dim), spec.head_dim)
                narrowed = attention.narrow(heads, *ranks, *input_norm(model, spec))
                bound = attention.certificate(narrowed, math.sqrt(heads.wq.shape[-1]))
                copied = copy.deepcopy(model)
                apply_heads(copied, spec, narrowed.heads)
                old, new = model.get_submodule(spec.path), copied.get_submodule(spec.path)
                with torch.no_grad():
                    change = (
                        old(h, h, h, need_weights=False)[0] - new(h, h, h, need_weights=False)[0]
                    )
                worst = float(change.norm(dim=-1).max())
                print(
                    f"| {seed} | {spec.path} | {keep} | {bound:.3g} | {worst:.3g} | "
                    f"{bound / worst:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
