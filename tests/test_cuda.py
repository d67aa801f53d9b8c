"""The CUDA path: skipped cleanly on machines without a GPU.

A model on the GPU is compressed there (tropnnc merges on the weights' device; the other
methods work on CPU copies of the blocks) and must give the merge the CPU gives, with the
result's parameters on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tropnnc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)
    )


@pytest.mark.parametrize(
    "method",
    [
        "tropnnc",
        "l1",
        "neural-path-kmeans",
        "srinivas-babu",
        "model-folding",
        "cup",
        "neuron-merging",
    ],
)
def test_compress_on_cuda_matches_cpu(method):
    cpu = _model()
    gpu = _model().cuda()
    a = tropnnc.compress(cpu, 0.5, method, seed=3)
    b = tropnnc.compress(gpu, 0.5, method, seed=3)
    assert all(p.is_cuda for p in b.model.parameters())
    assert [r.assignment for r in a.blocks] == [r.assignment for r in b.blocks]
    x = torch.rand(16, 20)
    torch.testing.assert_close(b.model(x.cuda()).cpu(), a.model(x), rtol=1e-4, atol=1e-4)
