"""The dependency declaration: installing tropnnc beside a user's PyTorch must not replace it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dependencies() -> list[str]:
    return _pyproject()["project"]["dependencies"]


def _torch_requirement() -> Requirement:
    (torch,) = [r for r in map(Requirement, _dependencies()) if r.name == "torch"]
    return torch


def test_torch_is_a_range_that_admits_the_installed_and_newer_releases():
    spec = _torch_requirement().specifier
    assert not any(s.operator in ("==", "===") for s in spec), f"torch is pinned: {spec}"
    installed = Version(metadata.version("torch"))
    assert spec.contains(installed.public), (installed, spec)
    for version in ("2.13.0", "2.13.0+cpu", "2.14.0", "2.14.1"):
        assert spec.contains(version), (version, spec)
    assert not spec.contains("2.12.1")  # older than anything tested


def test_vision_extra_names_a_torchvision_range():
    (req,) = map(Requirement, _pyproject()["project"]["optional-dependencies"]["vision"])
    assert req.name == "torchvision" and req.specifier.contains("0.29.1")


def _dry_run(tmp_path: Path, torch_version: str) -> subprocess.CompletedProcess:
    """``pip install --dry-run`` of the project's dependencies, offline, in an environment
    where ``torch_version`` is the installed torch (a metadata-only stand-in placed first
    on the path, so pip sees it instead of the real one)."""
    site = tmp_path / f"site-{torch_version}"
    info = site / f"torch-{torch_version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n"
    )
    (info / "RECORD").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PYTHONPATH=str(site))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--quiet",
            "--disable-pip-version-check",
            "--report",
            str(tmp_path / "report.json"),
            *_dependencies(),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_installing_beside_torch_2_14_1_leaves_torch_alone(tmp_path):
    """With torch 2.14.1 installed, resolving tropnnc's dependencies offline succeeds and
    installs nothing: pip would not touch torch (a pin made it replace torch by 2.13.0)."""
    pytest.importorskip("pip")
    done = _dry_run(tmp_path, "2.14.1")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [item["metadata"]["name"] for item in report["install"]] == []
    # the check can fail: a torch outside the range would have to be replaced
    done = _dry_run(tmp_path, "2.12.0")
    assert done.returncode != 0 and "torch" in done.stderr
