"""Corpus shards, the embedding cache and the candidates dir (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from conan_core.errors import ConanError, DatasetIntegrityError
from conan_core.io.dataset import read_dataset, write_dataset
from conan_core.mining.candidates import CandidateLists, CandidatesError, QueryCandidates, write_candidates
from conan_core.mining.corpus import (
    cache_path,
    corpus_texts,
    load_cached,
    read_shard_texts,
    save_cached,
    shard_refs,
    write_corpus,
)
from conan_core.schema import make_record, records_table


def test_corpus_texts_takes_positives_and_negatives_once_and_lone_texts() -> None:
    table = records_table([
        make_record(kind="retrieval", query="q1", positive="p1", negatives=["n1", "p1"], source="s", lang="en"),
        make_record(kind="pair", query="q2", positive="p2", source="s", lang="en"),
        make_record(kind="classification", query="lonely text", label="x", source="s", lang="en"),
    ])
    assert corpus_texts(table) == ["p1", "n1", "p2", "lonely text"]


def test_corpus_shards_offsets_and_integrity(tmp_path) -> None:
    texts = [f"text {i}" for i in range(25)]
    write_corpus(tmp_path / "c", texts, shard_rows=10, inputs=[])
    refs = shard_refs(tmp_path / "c")
    assert [(r.rows, r.offset) for r in refs] == [(10, 0), (10, 10), (5, 20)]
    assert read_shard_texts(refs[1]) == texts[10:20]
    with open(refs[2].path, "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(DatasetIntegrityError, match="sha256"):
        read_shard_texts(refs[2])
    with pytest.raises(ConanError, match="empty"):
        write_corpus(tmp_path / "e", [], shard_rows=10, inputs=[])


def test_embedding_cache_round_trip_and_rejects_mismatches(tmp_path) -> None:
    path = cache_path(tmp_path, "ab" * 32, "fp1")
    assert load_cached(path, rows=3) is None
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_cached(path, vectors)
    np.testing.assert_array_equal(load_cached(path, rows=3), vectors)
    assert load_cached(path, rows=4) is None           # another shard size: re-encode
    path.write_bytes(b"not a numpy file")
    assert load_cached(path, rows=3) is None
    assert cache_path(tmp_path, "ab" * 32, "fp2") != cache_path(tmp_path, "ab" * 32, "fp1")


def test_candidates_dir_round_trip(tmp_path) -> None:
    write_corpus(tmp_path / "corpus", ["d zero", "d one"], shard_rows=10, inputs=[])
    ids = read_dataset(tmp_path / "corpus").column("doc_id").to_pylist()
    queries = {"r1": QueryCandidates(query="q", positive="p", negatives=["n"], doc_ids=ids[::-1], scores=[0.9, 0.5])}
    lists = write_candidates(tmp_path / "cands", queries, corpus_dir=tmp_path / "corpus",
                             mined_by={"fingerprint": "abc"}, mining_config={"skip_ranks": 10}, inputs=[],
                             counts={"queries": 1})
    again = CandidateLists.load(tmp_path / "cands")
    assert again.mined_by == {"fingerprint": "abc"} and again.skip_ranks == 10
    assert again.texts(again.get("r1").doc_ids) == ["d one", "d zero"]
    assert again.get("r1").scores == pytest.approx([0.9, 0.5])
    assert again.fingerprint == lists.fingerprint != ""
    with pytest.raises(CandidatesError, match="not a candidates dir"):
        CandidateLists.load(tmp_path / "corpus")
    write_dataset(tmp_path / "other", records_table([]), None, config={}, inputs=[], counts={})
    with pytest.raises(CandidatesError):
        CandidateLists.load(tmp_path / "other")
