"""Teacher-score filter: cosine of a pair's two sides under a teacher embedder.

Conan-embedding §3.1: pretraining pairs whose teacher cosine is below 0.4 are dropped; the score is
kept as the `teacher_score` column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Embedder(Protocol):
    def encode(self, texts: list[str], batch_size: int = 64, normalize: bool = True) -> np.ndarray: ...


def load_teacher(teacher: str | Path | Embedder) -> Embedder:
    """An embedder object as is; a model dir or the shipped model's name via ConanEmbedder.load."""
    if hasattr(teacher, "encode"):
        return teacher  # type: ignore[return-value]
    from conan_core.model import ConanEmbedder

    return ConanEmbedder.load(Path(str(teacher)) if Path(str(teacher)).exists() else str(teacher))


def teacher_scores(teacher: Embedder, queries: list[str], positives: list[str], *,
                   batch_size: int = 64) -> np.ndarray:
    """Cosine similarity of each (query, positive) pair, float64 [N]."""
    if not queries:
        return np.zeros(0, dtype=np.float64)
    q = np.asarray(teacher.encode(queries, batch_size=batch_size, normalize=True), dtype=np.float64)
    p = np.asarray(teacher.encode(positives, batch_size=batch_size, normalize=True), dtype=np.float64)
    # normalise again: a teacher that ignores normalize=True must not change the cut-off's meaning
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    return np.einsum("ij,ij->i", q, p)


def score_records(records: list[dict[str, Any]], teacher: Embedder, kinds: list[str], *,
                  batch_size: int = 64) -> list[float | None]:
    """The teacher score of each record of a scored kind (None for the others)."""
    index = [i for i, record in enumerate(records) if record["kind"] in kinds]
    scores = teacher_scores(teacher, [records[i]["query"] for i in index],
                            [records[i]["positive"] for i in index], batch_size=batch_size)
    out: list[float | None] = [None] * len(records)
    for i, score in zip(index, scores, strict=True):
        out[i] = float(score)
    return out
