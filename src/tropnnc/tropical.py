"""Tropical geometry of one ReLU block, as pure functions on float64 tensors.

A block with rows ``weight`` (n, D), D = d + 1 (incoming weights, bias last), and output weights
``out`` (n, m) computes y_j(x) = sum_i c_ji relu(<w_i, (x, 1)>) + beta_j. Output j is the
tropical rational function p_j - q_j + beta_j whose extended Newton polytopes are the zonotopes
P_j = sum_{c_ji > 0} [0, c_ji w_i] and Q_j = sum_{c_ji < 0} [0, |c_ji| w_i]. On inputs with
||(x, 1)|| <= rho, |y_j - y~_j| is at most rho times the Hausdorff distances of the P's and
of the Q's (plus the change of beta_j), and the Hausdorff distance of two zonotopes with paired
generators is at most the sum of the generators' distances: every bound below rests on that.

The library uses one function from here: :func:`share_errors`, the per-unit errors of a merge
in which unit i hands its output slices to new row u_a(i) with share lambda_i (the certificate
of :func:`tropnnc.block.certificate`). Everything else is the exact mathematics the tests hold
the library to: the zonotope identities (support functions, tropical evaluation), exact and
sampled Hausdorff distances of zonotopes in dimension D <= 3 (scipy, imported only by them),
and the error bounds of the share merge (:func:`share_bound`) and of the two predecessors
Zonotope K-means (:func:`p5a_bound`) and Neural Path K-means (:func:`p5b_bound`), all
*without* the factor rho.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from . import _memory

if TYPE_CHECKING:
    from scipy.spatial import ConvexHull

__all__ = [
    "block_forward",
    "extend",
    "hausdorff_exact",
    "hausdorff_grid",
    "p5a_bound",
    "p5b_bound",
    "share_bound",
    "share_errors",
    "tropical_forward",
    "zonotope_generators",
    "zonotope_support",
    "zonotope_vertices",
]

_FLAT_TOL = 1e-10  # relative singular value below which a point set counts as flat


# --------------------------------------------------------------------------------------------
# Zonotope identities
# --------------------------------------------------------------------------------------------


def extend(x: Tensor) -> Tensor:
    """(q, d) -> (q, d+1): append the constant 1 that multiplies the bias."""
    ones = torch.ones(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device)  # (q, 1)
    return torch.cat([x, ones], dim=-1)


def zonotope_generators(weight: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """Generators of the positive and negative zonotopes P_j, Q_j of every output j.

    Returns (pos, neg), each (m, n, D): pos[j, i] = c_ji w_i where c_ji > 0, neg[j, i] =
    |c_ji| w_i where c_ji < 0, zero otherwise (a zero generator is a harmless point segment).
    """
    c = out.transpose(0, 1)[:, :, None]  # (m, n, 1)
    g = c.abs() * weight[None, :, :]  # (m, n, D)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    return torch.where(c > 0, g, zero), torch.where(c < 0, g, zero)


def zonotope_support(gens: Tensor, z: Tensor) -> Tensor:
    """Support function of sum_i [0, g_i] at each z: sum_i max(0, <g_i, z>).

    gens (..., n, D), z (..., q, D) -> (..., q). This is the tropical polynomial whose
    extended Newton polytope is the zonotope, evaluated at z = (x, 1).
    """
    if gens.dim() == 2:  # one zonotope: a single 2D matmul is much faster than a batched one
        flat = z.reshape(-1, z.shape[-1]) @ gens.T  # (prod(...) * q, n)
        return flat.clamp(min=0).sum(dim=-1).reshape(z.shape[:-1])
    return (z @ gens.transpose(-1, -2)).clamp(min=0).sum(dim=-1)  # (..., q, n) -> (..., q)


def block_forward(weight: Tensor, out: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """The block's ordinary forward pass, (q, d) -> (q, m)."""
    y = torch.relu(extend(x) @ weight.T) @ out  # (q, n) @ (n, m) -> (q, m)
    return y if bias is None else y + bias


