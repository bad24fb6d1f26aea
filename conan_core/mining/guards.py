"""False-negative guards: what must never become a hard negative of a query.

A candidate is dropped when it is one of the query's positives, equals a positive or the query itself
after normalisation (case, width, whitespace and punctuation differences do not make a new text), or,
with a margin, scores too close to the positive (`relative_margin_mask`: `score >= positive_score * margin`,
the TopK-PercPos rule of NV-Retriever, arXiv 2407.15831, that the issue asks for with margin 0.95).
The training loss's guard is a different rule on purpose (an additive margin on cosines, see
`conan_core.losses.guards`).
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


def relative_margin_mask(scores: Sequence[float] | np.ndarray, positive_score: float | None,
                         margin: float | None) -> np.ndarray:
    """The mining margin rule, relative to the positive: True (drop) where `score >= positive_score * margin`.

    This is NV-Retriever's TopK-PercPos (arXiv 2407.15831): a candidate is kept only if it scores below
    `margin` times the query's positive score (margin 0.95 keeps candidates under 95% of it). It scales
    with the positive, unlike the training loss's rule (`conan_core.losses.guards.additive_margin_mask`,
    `s(q, n) > s(q, p) - margin`). `margin` or `positive_score` None: nothing is dropped.
    """
    scores = np.asarray(scores)
    if margin is None or positive_score is None:
        return np.zeros(scores.shape, dtype=bool)
    return scores >= positive_score * margin


def guard_candidates(
    doc_indices: Sequence[int],
    scores: Sequence[float],
    excluded: set[int],
    positive_score: float | None,
    margin: float | None,
    top_k: int,
) -> tuple[list[int], list[float]]:
    """Keep the ranked candidates that pass the guards, best first, at most `top_k`.

    `doc_indices` / `scores` are one query's merged search result (index -1 = empty slot); the margin
    rule is `relative_margin_mask`.
    """
    too_close = relative_margin_mask(scores, positive_score, margin)
    kept_docs: list[int] = []
    kept_scores: list[float] = []
    for doc, score, drop in zip(doc_indices, scores, too_close, strict=True):
        if doc < 0 or not np.isfinite(score) or doc in excluded or drop:
            continue
        kept_docs.append(int(doc))
        kept_scores.append(float(score))
        if len(kept_docs) == top_k:
            break
    return kept_docs, kept_scores
