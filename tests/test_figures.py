"""The "how it works" figure command (tropnnc.experiments.figures) on a tiny configuration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tropnnc.experiments import figures

RESULTS = Path(__file__).resolve().parents[1] / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_command_writes_every_figure(tmp_path):
    written = figures.main(
        [
            "--out",
            str(tmp_path / "figs"),
            "--results",
            str(RESULTS),
            "--samples",
            "64",
            "--methods",
            "tropnnc",
            "thinet",
        ]
    )
    names = sorted(p.name for p in written)
    assert names == ["accuracy.png", "certificate.png", "zonotopes.png"]
    for p in written:
        assert p.parent == tmp_path / "figs"
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == names  # no temporaries


def test_missing_results_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass --results"):
        figures.main(["--out", str(tmp_path), "--results", str(tmp_path), "--only", "accuracy"])
    assert list(tmp_path.iterdir()) == []


def test_zonogon_is_the_minkowski_sum_of_its_segments():
    # every sum of a subset of generators lies in the polygon, and every vertex is such a sum
    g = np.array([[1.0, 0.5], [-0.5, 1.0], [0.3, -0.8], [2.0, 0.0]])
    poly = figures.zonogon(g)
    assert np.allclose(poly[0], poly[-1])  # closed
    corners = np.array([(np.array(bits) @ g) for bits in np.ndindex(2, 2, 2, 2)])
    vertices = poly[:-1]
    assert all(np.isclose(corners, v).all(axis=1).any() for v in vertices)
    edges = np.diff(poly, axis=0)
    normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1)  # outward for counter-clockwise
    slack = (corners[:, None, :] - poly[None, :-1, :]) * normals[None]
    assert (slack.sum(axis=2) <= 1e-9).all()
    # the support function of the polygon's vertices equals sum_i max(0, <g_i, u>)
    u = np.array([[np.cos(t), np.sin(t)] for t in np.linspace(0, 6.2, 50)])
    assert np.allclose((vertices @ u.T).max(axis=0), figures.support(g, u))


def test_hausdorff_of_a_zonotope_and_a_shifted_generator():
    # [0, g] against [0, g + e] with e orthogonal to g: the distance is |e| (the far corners)
    g = np.array([[2.0, 0.0]])
    assert figures.hausdorff(g, g + np.array([[0.0, 0.25]])) == pytest.approx(0.25, abs=1e-6)
    assert figures.hausdorff(g, g) == 0.0
