"""docs/adding-a-method.md stays true: its code blocks run, in order, and the toy method
they define behaves as the page says."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

import tropnnc
from tropnnc.api import compress_block
from tropnnc.block import Block, certificate

registry = importlib.import_module("tropnnc.methods")  # the package: tropnnc.methods is a function
PAGE = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"


def code_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


@pytest.fixture
def page(monkeypatch):
    """The namespace the page's code leaves behind; its method is registered for this test
    only (a copy of the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    namespace: dict[str, object] = {"__name__": "adding_a_method"}
    for code in code_blocks():
        exec(compile(code, str(PAGE), "exec"), namespace)
    return namespace


def test_the_page_has_the_method_and_its_use():
    blocks = code_blocks()
    assert len(blocks) == 2
    assert "@register" in blocks[0] and "tropnnc.compress(" in blocks[1]


def test_the_toy_method_is_registered_and_runs(page):
    assert "norm-gaps" in tropnnc.methods()
    result = page["result"]
    assert result.method == "norm-gaps" and result.options == {"split": "gaps"}
    with pytest.raises(ValueError, match="norm-gaps: split must be one of"):
        registry.get_method("norm-gaps", split="median")


def test_the_toy_method_merges_runs_of_neighbouring_norms(page):
    # units 0-2 and 3-5 have norms 1, 1.1, 1.2 and 5, 5.2, 5.4: the widest gap splits them
    w = torch.tensor(
        [[1.0, 0], [0, 1.1], [1.2, 0], [5.0, 0], [0, 5.2], [5.4, 0]], dtype=torch.float64
    )
    w = torch.cat([w, torch.zeros(6, 1, dtype=torch.float64)], dim=1)  # (6, 3): bias 0
    out = torch.arange(1.0, 7.0, dtype=torch.float64).reshape(6, 1, 1)
    block = Block("fc", w, out)
    merge = compress_block(page["NormGaps"](), block, 2, torch.Generator())
    assert merge.assignment.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(merge.rows, torch.stack([w[:3].mean(0), w[3:].mean(0)]))
    torch.testing.assert_close(merge.out, torch.tensor([[[6.0]], [[15.0]]], dtype=torch.float64))
    assert bool((certificate(block, merge) > 0).all())  # share form: a certificate
    heights = page["NormGaps"]().merge_heights(block)
    torch.testing.assert_close(
        torch.from_numpy(heights), torch.tensor([0.1, 0.1, 0.2, 0.2, 3.8], dtype=torch.float64)
    )


def test_the_registry_is_restored_after_the_page():  # runs after the tests above
    assert "norm-gaps" not in tropnnc.methods()
