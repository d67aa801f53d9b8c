"""How large a chunk of a chunked pass may be: the byte budgets, named once, and the one rule.

Large blocks do not fit in one temporary (VGG-16's conv5_3 -> fc6 consumer alone is 400 MB),
so passes over them work a chunk of rows at a time. A chunk holds as many rows as keep its
temporary under a byte budget; the budget depends on what the temporary is for. Chunk sizes
only bound memory: every result is the same for any budget (the tests shrink the budgets to a
few bytes to check it), except for the order of floating-point sums across chunks, which the
fixed values below keep reproducible.

Callers read the budgets as ``_memory.NAME`` at call time, so tests can shrink them with
``monkeypatch.setattr(_memory, NAME, ...)``.
"""

from __future__ import annotations

#: k-means restarts processed together share one (restarts, K, n) score buffer of this size
RESTART_BUFFER_BYTES = 1 << 25  # 32 MB
#: temporaries of row-chunked passes over large matrices: big enough to amortise the
#: per-chunk overhead, small enough for the allocator to recycle them
CHUNK_BYTES = 1 << 24  # 16 MB
#: chunked passes over consumer slices and per-unit share errors, kept in the CPU cache
SLICE_BYTES = 1 << 22  # 4 MB
#: temporaries consumed right after they are made (transposes, streaming products, the
#: quadrature planes of pairwise moments), sized to stay in cache
CACHE_BYTES = 1 << 21  # 2 MB


def rows_per_chunk(row_bytes: int, budget: int) -> int:
    """Rows per chunk so that a temporary of ``row_bytes`` bytes per row stays within
    ``budget`` bytes; at least 1 (a single row larger than the budget is still one chunk)."""
    return max(1, budget // max(1, row_bytes))
