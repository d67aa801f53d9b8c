"""Sweep outputs from result rows: results.json, a Markdown table, accuracy-vs-kept figures."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BASELINE = "uncompressed"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _groups(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str], list[Mapping]]:
    by: dict[tuple[str, str, str], list[Mapping]] = defaultdict(list)
    for r in rows:
        by[(r["dataset"], r["network"], r["layers"])].append(r)
    return dict(by)


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Mean/std of accuracy (%) per (dataset, network, layers, label, keep)."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    meta: dict[tuple, Mapping[str, Any]] = {}
    for r in rows:
        key = (r["dataset"], r["network"], r["layers"], r["label"], float(r["keep"]))
        acc[key].append(100.0 * float(r["accuracy"]))
        meta[key] = r
    return {
        k: {
            "mean": float(np.mean(v)),
            "std": float(np.std(v)),
            "n": len(v),
            "data_driven": bool(meta[k]["data_driven"]),
            "parameters": meta[k]["parameters"],
            "macs": meta[k]["macs"],
        }
        for k, v in acc.items()
    }


def markdown_table(
    rows: Sequence[Mapping[str, Any]], title: str | None = None, notes: Sequence[str] = ()
) -> str:
    """Mean +- std test accuracy (%) per method x keep ratio, one table per network."""
    stats = summarise(rows)
    lines = [f"# {title}" if title else "# Results", ""]
    for (ds, net, lay), group in _groups(rows).items():
        base = [100.0 * float(r["accuracy"]) for r in group if r["label"] == BASELINE]
        keeps = sorted({float(r["keep"]) for r in group if r["label"] != BASELINE}, reverse=True)
        labels = list(dict.fromkeys(r["label"] for r in group if r["label"] != BASELINE))
        seeds = sorted({int(r["seed"]) for r in group})
        lines.append(f"## {net} on {ds}, compressed layers: {lay}")
        lines.append("")
        if base:
            plural = "s" if len(base) > 1 else ""
            lines.append(
                f"Uncompressed: {np.mean(base):.2f} +- {np.std(base):.2f} % "
                f"({len(base)} seed{plural}: {', '.join(map(str, seeds))}). Test accuracy "
                "(%) without fine-tuning, mean +- std over seeds; DD = data-driven "
                "(calibration inputs)."
            )
            lines.append("")
        lines.append("| method | DD | " + " | ".join(f"keep {k:g}" for k in keeps) + " |")
        lines.append("|---|---|" + "---|" * len(keeps))
        for label in labels:
            cells = []
            dd = ""
            for k in keeps:
                s = stats.get((ds, net, lay, label, k))
                if s is None:
                    cells.append("")
                    continue
                dd = "yes" if s["data_driven"] else ""
                cells.append(f"{s['mean']:.2f} +- {s['std']:.2f}")
            lines.append(f"| {label} | {dd} | " + " | ".join(cells) + " |")
        params = []
        for k in keeps:
            s = next(
                (stats[key] for key in stats if key[:3] == (ds, net, lay) and key[4] == k), None
            )
            params.append("" if s is None else f"{s['parameters']:,}")
        lines.append("| parameters | | " + " | ".join(params) + " |")
        lines.append("")
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per (dataset, network, layers): accuracy vs % kept, +-1 std band per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise(rows)
    paths = []
    for (ds, net, lay), group in _groups(rows).items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels = list(dict.fromkeys(r["label"] for r in group if r["label"] != BASELINE))
        colors = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Dark2").colors)
        for i, label in enumerate(labels):
            keys = sorted(k for k in stats if k[:4] == (ds, net, lay, label))
            x = np.array([100 * k[4] for k in keys])
            mean = np.array([stats[k]["mean"] for k in keys])
            std = np.array([stats[k]["std"] for k in keys])
            dashed = stats[keys[0]]["data_driven"] if keys else False
            (line,) = ax.plot(
                x,
                mean,
                "--" if dashed else "-",
                marker="o",
                ms=3,
                color=colors[i % len(colors)],
                label=label + (" (data)" if dashed else ""),
            )
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        base = [100.0 * float(r["accuracy"]) for r in group if r["label"] == BASELINE]
        if base:
            ax.axhline(float(np.mean(base)), color="k", lw=0.8, ls=":", label="uncompressed")
        ax.set_xlabel("% of hidden units kept")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{net} on {ds} ({lay}), no fine-tuning")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / f"accuracy_{net}_{ds}_{lay}.png".replace(",", "+").replace("/", "_")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(
    out_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    notes: Sequence[str] = (),
    title: str | None = None,
) -> None:
    """Write results.json, table.md and the figures for ``rows`` into ``out_dir``."""
    out_dir = Path(out_dir)
    payload = {"rows": [{k: _clean(v) for k, v in r.items()} for r in rows], "notes": list(notes)}
    _atomic_write(out_dir / "results.json", json.dumps(payload, indent=1))
    _atomic_write(out_dir / "table.md", markdown_table(rows, title, notes))
    if rows:
        plot(rows, out_dir)
