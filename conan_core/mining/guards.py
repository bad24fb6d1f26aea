"""False-negative guards: what must never become a hard negative of a query.

A candidate is dropped when it is one of the query's positives, equals a positive or the query itself
after normalisation (case, width, whitespace and punctuation differences do not make a new text), or,
with a margin, scores too close to the positive (`score >= positive_score * margin`, the
TopK-PercPos rule of NV-Retriever, arXiv 2407.15831, that the issue asks for with margin 0.95).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

_DROPPED_CATEGORIES = ("P", "Z", "C")  # punctuation, separators (spaces), control/format characters


def normalise_for_match(text: str) -> str:
    """NFKC, case-folded, without whitespace or punctuation: two texts equal here say the same thing."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in folded if unicodedata.category(ch)[0] not in _DROPPED_CATEGORIES)


def excluded_doc_indices(
    texts: Iterable[str], norm_to_docs: dict[str, list[int]]
) -> set[int]:
    """Corpus indices of every document equal (after normalisation) to one of `texts`."""
    excluded: set[int] = set()
    for text in texts:
        excluded.update(norm_to_docs.get(normalise_for_match(text), ()))
    return excluded


def guard_candidates(
    doc_indices: Sequence[int],
    scores: Sequence[float],
    excluded: set[int],
    positive_score: float | None,
    margin: float | None,
    top_k: int,
) -> tuple[list[int], list[float]]:
    """Keep the ranked candidates that pass the guards, best first, at most `top_k`.

    `doc_indices` / `scores` are one query's merged search result (index -1 = empty slot).
    """
    limit = None if margin is None or positive_score is None else positive_score * margin
    kept_docs: list[int] = []
    kept_scores: list[float] = []
    for doc, score in zip(doc_indices, scores, strict=True):
        if doc < 0 or not np.isfinite(score) or doc in excluded:
            continue
        if limit is not None and score >= limit:
            continue
        kept_docs.append(int(doc))
        kept_scores.append(float(score))
        if len(kept_docs) == top_k:
            break
    return kept_docs, kept_scores
