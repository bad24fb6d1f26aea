"""False-negative guards, FAISS shard index, and the shard merge vs one global flat index (no Ray)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from conan_core.errors import ConanError
from conan_core.mining.guards import excluded_doc_indices, guard_candidates, normalise_for_match
from conan_core.mining.index import build_index, configure_faiss, merge_topk, search


def unit_rows(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_normalise_for_match_ignores_case_width_space_and_punctuation() -> None:
    assert normalise_for_match("Hello,  World!") == normalise_for_match("hello world")
    assert normalise_for_match("ＡＢＣ１２３") == "abc123"  # full-width forms (NFKC)
    assert normalise_for_match("今天天气怎么样？") == normalise_for_match("今天 天气怎么样")
    assert normalise_for_match("cat") != normalise_for_match("cats")


def test_guards_drop_positives_equal_texts_and_margin_violators() -> None:
    docs = ["The answer.", "the answer", "another text", "close call", "far away"]
    norm_to_docs: dict[str, list[int]] = {}
    for i, text in enumerate(docs):
        norm_to_docs.setdefault(normalise_for_match(text), []).append(i)
    excluded = excluded_doc_indices(["The answer."], norm_to_docs)
    assert excluded == {0, 1}
    ranked = [0, 3, 1, 2, -1, 4]
    scores = [0.9, 0.86, 0.8, 0.5, -np.inf, 0.1]
    kept, kept_scores = guard_candidates(ranked, scores, excluded, positive_score=None, margin=None, top_k=10)
    assert kept == [3, 2, 4] and kept_scores == pytest.approx([0.86, 0.5, 0.1])
    # margin 0.95 with positive score 0.9: a negative must score below 0.855
    kept, _ = guard_candidates(ranked, scores, excluded, positive_score=0.9, margin=0.95, top_k=10)
    assert kept == [2, 4]
    kept, _ = guard_candidates(ranked, scores, excluded, positive_score=None, margin=None, top_k=2)
    assert kept == [3, 2]


def test_positive_aware_margin_is_on_by_default() -> None:
    from conan_core.mining.config import MiningConfig

    assert MiningConfig().margin == 0.95  # NV-Retriever TopK-PercPos
    assert MiningConfig(margin=None).margin is None  # still possible to turn off


def test_sharded_search_merged_equals_one_global_flat_index() -> None:
    configure_faiss(1)
    corpus, queries = unit_rows(1000, 24, seed=0), unit_rows(50, 24, seed=1)
    k = 20
    global_index = faiss.IndexFlatIP(24)
    global_index.add(corpus)
    expected_scores, expected_ids = global_index.search(queries, k)
    bounds = [0, 333, 700, 1000]  # unequal shards
    shard_scores, shard_rows = [], []
    for start, stop in zip(bounds, bounds[1:], strict=False):
        scores, rows = search(build_index(corpus[start:stop]), queries, k, batch_size=16)
        shard_scores.append(scores)
        shard_rows.append(rows)
    merged_scores, merged_ids = merge_topk(shard_scores, shard_rows, bounds[:-1], k)
    np.testing.assert_array_equal(merged_ids, expected_ids)
    np.testing.assert_allclose(merged_scores, expected_scores, atol=1e-5)


def test_small_shard_pads_with_missing_slots_and_merge_skips_them() -> None:
    corpus, queries = unit_rows(5, 8, seed=2), unit_rows(3, 8, seed=3)
    scores, rows = search(build_index(corpus[:2]), queries, k=4)
    assert (rows[:, 2:] == -1).all() and np.isneginf(scores[:, 2:]).all()
    other_scores, other_rows = search(build_index(corpus[2:]), queries, k=4)
    merged_scores, merged_ids = merge_topk([scores, other_scores], [rows, other_rows], [0, 2], k=6)
    assert sorted(merged_ids[0][:5].tolist()) == [0, 1, 2, 3, 4] and merged_ids[0][5] == -1


def test_ivf_index_finds_the_exact_neighbour_of_an_indexed_vector() -> None:
    corpus = unit_rows(2000, 16, seed=4)
    index = build_index(corpus, "ivf", nlist=32, nprobe=32)  # probing every list: exact
    _, rows = search(index, corpus[:10], k=1)
    assert rows[:, 0].tolist() == list(range(10))


def test_bad_index_input_is_a_clear_error() -> None:
    with pytest.raises(ConanError, match="float32"):
        build_index(np.zeros((3, 4), dtype=np.float64))
    with pytest.raises(ConanError, match="unknown index type"):
        build_index(np.zeros((3, 4), dtype=np.float32), "hnsw")
