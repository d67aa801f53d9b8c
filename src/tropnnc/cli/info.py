"""``tropnnc info``: the layers of a model and which of them can be compressed."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .. import io
from ..counting import layer_macs
from .arguments import parse_shape
from .common import CLIError, add_model_arguments, emit, example_inputs, model_from_args, one_line

HELP = "per-layer widths, parameters, MACs and compressible blocks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tropnnc info``."""
    add_model_arguments(p)
    p.add_argument("--input-shape", type=parse_shape, help="one input's shape, e.g. 1,28,28")


def run(args: argparse.Namespace) -> int:
    """Print each layer's widths, parameters, MACs and whether it is compressible."""
    from ..counting import count_params
    from ..graph import TraceError, discover
    from ..graph.attention import find_attention

    model = model_from_args(args, random_init=True)
    try:
        specs, skipped = discover(model)
        untraced = None
    except TraceError as exc:
        specs, skipped, untraced = [], [], str(exc)
    sites, site_skips = find_attention(model)
    heads = {s.path: f"heads narrowable ({s.heads} x {s.head_dim})" for s in sites}
    heads.update({s.layer: f"no: {s.reason}" for s in site_skips})
    members = {
        p.layer: (s, p)
        for s in specs  # every producer and depthwise member
        for p in (*s.producers, *getattr(s, "channelwise", ()))
    }
    blocks = {name: s for name, (s, _) in members.items()}
    reasons = {s.layer: s.reason for s in skipped}
    example = example_inputs(model, args.input_shape)
    macs: dict[str, int] = {}
    if example is not None:
        try:
            macs = layer_macs(model, example)
        except Exception as exc:  # a wrong --input-shape, a model needing other inputs
            raise CLIError(
                f"cannot run {args.model} on an input of shape "
                f"{tuple(example.shape[1:])} to count MACs: {one_line(exc)} "
                "(use --input-shape)"
            ) from None
    rows = []
    for name, mod in model.named_modules():
        owner = name.rpartition(".")[0]
        if isinstance(mod, nn.MultiheadAttention):
            rows.append(_attention_row(name, mod, macs.get(name), heads[name]))
            continue
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or isinstance(
            model.get_submodule(owner) if owner else None, nn.MultiheadAttention
        ):  # an attention's own projection: in the attention's row
            continue
        linear = isinstance(mod, nn.Linear)
        spec = blocks.get(name)
        if owner in heads and name.rpartition(".")[2] in ("qkv", "proj"):
            status = heads[owner].replace("heads narrowable", f"heads of {owner} narrowable")
        elif spec is not None:
            status = (
                f"compressible -> {spec.consumer}"
                if not hasattr(spec, "channelwise")
                else f"compressible in channel group {spec.producer} ({len(spec.layers)} layers)"
            )
            bn = members[name][1].bn
            status += f" (folds {bn})" if bn else ""
        else:
            status = f"no: {reasons.get(name) or untraced or 'not reached by the forward pass'}"
        rows.append(
            {
                "layer": name,
                "type": type(mod).__name__,
                "in": mod.in_features if linear else mod.in_channels,
                "out": mod.out_features if linear else mod.out_channels,
                "kernel": None if linear else list(mod.kernel_size),
                "params": sum(p.numel() for p in mod.parameters(recurse=False)),
                "macs": macs.get(name),
                "compressible": spec is not None,
                "consumer": None if spec is None else spec.consumer,
                "batchnorm": None if spec is None else members[name][1].bn,
                "status": status,
            }
        )
    total_params = count_params(model)
    total_macs = sum(macs.values()) if macs else None
    data = {
        "model": args.model,
        "class": type(model).__name__,
        "input_shape": None if example is None else list(example.shape[1:]),
        "dtype": _dtype(model),
        "params": total_params,
        "macs": total_macs,
        "layers": rows,
        "compressible_blocks": len(specs),
        "attention": len(sites),
    }
    if args.weights is None and not Path(args.model).exists():
        data["weights"] = "random initialization (no --weights)"
    if Path(args.model).is_dir():
        plan = io.read_manifest(args.model).get("compression") or {}
        data["compression"] = {k: plan.get(k) for k in ("method", "seed", "keep", "widths")}
    emit(args, _info_text(data), data)
    return 0


def _attention_row(
    name: str, mod: nn.MultiheadAttention, macs: int | None, status: str
) -> dict[str, Any]:
    """The row of an ``nn.MultiheadAttention`` (its projections are not Linear calls)."""
    return {
        "layer": name,
        "type": "MultiheadAttention",
        "in": mod.embed_dim,
        "out": mod.embed_dim,
        "kernel": None,
        "params": sum(p.numel() for p in mod.parameters()),
        "macs": macs,
        "compressible": status.startswith("heads"),
        "consumer": None,
        "batchnorm": None,
        "status": status,
    }


def _dtype(model: nn.Module) -> str | None:
    param = next(model.parameters(), None)
    return None if param is None else str(param.dtype)


def _info_text(data: Mapping[str, Any]) -> str:
    tw = max([8] + [len(r["type"]) + 1 for r in data["layers"]])  # the type column's width
    head = f"{'layer':<24}{'type':<{tw}}{'in':>7}{'out':>7}{'kernel':>8}{'params':>11}{'MACs':>12}"
    lines = [
        f"{data['model']} ({data['class']}, {data['dtype']}, input {data['input_shape']})",
        head,
    ]
    for r in data["layers"]:
        kernel = "x".join(map(str, r["kernel"])) if r["kernel"] else "-"
        macs = "-" if r["macs"] is None else str(r["macs"])
        lines.append(
            f"{r['layer']:<24}{r['type']:<{tw}}{r['in']:>7}{r['out']:>7}{kernel:>8}"
            f"{r['params']:>11}{macs:>12}  {r['status']}"
        )
    macs = "-" if data["macs"] is None else data["macs"]
    lines.append(
        f"total: {data['params']} parameters, {macs} MACs, "
        f"{data['compressible_blocks']} compressible blocks"
        + (
            f", {data['attention']} attention modules with narrowable heads"
            if data["attention"]
            else ""
        )
    )
    if "weights" in data:
        lines.append(f"weights: {data['weights']}")
    if "compression" in data and data["compression"].get("method"):
        c = data["compression"]
        lines.append(f"compressed with {c['method']} (seed {c['seed']}), widths {c['widths']}")
    return "\n".join(lines)
