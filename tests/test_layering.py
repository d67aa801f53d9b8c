"""The layering rule: the modules below the methods (tropical math, clustering, blocks, graph,
surgery, budgets, ...) never import from the methods or anything above them, and never name a
method: everything method-specific lives on the method (``tropnnc.methods.Method``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tropnnc
from tropnnc.methods import methods

SRC = Path(tropnnc.__file__).parent
#: top-level modules and packages of tropnnc at or above the methods
ABOVE = {"methods", "api", "io", "cli", "experiments", "__init__", "__main__"}
#: method names that are also ordinary words below the methods: "l1" is a norm, "tropnnc"
#: the package and the certificate-curve allocator of tropnnc.budget
COMMON_WORDS = {"l1", "tropnnc"}


def _top(parts: tuple[str, ...]) -> str:
    return parts[0].removesuffix(".py")


LOWER = sorted(p for p in SRC.rglob("*.py") if _top(p.relative_to(SRC).parts) not in ABOVE)


def _imported(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """(line, top-level tropnnc module) of every tropnnc import in ``path`` (a file of the
    package whose directory is ``root``), in the order they appear."""
    package = path.relative_to(root).parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            parts = base + tuple(node.module.split(".") if node.module else ())
            tops = [parts[0]] if parts else [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tropnnc."):
            tops = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            tops = [a.name.split(".")[1] for a in node.names if a.name.startswith("tropnnc.")]
        else:
            continue
        found += [(node.lineno, top) for top in tops]
    return found


def test_the_lower_modules_are_found():
    names = {p.relative_to(SRC).as_posix() for p in LOWER}
    assert {"budget.py", "graph/__init__.py", "surgery.py", "tropical.py"} <= names
    assert not any(n.startswith(("methods/", "experiments/")) or n == "api.py" for n in names)


@pytest.mark.parametrize("path", LOWER, ids=lambda p: p.relative_to(SRC).as_posix())
def test_lower_module_imports_nothing_above_it(path):
    above = [(line, top) for line, top in _imported(path) if top in ABOVE]
    assert not above, f"{path.name} imports from above the methods: {above}"


@pytest.mark.parametrize("path", LOWER, ids=lambda p: p.relative_to(SRC).as_posix())
def test_lower_module_names_no_method(path):
    names = set(methods()) - COMMON_WORDS
    named = [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
    ]
    assert not named, f"{path.name} names a method: {named}"


def test_the_import_check_sees_every_form(tmp_path):
    (tmp_path / "cluster").mkdir()
    top = tmp_path / "budget.py"
    top.write_text(
        "from .methods.cup import features\nimport tropnnc.api\n"
        "from . import cli, graph\nfrom .block import Block\nimport numpy\n"
    )
    sub = tmp_path / "cluster" / "lloyd.py"
    sub.write_text(
        "from ..methods import get_method\nfrom . import gram\nfrom tropnnc.io import save\n"
    )
    assert [t for _, t in _imported(top, tmp_path)] == ["methods", "api", "cli", "graph", "block"]
    assert [t for _, t in _imported(sub, tmp_path)] == ["methods", "cluster", "io"]
