"""Real architectures at keep 0.5 (random weights): what is compressed, what is left alone.

For each torchvision model (and timm's vit_tiny_patch16_224 / convnext_tiny when timm is
installed): blocks and channel groups compressed / producers skipped, parameters and MACs
(224x224, one sample) before and after, seconds of ``tropnnc.compress``. Prints a markdown
table; needs torchvision (not a dependency of tropnnc).

    .venv/bin/python benchmarks/architectures.py [--method tropnnc] [--models resnet18 ...]
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch

import tropnnc
from tropnnc.graph import GroupSpec

TORCHVISION = [
    "resnet18",
    "resnet50",
    "densenet121",
    "googlenet",
    "squeezenet1_0",
    "mobilenet_v2",
    "efficientnet_b0",
    "regnet_y_400mf",
    "vit_b_16",
]
TIMM = ["vit_tiny_patch16_224", "convnext_tiny"]


def build(name: str) -> torch.nn.Module | None:
    """A model with random weights, or None when its package is missing."""
    if name in TIMM:
        try:
            timm = importlib.import_module("timm")
        except ImportError:
            return None
        return timm.create_model(name, pretrained=False)
    models = importlib.import_module("torchvision.models")
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return getattr(models, name)(weights=None, **kwargs)


def row(name: str, method: str) -> str:
    torch.manual_seed(0)
    model = build(name)
    if model is None:
        return f"| {name} | (not installed) | | | | |"
    model.eval()
    x = torch.rand(1, 3, 224, 224)
    start = time.perf_counter()
    try:
        result = tropnnc.compress(model, 0.5, method, example_inputs=x)
    except ValueError as exc:
        return f"| {name} | {str(exc)[:80]} | | | | |"
    seconds = time.perf_counter() - start
    groups = sum(isinstance(s, GroupSpec) for s in tropnnc.graph.discover(model)[0])
    blocks = len(result.blocks)
    p0, p1 = result.params_before, result.params_after
    m0, m1 = result.macs_before, result.macs_after
    return (
        f"| {name} | {blocks} ({groups} groups) / {len(result.skipped)} | "
        f"{p0 / 1e6:.2f}M -> {p1 / 1e6:.2f}M ({100 * (1 - p1 / p0):.0f}%) | "
        f"{m0 / 1e9:.3f}G -> {m1 / 1e9:.3f}G ({100 * (1 - m1 / m0):.0f}%) | "
        f"{seconds:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="tropnnc")
    parser.add_argument("--models", nargs="*", default=TORCHVISION + TIMM)
    args = parser.parse_args()
    print(
        "| model | compressed (groups) / skipped | parameters (removed) | MACs (removed) "
        "| seconds |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name in args.models:
        print(row(name, args.method), flush=True)


if __name__ == "__main__":
    main()
