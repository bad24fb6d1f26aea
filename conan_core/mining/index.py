"""A FAISS inner-product index over one corpus shard, and the search call that avoids faiss's slow path.

Vectors are L2-normalised, so inner product = cosine. faiss 1.15.1 only uses BLAS when a search call has
at least `distance_compute_blas_threshold` (128000 by default) / d queries and is about 10x slower below
that (measured on this machine, platform notes §6c), so the threshold is lowered once per process.
"""

from __future__ import annotations

import faiss
import numpy as np

from conan_core.errors import ConanError

BLAS_THRESHOLD = 20
IVF_MIN_POINTS_PER_LIST = 39  # faiss warns (and clusters badly) below 39 training points per list


def configure_faiss(threads: int) -> None:
    """Size faiss's OpenMP pool to this process's share of the cores and always take the BLAS path."""
    faiss.omp_set_num_threads(max(1, threads))
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def build_index(vectors: np.ndarray, kind: str = "flat", nlist: int = 256, nprobe: int = 16) -> faiss.Index:
    """Flat (exact) or IVF-flat inner-product index over `vectors` [n, d] float32."""
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise ConanError(f"index vectors must be a 2-d float32 array, got {vectors.dtype} {vectors.shape}")
    dim = vectors.shape[1]
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        # Small shards cannot train many lists; shrink nlist rather than fail.
        lists = max(1, min(nlist, len(vectors) // IVF_MIN_POINTS_PER_LIST))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nprobe, lists)
    else:
        raise ConanError(f"unknown index type {kind!r} (expected flat or ivf)")
    index.add(vectors)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int, batch_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores [q, k] float32, rows [q, k] int64) per query; missing slots have row -1 and score -inf."""
    k = max(1, k)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(queries), batch_size):
        part = np.ascontiguousarray(queries[start : start + batch_size], dtype=np.float32)
        found_scores, found_rows = index.search(part, k)
        scores[start : start + len(part)] = found_scores
        rows[start : start + len(part)] = found_rows
    scores[rows < 0] = -np.inf
    return scores, rows


def merge_topk(
    shard_scores: list[np.ndarray], shard_rows: list[np.ndarray], offsets: list[int], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists into a global top-k over global doc indices (shard offset + row).

    Ties are broken by the lower global index, so the result does not depend on how the corpus was sharded.
    Returns (scores [q, k], doc indices [q, k]); missing slots have index -1 and score -inf.
    """
    all_scores = np.concatenate(shard_scores, axis=1)
    all_ids = np.concatenate(
        [np.where(rows >= 0, rows + offset, -1) for rows, offset in zip(shard_rows, offsets, strict=True)], axis=1
    )
    # Missing slots sort last: score -inf, and an id larger than any real one.
    tie_ids = np.where(all_ids >= 0, all_ids, np.iinfo(np.int64).max)
    order = np.lexsort((tie_ids, -all_scores), axis=-1)[:, :k]
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_ids, order, axis=1)