def tropical_forward(weight: Tensor, out: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """The block evaluated as p_j(x) - q_j(x) + beta_j through its zonotopes, (q, d) -> (q, m).

    Equal to :func:`block_forward`; it exists to check the tropical picture.
    """
    pos, neg = zonotope_generators(weight, out)  # (m, n, D) each
    z = extend(x)[None]  # (1, q, D)
    y = (zonotope_support(pos, z) - zonotope_support(neg, z)).T  # (m, q) -> (q, m)
    return y if bias is None else y + bias


# --------------------------------------------------------------------------------------------
# Low-dimensional convex geometry (numpy / scipy), used by the exact Hausdorff distance
# --------------------------------------------------------------------------------------------


def _check_dim(dim: int, name: str) -> None:
    if dim > 3:
        raise ValueError(
            f"{name}: exact zonotope geometry is only implemented for dimension D <= 3 "
            f"(got D = {dim}); for larger blocks use the error bounds (share_bound, p5a_bound, "
            "p5b_bound) instead"
        )


def _as_numpy(t: Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _affine_frame(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Origin (D,) and orthonormal basis (r, D) of the affine hull of ``points`` (N, D).

    Directions whose singular value is below _FLAT_TOL times the largest are dropped, so flat
    (lower-dimensional) point sets get r < D and can be handled in their own coordinates.
    """
    origin = points.mean(axis=0)  # (D,)
    centred = points - origin  # (N, D)
    if centred.shape[0] < 2 or not np.any(centred):
        return origin, np.zeros((0, points.shape[1]))
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    rank = int(np.sum(s > _FLAT_TOL * s[0]))
    return origin, vt[:rank]  # (r, D)


def _hull(coords: np.ndarray) -> ConvexHull:
    """Convex hull of full-dimensional ``coords``; joggled input if Qhull reports degeneracy."""
    from scipy.spatial import ConvexHull, QhullError  # only the exact oracles need scipy

    try:
        return ConvexHull(coords)
    except QhullError:
        return ConvexHull(coords, qhull_options="QJ")


def _extreme_indices(points: np.ndarray) -> np.ndarray:
    """Indices of the extreme points of ``points`` (N, D), flat sets included."""
    origin, basis = _affine_frame(points)
    rank = basis.shape[0]
    if rank == 0:
        return np.zeros(1, dtype=np.int64)
    coords = (points - origin) @ basis.T  # (N, r)
    if rank == 1:
        return np.unique([int(np.argmin(coords[:, 0])), int(np.argmax(coords[:, 0]))])
    return np.asarray(_hull(coords).vertices, dtype=np.int64)


def _nonzero_generators(gens: np.ndarray) -> np.ndarray:
    """Drop generators that are zero up to rounding (they add nothing to the zonotope)."""
    norms = np.linalg.norm(gens, axis=1)  # (n,)
    if norms.size == 0:
        return gens
    return gens[norms > 1e-14 * max(norms.max(), 1e-300)]


def _zonogon_vertices(gens: np.ndarray) -> np.ndarray:
    """Vertices of a 2D zonotope by sorting its edges by angle (exact, no hull needed)."""
    flip = (gens[:, 1] < 0) | ((gens[:, 1] == 0) & (gens[:, 0] < 0))  # (n,)
    shift = gens[flip].sum(axis=0)  # [0, g] = g + [0, -g]
    up = np.where(flip[:, None], -gens, gens)  # (n, 2), angles in [0, pi)
    edges = up[np.argsort(np.arctan2(up[:, 1], up[:, 0]), kind="stable")]
    edges = np.concatenate([edges, -edges])  # (2n, 2), counter-clockwise boundary
    points = shift + np.concatenate([np.zeros((1, 2)), np.cumsum(edges, axis=0)[:-1]])
    e_in = np.roll(edges, 1, axis=0)  # edge arriving at each point
    turn = e_in[:, 0] * edges[:, 1] - e_in[:, 1] * edges[:, 0]  # (2n,)
    scale = np.linalg.norm(e_in, axis=1) * np.linalg.norm(edges, axis=1)
    corner = turn > 1e-12 * scale
    if not corner.any():  # all generators parallel: a segment
        return np.stack([points[0], points[len(up)]])
    return points[corner]


def _vertices_np(gens: np.ndarray) -> np.ndarray:
    """Vertices (V, D) of sum_i [0, g_i] for gens (n, D), D <= 3, as a numpy array."""
    dim = gens.shape[1]
    gens = _nonzero_generators(gens)
    if gens.shape[0] == 0:
        return np.zeros((1, dim))
    if dim == 1:
        lo, hi = np.minimum(gens, 0).sum(), np.maximum(gens, 0).sum()
        return np.array([[lo], [hi]])
    if dim == 2:
        return _zonogon_vertices(gens)
    verts = np.zeros((1, dim))  # (V, D), incremental Minkowski sum with one segment at a time
    for g in gens:
        cand = np.concatenate([verts, verts + g])  # (2V, D)
        verts = cand[_extreme_indices(cand)]
    return verts


def zonotope_vertices(gens: Tensor) -> Tensor:
    """Vertices (V, D) of the zonotope sum_i [0, g_i], gens (n, D) with D <= 3.

    1D: the interval; 2D: edges sorted by angle; 3D: incremental Minkowski sums with a convex
    hull after each segment, where flat intermediate sums are hulled in their own affine
    coordinates (rank from an SVD) and Qhull's joggle option is the last resort. Every vertex
    returned is a subset sum of the generators.
    """
    _check_dim(gens.shape[-1], "zonotope_vertices")
    return torch.from_numpy(_vertices_np(_as_numpy(gens)))


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances (N, E) from points p (N, k) to segments [a_e, b_e], a and b (E, k)."""
    ab = b - a  # (E, k)
    ap = p[:, None, :] - a[None, :, :]  # (N, E, k)
    len2 = np.maximum(np.einsum("ek,ek->e", ab, ab), 1e-300)  # (E,)
    t = np.clip(np.einsum("nek,ek->ne", ap, ab) / len2, 0.0, 1.0)  # (N, E)
    return np.linalg.norm(ap - t[:, :, None] * ab[None], axis=2)


def _triangle_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Distances (N, F) from points p (N, 3) to solid triangles (a_f, b_f, c_f), each (F, 3).

    Inside the triangle's prism the distance is the plane distance; otherwise the nearest point
    lies on one of the three edges.
    """
    v0, v1 = b - a, c - a  # (F, 3)
    v2 = p[:, None, :] - a[None]  # (N, F, 3)
    d00 = np.einsum("fk,fk->f", v0, v0)
    d01 = np.einsum("fk,fk->f", v0, v1)
    d11 = np.einsum("fk,fk->f", v1, v1)
    d20 = np.einsum("nfk,fk->nf", v2, v0)  # (N, F)
    d21 = np.einsum("nfk,fk->nf", v2, v1)
    denom = d00 * d11 - d01**2  # (F,)
    ok = denom > 1e-14 * np.maximum(d00 * d11, 1e-300)  # non-degenerate triangles
    safe = np.where(ok, denom, 1.0)
    v = (d11 * d20 - d01 * d21) / safe
    w = (d00 * d21 - d01 * d20) / safe
    inside = ok & (v >= 0) & (w >= 0) & (v + w <= 1)  # (N, F)
    normal = np.cross(v0, v1)  # (F, 3)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-300)
    plane = np.abs(np.einsum("nfk,fk->nf", v2, normal))  # (N, F)
    edge = np.minimum(
        np.minimum(_segment_distance(p, a, b), _segment_distance(p, b, c)),
        _segment_distance(p, c, a),
    )
    return np.where(inside, plane, edge)


def _distance_to_polytope(points: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Exact Euclidean distances (N,) from ``points`` (N, D) to conv(``verts``), D <= 3.

    The polytope is described in its own affine coordinates (so flat polytopes work): the
    distance splits into the part orthogonal to its affine hull and the in-hull distance,
    which is 0 inside and the distance to the nearest boundary simplex outside.
    """
    origin, basis = _affine_frame(verts)
    rank = basis.shape[0]
    diff = points - origin  # (N, D)
    coords = diff @ basis.T  # (N, r)
    ortho = np.linalg.norm(diff - coords @ basis, axis=1)  # (N,)
    vc = (verts - origin) @ basis.T  # (V, r)
    if rank == 0:
        inner = np.zeros(len(points))
    elif rank == 1:
        inner = np.maximum(vc.min() - coords[:, 0], 0) + np.maximum(coords[:, 0] - vc.max(), 0)
    else:
        hull = _hull(vc)
        scale = max(float(np.abs(vc).max()), 1e-300)
        inside = (coords @ hull.equations[:, :-1].T + hull.equations[:, -1] <= 1e-12 * scale).all(
            axis=1
        )  # (N,)
        simplices = vc[hull.simplices]  # (F, r, r): edges in 2D, triangles in 3D
        step = _memory.rows_per_chunk(
            8 * len(simplices), _memory.CHUNK_BYTES
        )  # (points, facets) float64
        parts = []
        for start in range(0, len(points), step):  # memory bound only
            chunk = coords[start : start + step]
            if rank == 2:
                dist = _segment_distance(chunk, simplices[:, 0], simplices[:, 1])
            else:
                dist = _triangle_distance(chunk, simplices[:, 0], simplices[:, 1], simplices[:, 2])
            parts.append(dist.min(axis=1))
        inner = np.where(inside, 0.0, np.concatenate(parts))
    return np.hypot(ortho, inner)


def hausdorff_exact(gens_a: Tensor, gens_b: Tensor) -> float:
    """Exact Hausdorff distance of the zonotopes sum [0, a_i] and sum [0, b_k], D <= 3.

    The distance to a convex set is convex, so each one-sided distance is attained at a vertex:
    H = max(max_{v in vert A} d(v, B), max_{v in vert B} d(v, A)), with exact point-to-polytope
    distances. Flat zonotopes are handled in their affine hull.
    """
    dim = gens_a.shape[-1]
    _check_dim(max(dim, gens_b.shape[-1]), "hausdorff_exact")
    if gens_b.shape[-1] != dim:
        raise ValueError(f"hausdorff_exact: dimensions differ ({dim} vs {gens_b.shape[-1]})")
    va, vb = _vertices_np(_as_numpy(gens_a)), _vertices_np(_as_numpy(gens_b))
    return float(max(_distance_to_polytope(va, vb).max(), _distance_to_polytope(vb, va).max()))


def _direction_grid(dim: int, count: int) -> np.ndarray:
    """Roughly uniform unit directions: (2, 1), (count, 2) on the circle, Fibonacci sphere."""
    if dim == 1:
        return np.array([[1.0], [-1.0]])
    k = np.arange(count, dtype=np.float64)  # (count,)
    if dim == 2:
        angle = 2 * math.pi * k / count
        return np.stack([np.cos(angle), np.sin(angle)], axis=1)  # (count, 2)
    zc = 1 - 2 * (k + 0.5) / count
    rad = np.sqrt(np.clip(1 - zc**2, 0, None))
    phi = math.pi * (3 - math.sqrt(5)) * k
    return np.stack([rad * np.cos(phi), rad * np.sin(phi), zc], axis=1)  # (count, 3)


def _grid_local_maxima(u: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Indices of grid directions whose value is >= that of their nearest grid neighbours."""
    if u.shape[1] == 2:  # circle: the two neighbours in angle order
        return np.flatnonzero((val >= np.roll(val, 1)) & (val >= np.roll(val, -1)))
    from scipy.spatial import cKDTree

    _, near = cKDTree(u).query(u, k=min(9, len(u)))  # (N, k), the point itself included
    return np.flatnonzero((val[:, None] >= val[near]).all(axis=1))


def _tangent_ring(u: np.ndarray, count: int, offset: float) -> np.ndarray:
    """Unit tangent directions (t, c, D) at each u (t, D): a ring of ``count`` (two in 2D)."""
    if u.shape[1] == 2:
        t1 = np.stack([-u[:, 1], u[:, 0]], axis=1)  # (t, 2)
        return np.stack([t1, -t1], axis=1)  # (t, 2, 2)
    axis = np.eye(3)[np.abs(u).argmin(axis=1)]  # (t, 3), the axis least aligned with u
    t1 = axis - (axis * u).sum(axis=1, keepdims=True) * u
    t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
    t2 = np.cross(u, t1)  # (t, 3)
    phi = offset + 2 * math.pi * np.arange(count) / count  # (c,)
    return np.cos(phi)[None, :, None] * t1[:, None] + np.sin(phi)[None, :, None] * t2[:, None]


def hausdorff_grid(
    gens_a: Tensor, gens_b: Tensor, directions: int = 2048, refine: int = 200
) -> float:
    """Lower estimate of the Hausdorff distance: max of |h_A(u) - h_B(u)| over unit u.

    Evaluates ``directions`` grid directions (2D circle, 3D Fibonacci sphere, exact in 1D),
    then climbs from every positive local maximum of the grid (up to 128 of them) by up to
    ``refine`` rounds of compass search on the sphere (step halved when nothing improves). Every
    value is |h_A(u) - h_B(u)| for a unit u, and H is the largest such gap over unit u, so the
    result never exceeds H: an independent oracle for :func:`hausdorff_exact`, approached from
    below. (numpy inside: the search is many tiny products, where torch's threading overhead
    dominates.)
    """
    dim = gens_a.shape[-1]
    _check_dim(dim, "hausdorff_grid")
    a, b = _as_numpy(gens_a), _as_numpy(gens_b)  # (n_a, D), (n_b, D)

    def gap(u: np.ndarray) -> np.ndarray:  # u (..., D) -> (...,): |h_A(u) - h_B(u)|
        flat = u.reshape(-1, dim)
        h_a = np.maximum(flat @ a.T, 0).sum(axis=1)
        h_b = np.maximum(flat @ b.T, 0).sum(axis=1)
        return np.abs(h_a - h_b).reshape(u.shape[:-1])

    u = _direction_grid(dim, directions)  # (N, D)
    val = gap(u)  # (N,)
    if dim == 1 or refine <= 0:
        return float(val.max())
    peaks = _grid_local_maxima(u, val)
    peaks = peaks[val[peaks] > 0]  # plateaus of zero (A and B share a face) need no search
    if len(peaks) == 0:
        return float(val.max())
    peaks = peaks[np.argsort(-val[peaks], kind="stable")[:128]]
    best_u, best = u[peaks], val[peaks]  # (t, D), (t,)
    spacing = math.sqrt(4 * math.pi / directions) if dim == 3 else 2 * math.pi / directions
    step = np.full(len(peaks), spacing)  # (t,) angular steps
    rows = np.arange(len(peaks))
    for r in range(refine):
        ring = _tangent_ring(best_u, 24, offset=r * 2.399963)  # (t, c, D), golden-angle turns
        s = step[:, None, None]
        cand = np.cos(s) * best_u[:, None, :] + np.sin(s) * ring  # (t, c, D), unit vectors
        cval = gap(cand)  # (t, c)
        idx = cval.argmax(axis=1)
        cbest = cval[rows, idx]  # (t,)
        better = cbest > best
        best_u = np.where(better[:, None], cand[rows, idx], best_u)
        best = np.maximum(best, cbest)
        step = np.where(better, step * 1.5, step * 0.5)
        if (step < 1e-13).all():
            break
    return float(best.max())


# --------------------------------------------------------------------------------------------
# Error bounds of merges, all without the factor rho
# --------------------------------------------------------------------------------------------


def share_errors(weight: Tensor, assignment: Tensor, shares: Tensor, rows: Tensor) -> Tensor:
    """Per unit (n,), float64: ||w_i - lambda_i rows[a(i)]||, or ||w_i|| if dropped (a(i) = -1).

    Computed in float64 from the rows as given (float32 rows are widened exactly), on their
    device, in row chunks of bounded size: O(n D).
    """
    n, dim = weight.shape
    f64 = {"dtype": torch.float64, "device": weight.device}
    err = torch.empty(n, **f64)
    step = _memory.rows_per_chunk(8 * dim, _memory.SLICE_BYTES)  # float64 rows
    for s in range(0, n, step):
        a = assignment[s : s + step]
        w = weight[s : s + step].to(**f64, copy=True)  # (c, D) private float64 copy
        if rows.shape[0]:
            lam = shares[s : s + step].to(**f64) * (a >= 0)  # dropped units: approx 0
            u = rows.index_select(0, a.clamp(min=0))  # widened inside addcmul_
            w.addcmul_(u, lam[:, None], value=-1.0)  # w_i - lambda_i u_a(i), float64
        err[s : s + step] = torch.linalg.vector_norm(w, dim=1)
    return err


def share_bound(
    weight: Tensor, out_abs: Tensor, assignment: Tensor, shares: Tensor, rows: Tensor
) -> Tensor:
    """The share-merge bound per output (m,): sum_i out_abs[i, j] ||w_i - lambda_i rows[a(i)]||,
    without rho.

    Unit i was merged into new row a(i) with share lambda_i = ``shares[i]`` >= 0 (the new
    slices are share-weighted sums of the old ones); a(i) = -1 means dropped, error ||w_i||.
    Valid for any rows and nonnegative shares: each unit's generator moves by at most its
    share error, and zonotope distances add over generators. float64, see
    :func:`share_errors`.
    """
    err = share_errors(weight, assignment, shares, rows)  # (n,)
    bound = torch.zeros(out_abs.shape[1], dtype=torch.float64, device=weight.device)  # (m,)
    step = _memory.rows_per_chunk(8 * out_abs.shape[1], _memory.SLICE_BYTES)  # float64 rows
    for s in range(0, err.shape[0], step):
        bound += err[s : s + step] @ out_abs[s : s + step].to(torch.float64)
    return bound


def _cluster_means(values: Tensor, assignment: Tensor) -> Tensor:
    """Per unit, the mean (n, k) of ``values`` (n, k) over its cluster; 0 for dropped units."""
    live = assignment >= 0
    idx = assignment.clamp(min=0)
    size = int(assignment.max()) + 1 if live.any() else 1
    sums = torch.zeros((size, values.shape[1]), dtype=values.dtype)  # (K, k)
    sums.index_add_(0, idx[live], values[live])
    counts = torch.zeros(size, dtype=values.dtype)  # (K,)
    counts.index_add_(0, idx[live], torch.ones(int(live.sum()), dtype=values.dtype))
    means = sums / counts.clamp(min=1)[:, None]
    return torch.where(live[:, None], means[idx], torch.zeros((), dtype=values.dtype))


def p5a_bound(gens: Tensor, assignment: Tensor) -> float:
    """Zonotope K-means bound (predecessor, without rho): sum_i ||g_i - mean_{C(i)}(g)||.

    gens (n, D); units with assignment -1 count as dropped (error ||g_i||).
    """
    means = _cluster_means(gens, assignment)  # (n, D)
    return float((gens - means).norm(dim=1).sum())


def p5b_bound(weight: Tensor, out: Tensor, assignment: Tensor) -> Tensor:
    """Neural Path K-means bound per output (m,), without rho.

    sum_i |c_ji| ||w_i - mean_C(w)|| + ||mean_C(w)|| |c_ji - mean_{C,j}(c)|, C the cluster of
    unit i, for the merge w~ = mean of w, c~ = sum of c. Dropped units (-1) count |c_ji| ||w_i||.
    """
    w_mean = _cluster_means(weight, assignment)  # (n, D)
    c_mean = _cluster_means(out, assignment)  # (n, m)
    w_err = (weight - w_mean).norm(dim=1)  # (n,)
    return (out.abs() * w_err[:, None] + w_mean.norm(dim=1)[:, None] * (out - c_mean).abs()).sum(
        dim=0
    )  # (m,)
