"""Clustering kernels: weighted spherical k-means (with eigenvector refinement), k-means, Ward.

Everything runs in *Gram space*, so the cost of a Lloyd step depends neither on the dimension
of the points (later layers have 25,088-dim units) nor on the number of clusters: the points
are read once, by the Gram product, and a centroid is a coefficient vector over the points.
Nothing here assumes a device: tensors stay where the inputs are. The only Python loops are
over seeding steps, Lloyd / refinement / power iterations, cluster-size buckets, restarts
and memory chunks.

One job per file, in the order a clustering runs:

* :mod:`.gram`: the Gram products and what is read off them (merged Grams, member cosines);
* :mod:`.seeding`: k-means++ seeds (greedy on 1 - cos for the spherical case);
* :mod:`.lloyd`: Lloyd iterations in Gram space, restarts sharing one score buffer;
* :mod:`.refine`: the eigenvector refinement of a spherical clustering;
* :mod:`.spherical`, :mod:`.euclidean`, :mod:`.ward`: the entry points;
* helpers: :mod:`._checks` (input validation), :mod:`._restarts` (per-restart sums and
  counts), :mod:`.residual` (the objectives), :mod:`.degenerate` (empty clusters and
  clusters whose sum vanishes), :mod:`.results` (the returned records).

Chunk sizes come from :mod:`tropnnc._memory`.
"""

from __future__ import annotations

from .euclidean import kmeans, kmeans_gram
from .gram import (
    combine_rows,
    cosine_gram,
    gram_dtype,
    gram_matrix,
    gram_of_chunks,
    member_cosines,
    merged_gram,
)
from .residual import cosine_residual
from .results import Clustering, GramClustering
from .spherical import spherical_kmeans, spherical_kmeans_gram
from .ward import ward, ward_threshold

__all__ = [
    "Clustering",
    "GramClustering",
    "cosine_gram",
    "combine_rows",
    "cosine_residual",
    "gram_dtype",
    "gram_matrix",
    "gram_of_chunks",
    "kmeans",
    "kmeans_gram",
    "member_cosines",
    "merged_gram",
    "spherical_kmeans",
    "spherical_kmeans_gram",
    "ward",
    "ward_threshold",
]
