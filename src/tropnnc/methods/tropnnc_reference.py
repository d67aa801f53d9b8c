"""TropNNC in plain PyTorch: the paper's algorithm on one block, to read top to bottom.

:class:`tropnnc.methods.tropnnc.TropNNC` computes the same merge, interleaved with what makes
it fast on large blocks: k-means in Gram space with restarts batched in one buffer, greedy
seeding, float32 Gram products, chunked passes, and fallbacks for degenerate clusters. This
file has none of that: one k-means run, no chunking, no fallbacks (it assumes that no cluster
empties and no unit is zero, true for generic weights). It is the multi-output form with the
paper's defaults (masses with the 2-norm of the output slices, the merged rows are the unit
centroids); ``tests/test_tropnnc_reference.py`` checks that both give the same merge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..block import Merge


def reference_merge(
    weight: Tensor,
    out: Tensor,
    k: int,
    *,
    generator: torch.Generator | None = None,
    init: Tensor | None = None,
    iters: int = 100,
) -> Merge:
    """Merge the n units of a block into k.

    ``weight`` (n, D): producer rows w_i (incoming weights, bias last); ``out`` (n, m, r):
    consumer slices c_i. k-means starts from the assignment ``init`` (n,) when given, else
    from k-means++ seeds drawn with ``generator``, and runs at most ``iters`` reassignments.
    """
    # 1. unit i is a direction d_i with a mass m_i: its generators c_ji w_i in the output
    #    zonotopes have lengths |c_ji| ||w_i||, and the error bound of a merge weighs its
    #    angle to the merged direction by them
    norms = weight.norm(dim=1)  # (n,) ||w_i||
    d = weight / norms[:, None]  # (n, D) unit directions
    mass = norms * out.flatten(1).norm(dim=1)  # (n,) m_i = ||w_i|| ||c_i||

    # 2. weighted spherical k-means of the directions
    def centroids(a: Tensor) -> Tensor:  # (k, D): u_c = normalize(sum_{a(i)=c} m_i d_i)
        u = torch.zeros(k, d.shape[1], dtype=d.dtype).index_add_(0, a, mass[:, None] * d)
        return u / u.norm(dim=1, keepdim=True)

    if init is None:  # k-means++: each next seed ~ m_i (1 - cos to its most similar seed)
        seeds = torch.multinomial(mass, 1, generator=generator)  # (1,)
        for _ in range(k - 1):
            far = (1 - d @ d[seeds].T).amin(dim=1).clamp(min=0)  # (n,)
            seeds = torch.cat([seeds, torch.multinomial(mass * far, 1, generator=generator)])
        a = (d @ d[seeds].T).argmax(dim=1)  # (n,) each unit joins its most similar seed
    else:
        a = init.clone()
    u = centroids(a)  # (k, D)
    for _ in range(iters):
        new = (d @ u.T).argmax(dim=1)  # (n,) each unit joins its most similar centroid
        if torch.equal(new, a):
            break
        a, u = new, centroids(new)

    # 3. merge: cluster c becomes one unit with row u_c, and unit i hands its slices over
    #    with share lambda_i = max(0, <w_i, u_c>), the projection of w_i on u_c
    shares = (weight * u[a]).sum(dim=1).clamp(min=0)  # (n,)
    new_out = torch.zeros(k, *out.shape[1:], dtype=out.dtype)  # (k, m, r)
    new_out.index_add_(0, a, shares[:, None, None] * out)  # c~_c = sum_{a(i)=c} lambda_i c_i
    return Merge(u, new_out, a, shares)
