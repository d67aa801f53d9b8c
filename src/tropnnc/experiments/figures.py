"""The "how it works" figures of the README and docs/, from one command.

    python -m tropnnc.experiments.figures --out docs/figures

writes three PNGs, deterministically (every random choice is seeded, CPU only, under a minute):

* ``zonotopes.png``: one ReLU layer with one input and a bias, a single output, before and
  after ``tropnnc`` merges its units. Each unit i is the generator |c_i| (a_i, b_i) of the
  positive (c_i > 0) or the negative zonotope; with one input these Newton polytopes live in
  the (weight, bias) plane exactly, no projection. A third panel shows the layer's output
  y(x) = p(x) - q(x) before and after, inside the certificate's band.
* ``certificate.png``: a small MLP trained inline on a synthetic task, every method at one
  keep: the certificate its report gives next to the largest output error found on many
  random inputs inside the certified ball (log scale).
* ``accuracy.png``: test accuracy against keep for the default pipeline, Model Folding,
  neural-path-kmeans and the paper's tropnnc, read from the committed sweeps under
  ``results/expected-error/`` (nothing is recomputed).

Only the public API is used (``tropnnc.compress``, ``tropnnc.methods``, the report), so
the figures show what a user gets. docs/method.md explains what they show.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import tropnnc  # noqa: E402

DPI = 120
#: the committed sweeps figure (c) reads, and the rows it draws (label in the CSV, legend)
SWEEPS = (
    ("E3-chained", "E3: LeNet-300-100, both hidden layers"),
    ("E2", "E2: e2-cnn, FC hidden layer"),
    ("E4", "E4: vgg-small with BatchNorm, conv layers"),
)
CURVES = (
    ("default", "default pipeline"),
    ("model-folding", "model-folding"),
    ("neural-path-kmeans", "neural-path-kmeans"),
    ("tropnnc", "tropnnc (paper)"),
)


def _save(fig: plt.Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically (a temporary file in the same folder, then rename);
    no software tag, so the bytes depend on the drawing only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=DPI, metadata={"Software": None})
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the committed file private
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# --- (a) zonotopes before and after merging ------------------------------------------------


def zonogon(generators: np.ndarray) -> np.ndarray:
    """Vertices (counter-clockwise, closed) of the 2-D zonotope sum_i [0, g_i].

    Each generator is turned to point into the upper half-plane (the segment [0, g] becomes
    g' + [0, -g'] with g' = 0 when g already points up, g otherwise), the generators are
    sorted by angle, and the boundary is walked from the lowest vertex by adding them in
    that order, then subtracting them in the same order.
    """
    g = np.asarray(generators, dtype=float).reshape(-1, 2)
    g = g[np.linalg.norm(g, axis=1) > 0]
    if len(g) == 0:
        return np.zeros((1, 2))
    down = (g[:, 1] < 0) | ((g[:, 1] == 0) & (g[:, 0] < 0))
    up = np.where(down[:, None], -g, g)
    start = g[down].sum(axis=0)  # the lowest point: every flipped segment at its far end
    order = np.argsort(np.arctan2(up[:, 1], up[:, 0]), kind="stable")
    steps = np.concatenate([up[order], -up[order]])
    return start + np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])


def support(generators: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """h(u) = sum_i max(0, <g_i, u>): the support function of sum_i [0, g_i] at each u."""
    return np.maximum(directions @ np.asarray(generators, dtype=float).T, 0.0).sum(axis=1)


def hausdorff(gens_a: np.ndarray, gens_b: np.ndarray, count: int = 3600) -> float:
    """Hausdorff distance of two 2-D zonotopes: the largest gap of their support functions
    over ``count`` unit directions (exact up to the grid's resolution)."""
    t = np.linspace(0.0, 2.0 * math.pi, count, endpoint=False)
    u = np.stack([np.cos(t), np.sin(t)], axis=1)
    return float(np.abs(support(gens_a, u) - support(gens_b, u)).max())


def toy_layer(n: int = 14, seed: int = 0) -> nn.Sequential:
    """Linear(1, n) -> ReLU -> Linear(n, 1) whose units lie near four directions of the
    (weight, bias) plane, two for each sign of the output weight."""
    rng = np.random.default_rng(seed)
    centres = np.array([0.35, 1.25, 2.2, 2.95])  # angles of the unit directions (radians)
    sign = np.array([1.0, 1.0, -1.0, -1.0])
    group = np.arange(n) % 4
    angle = centres[group] + rng.normal(0.0, 0.12, n)
    length = rng.uniform(0.6, 1.4, n)
    net = nn.Sequential(nn.Linear(1, n), nn.ReLU(), nn.Linear(n, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(length * np.cos(angle))[:, None])
        net[0].bias.copy_(torch.from_numpy(length * np.sin(angle)))
        net[2].weight.copy_(torch.from_numpy(sign[group] * rng.uniform(0.5, 1.2, n))[None, :])
        net[2].bias.zero_()
    return net.eval()


def _units(net: nn.Sequential) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) rows (a_i, b_i) and (n,) output weights c_i of a one-input, one-output layer."""
    rows = torch.cat([net[0].weight, net[0].bias[:, None]], dim=1)
    return rows.detach().double().numpy(), net[2].weight[0].detach().double().numpy()


def zonotope_figure(path: Path, n: int = 14, k: int = 4, radius: float = 2.0) -> Path:
    """Figure (a): the positive and negative zonotopes of a toy layer before and after
    ``tropnnc`` merges its n units into k, and the layer's output y(x) on [-radius, radius]."""
    net = toy_layer(n)
    result = tropnnc.compress(
        net, k, "tropnnc", seed=0, radius=radius, example_inputs=torch.zeros(1, 1)
    )
    report = result.blocks[0]
    rows, c = _units(net)
    new_rows, new_c = _units(result.model)
    cluster = np.asarray(report.assignment)
    colours = plt.get_cmap("tab10")(np.arange(k) % 10)

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.3))
    distances = []
    panels = (
        (axes[0], 1.0, "P (units with c > 0)", "upper left"),
        (axes[1], -1.0, "Q (c < 0)", "lower left"),
    )
    for ax, sign, name, corner in panels:
        mine, merged = np.sign(c) == sign, np.sign(new_c) == sign
        before = np.abs(c[mine])[:, None] * rows[mine]
        after = np.abs(new_c[merged])[:, None] * new_rows[merged]
        poly = zonogon(before)
        ax.fill(*poly.T, color="0.85", zorder=1, label=f"original: {mine.sum()} generators")
        ax.plot(*zonogon(after).T, color="k", lw=2, zorder=3, label=f"merged: {merged.sum()}")
        for g, a in zip(before, cluster[mine], strict=True):
            ax.annotate("", g, (0, 0), arrowprops={"arrowstyle": "->", "color": colours[a]})
        for g, a in zip(after, np.flatnonzero(merged), strict=True):
            ax.annotate(
                "", g, (0, 0), arrowprops={"arrowstyle": "-|>", "color": colours[a], "lw": 2.5}
            )
        h = hausdorff(before, after)
        distances.append(h)
        ax.set_title(f"{name}\nHausdorff distance {h:.3f}", fontsize=10)
        ax.set_xlabel("weight a (generator = |c| (a, b))")
        ax.set_ylabel("bias b")
        ax.axhline(0, color="0.6", lw=0.5)
        ax.axvline(0, color="0.6", lw=0.5)
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend(loc=corner, fontsize=8)

    x = torch.linspace(-radius, radius, 401, dtype=torch.float64)[:, None]
    with torch.no_grad():
        y, y_new = net(x)[:, 0].numpy(), result.model(x)[:, 0].numpy()
    ax = axes[2]
    xs = x[:, 0].numpy()
    ax.fill_between(
        xs, y - report.certificate, y + report.certificate, color="0.9", label="± certificate"
    )
    ax.plot(xs, y, color="0.4", lw=2, label=f"original ({n} units)")
    ax.plot(xs, y_new, color="k", lw=1.5, ls="--", label=f"merged ({k} units)")
    worst = float(np.abs(y - y_new).max())
    tropical = math.sqrt(radius**2 + 1.0) * sum(distances)  # rho (H(P, P~) + H(Q, Q~))
    ax.set_title(
        f"y(x) = p(x) - q(x) on |x| <= {radius:g}: largest error {worst:.3f}\n"
        f"<= rho (H_P + H_Q) = {tropical:.3f} <= certificate {report.certificate:.3f}",
        fontsize=10,
    )
    ax.set_xlabel("input x")
    ax.legend(loc="best", fontsize=8)
    fig.suptitle(
        f"One ReLU layer as tropical zonotopes: tropnnc merges {n} units into {k} "
        "(thin arrows: original generators, coloured by the merged unit they join; "
        "thick: merged)",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


# --- (b) certificate against measured error ------------------------------------------------


def trained_mlp(d: int = 8, hidden: int = 48, steps: int = 300, seed: int = 0) -> nn.Module:
    """A d -> hidden -> 1 ReLU network fitted (Adam, ``steps`` full-batch steps) to a fixed
    random teacher network on inputs uniform in [0, 1]^d: a small trained model without
    any dataset."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2048, d, generator=gen)
    teacher_w = torch.randn(d, 12, generator=gen)
    teacher_v = torch.randn(12, 1, generator=gen)
    y = torch.relu((x - 0.5) @ teacher_w) @ teacher_v / 4.0
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.mean((net(x) - y) ** 2)
        loss.backward()
        opt.step()
    return net.eval()


def ball_samples(d: int, radius: float, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` inputs with norm <= radius: half uniform in the ball, half on its sphere
    (the error of a ReLU block tends to grow with the input's norm)."""
    direction = torch.randn(count, d, generator=gen)
    direction = direction / direction.norm(dim=1, keepdim=True)
    scale = torch.rand(count, 1, generator=gen) ** (1.0 / d)
    scale[count // 2 :] = 1.0
    return radius * scale * direction


def certificate_figure(
    path: Path, samples: int = 20000, keep: float = 0.25, methods: Sequence[str] | None = None
) -> Path:
    """Figure (b): for the default pipeline and every method (or those in ``methods``) at
    ``keep``, the block's certificate next to the largest |y - y~| over ``samples`` random
    inputs in its ball."""
    d = 8
    net = trained_mlp(d)
    example = torch.zeros(1, d)
    calibration = torch.rand(512, d, generator=torch.Generator().manual_seed(1))
    names = [None, *(tropnnc.methods() if methods is None else methods)]
    certs, worst, notes = [], [], []
    x = None
    for name in names:
        extra = {"calibration": calibration} if name == "thinet" else {}
        result = tropnnc.compress(net, keep, name, seed=0, example_inputs=example, **extra)
        block = result.blocks[0]
        if x is None:  # the same inputs for every method: the ball of the derived radius
            x = ball_samples(d, block.radius, samples, torch.Generator().manual_seed(2))
        with torch.no_grad():
            err = (net(x) - result.model(x)).abs().max().item()
        certs.append(block.certificate)
        worst.append(err)
        note = "" if math.isfinite(block.certificate) else "no certificate"
        if block.data_driven:
            note = f"{note} (data-driven)".strip()
        notes.append(note)
    labels = ["default pipeline" if n is None else n for n in names]

    fig, ax = plt.subplots(figsize=(11, 4.6))
    pos = np.arange(len(names))
    cert_plot = [c if math.isfinite(c) else np.nan for c in certs]
    ax.bar(pos - 0.2, cert_plot, 0.4, color="tab:blue", label="certificate (the report's bound)")
    ax.bar(pos + 0.2, worst, 0.4, color="tab:orange", label=f"largest error on {samples} inputs")
    top = max(max(c for c in certs if math.isfinite(c)), max(worst))
    for p, c, w, note in zip(pos, certs, worst, notes, strict=True):
        if math.isfinite(c):
            ax.text(p - 0.2, c * 1.08, f"{c:.3g}", ha="center", va="bottom", fontsize=7)
        ax.text(p + 0.2, w * 1.08, f"{w:.2g}", ha="center", va="bottom", fontsize=7)
        if note:
            y = c / 1.15 if math.isfinite(c) else top
            ax.text(p - 0.2, y, note, rotation=90, ha="center", va="top", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(top=top * 8)
    ax.set_xticks(pos, labels, rotation=30, ha="right")
    ax.set_ylabel("max |y - y~| over outputs")
    ax.set_title(
        f"Certificate vs measured worst error: MLP {d}-48-1 (trained on a synthetic task), "
        f"keep {keep:g}, inputs with ||x|| <= {block.radius:.3g} (the derived radius)",
        fontsize=10,
    )
    ax.legend(fontsize=9, loc="upper center", ncol=2)
    fig.tight_layout()
    return _save(fig, path)


# --- (c) accuracy against keep from the committed sweeps -----------------------------------


def read_sweep(csv_path: Path) -> dict[str, dict[float, list[float]]]:
    """Test accuracies (%) of a sweep's results.csv, by row label and keep."""
    table: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            table[row["label"]][float(row["keep"])].append(100.0 * float(row["accuracy"]))
    return table


def accuracy_figure(path: Path, results: Path) -> Path:
    """Figure (c): mean accuracy (bars: min to max over seeds) against keep, per sweep of
    ``results/expected-error``."""
    fig, axes = plt.subplots(1, len(SWEEPS), figsize=(13.5, 4.2))
    for ax, (folder, title) in zip(axes, SWEEPS, strict=True):
        csv_path = results / "expected-error" / folder / "results.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(
                f"figures: {csv_path} not found; pass --results <the repository's results/>"
            )
        table = read_sweep(csv_path)
        seeds = 0
        for j, ((label, legend), marker) in enumerate(zip(CURVES, "osD^", strict=True)):
            keeps = sorted(table[label])
            shift = 1.0 + 0.015 * (j - 1.5)  # side by side on the log axis
            acc = [np.asarray(table[label][q]) for q in keeps]
            mean = np.array([a.mean() for a in acc])
            span = np.array([[mean[i] - a.min(), a.max() - mean[i]] for i, a in enumerate(acc)])
            ax.errorbar(
                np.asarray(keeps) * shift, mean, yerr=span.T, marker=marker, capsize=2, label=legend
            )
            seeds = max(seeds, max(len(a) for a in acc))
        base = table["uncompressed"][1.0]
        ax.axhline(float(np.mean(base)), color="0.5", ls=":", label="uncompressed")
        ax.set_xscale("log")
        ticks = sorted({q for label, _ in CURVES for q in table[label]})
        ax.set_xticks(ticks, [f"{q:g}" for q in ticks], rotation=45)
        ax.minorticks_off()
        ax.set_xlabel("keep (fraction of units kept per block)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{title}\n({seeds} seeds, no fine-tuning)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        "Accuracy vs keep, data-free (committed results/expected-error; bars: min-max over seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Write the figure set; returns the paths written."""
    parser = argparse.ArgumentParser(
        prog="python -m tropnnc.experiments.figures", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("docs/figures"), help="output folder")
    parser.add_argument(
        "--results", type=Path, default=Path("results"), help="the committed results/ folder"
    )
    parser.add_argument(
        "--samples", type=int, default=20000, help="random inputs per method in figure (b)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=tropnnc.methods(),
        default=None,
        metavar="METHOD",
        help="methods of figure (b) besides the default pipeline (default: every method)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("zonotopes", "certificate", "accuracy"),
        default=("zonotopes", "certificate", "accuracy"),
        help="draw only these figures",
    )
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples must be at least 1, got {args.samples}")
    written = []
    threads = torch.get_num_threads()
    # one thread: these networks are tiny, and several threads on a busy machine cost 10x
    # the time spinning; fork_rng keeps the caller's random state as it was
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if "zonotopes" in args.only:
                written.append(zonotope_figure(args.out / "zonotopes.png"))
            if "certificate" in args.only:
                written.append(
                    certificate_figure(
                        args.out / "certificate.png", args.samples, methods=args.methods
                    )
                )
            if "accuracy" in args.only:
                written.append(accuracy_figure(args.out / "accuracy.png", args.results))
    finally:
        torch.set_num_threads(threads)
    for p in written:
        print(f"wrote {p} ({p.stat().st_size // 1024} KB)")
    return written


if __name__ == "__main__":
    main()
