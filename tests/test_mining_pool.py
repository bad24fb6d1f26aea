"""The Ray mining pool end to end: conan mine's library call, re-mine with the cache, and a killed actor.

One Ray session for the module (starting Ray costs ~6 s). Two encoders: the tiny random BERT (the real
model code path) and a character-trigram hashing encoder, which is exact and fast, for the kill test.
"""

from __future__ import annotations

import os
import random
import sys
import zlib
from pathlib import Path

import faiss
import numpy as np
import pytest
import ray

from conan_core.io.dataset import read_dataset, write_dataset
from conan_core.mining.candidates import CandidateLists
from conan_core.mining.config import DHNMConfig, MiningConfig
from conan_core.mining.corpus import shard_refs
from conan_core.mining.dhnm import DynamicNegatives
from conan_core.mining.guards import normalise_for_match
from conan_core.mining.pool import MiningPool
from conan_core.mining.run import remine, run_mine
from conan_core.raysession import ray_session
from conan_core.schema import make_record, records_table
from conan_core.testing import tiny_model

WORDS = ("cat dog car house tree water food music book city good bad new old big small the a of and to in on "
         "for with what how why who").split()


class HashEncoder:
    """Character-trigram hashing into 32 dims, L2-normalised: deterministic, no model, fast."""

    dim = 32

    def encode(self, texts, batch_size: int = 64, normalize: bool = True) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            padded = f"  {text.lower()} "
            for i in range(len(padded) - 2):
                h = zlib.crc32(padded[i:i + 3].encode())
                out[row, h % self.dim] += 1.0 if (h >> 16) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def fingerprint(self) -> str:
        return "hash-trigram-32"


class CrashingHashEncoder(HashEncoder):
    """Kills its own process (os._exit) the first time it is asked to encode `trigger`: a dying actor."""

    def __init__(self, trigger: str, marker: str) -> None:
        self.trigger, self.marker = trigger, marker

    def encode(self, texts, batch_size: int = 64, normalize: bool = True) -> np.ndarray:
        if self.trigger in texts and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return super().encode(texts, batch_size, normalize)


class Factory:
    def __init__(self, encoder) -> None:
        self.encoder = encoder

    def __call__(self):
        return self.encoder


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_records(path: Path, records: list[dict]) -> Path:
    write_dataset(path, records_table(records), None, config={}, inputs=[], counts={})
    return path


@pytest.fixture(scope="module")
def ray_running():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test classes travel to the actors
    with ray_session():
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    rng = random.Random(0)
    records = []
    for i in range(40):
        positive = f"{sentence(rng, 6)} answer {i}"
        negatives = [f"{sentence(rng, 7)} wrong {i}"] if i % 4 == 0 else []
        records.append(make_record(kind="retrieval", query=f"{sentence(rng, 5)} query {i}", positive=positive,
                                   negatives=negatives, source="test", lang="en"))
    # Near-duplicates of positives (differ in case/punctuation only) must never become negatives.
    for rec in records[:5]:
        records.append(make_record(kind="sts", query=sentence(rng, 4), positive=rec["positive"].upper() + "!",
                                   score=1.0, source="test", lang="en"))
    for _ in range(150):
        records.append(make_record(kind="sts", query=sentence(rng, 4), positive=sentence(rng, 8), score=0.5,
                                   source="test", lang="en"))
    return write_records(tmp_path_factory.mktemp("data") / "ds", records)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data_dir: Path) -> Path:
    table = read_dataset(data_dir)
    texts = table.column("query").to_pylist() + table.column("positive").to_pylist()
    return tiny_model(texts).save(tmp_path_factory.mktemp("model") / "tiny")


def global_top(corpus_vectors: np.ndarray, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(corpus_vectors.shape[1])
    index.add(corpus_vectors)
    return index.search(query_vectors, k)


@pytest.mark.slow
def test_run_mine_then_remine_with_cache(ray_running, data_dir: Path, model_dir: Path, tmp_path: Path) -> None:
    from conan_core.model import ConanEmbedder

    # margin=None: compared below with a global index under the text guards only (the margin has its own test);
    # bf16=False: compared with fp32 encodes to 1e-5 (bf16 has its own test)
    config = MiningConfig(top_k=30, shard_rows=60, margin=None, workers=2, bf16=False,
                          cache_dir=str(tmp_path / "cache"))
    manifest = run_mine(model_dir, data_dir, tmp_path / "cands", config)
    model = ConanEmbedder.load(model_dir)
    assert manifest["config"]["mined_by"]["fingerprint"] == model.fingerprint()
    counts = manifest["counts"]
    assert counts["queries"] == 40 and counts["shards"] == 4 and counts["actors"] == 2
    assert counts["shards_encoded"] == 4

    lists = CandidateLists.load(tmp_path / "cands")
    corpus = read_dataset(tmp_path / "cands" / "corpus")
    doc_ids, texts = corpus.column("doc_id").to_pylist(), corpus.column("text").to_pylist()
    position = {d: i for i, d in enumerate(doc_ids)}
    queries = list(lists.queries.values())
    expected_scores, expected_rows = global_top(model.encode(texts), model.encode([q.query for q in queries]),
                                                len(texts))
    for row, entry in enumerate(queries):
        norm_positive = normalise_for_match(entry.positive)
        assert all(normalise_for_match(lists.doc_texts[d]) != norm_positive for d in entry.doc_ids)
        assert entry.scores == sorted(entry.scores, reverse=True)
        # Same as one global flat index with the same guards applied.
        allowed = [(s, r) for s, r in zip(expected_scores[row], expected_rows[row], strict=True)
                   if normalise_for_match(texts[r]) not in (norm_positive, normalise_for_match(entry.query))
                   ][:30]
        assert len(entry.doc_ids) == len(allowed) == 30
        np.testing.assert_allclose(entry.scores, [s for s, _ in allowed], atol=1e-5)
        for got, (score, want) in zip([position[d] for d in entry.doc_ids], allowed, strict=True):
            # Encoding on 1 vs 2 threads may reorder exact ties, nothing else.
            assert got == want or abs(score - expected_scores[row][list(expected_rows[row]).index(got)]) < 1e-5

    dyn = DynamicNegatives(lists, 3, DHNMConfig())
    first = next(iter(lists.queries))
    assert len(dyn.negatives(first)) == 3

    some = list(lists.queries)[:7]
    # 2 actors again: the pool size comes from the recorded mining config
    again = remine(model_dir, tmp_path / "cands", some, out_dir=tmp_path / "cands-2")
    assert again.mined_by["previous"] == lists.fingerprint
    assert read_manifest_counts(tmp_path / "cands-2") == {"shards_encoded": 0, "remined_queries": 7}
    for qid in lists.queries:
        new, old = again.queries[qid], lists.queries[qid]
        np.testing.assert_allclose(new.scores, old.scores, atol=1e-5)
        # Batches of other sizes change the query vectors in the last float bits: exact ties may swap.
        assert all(a == b or abs(sa - sb) < 1e-5 for a, b, sa, sb in zip(new.doc_ids, old.doc_ids, new.scores,
                                                                          old.scores, strict=True))
    assert all(again.queries[q] is not lists.queries[q] for q in some)


@pytest.mark.slow
def test_bf16_encoding_is_its_own_cache_and_close_to_fp32(ray_running, data_dir: Path, model_dir: Path,
                                                           tmp_path: Path) -> None:
    from conan_core.model import ConanEmbedder

    base = MiningConfig(top_k=10, shard_rows=60, margin=None, workers=2, cache_dir=str(tmp_path / "cache"))
    fp32 = run_mine(model_dir, data_dir, tmp_path / "fp32", base.model_copy(update={"bf16": False}))
    bf16 = run_mine(model_dir, data_dir, tmp_path / "bf16", base.model_copy(update={"bf16": True}))
    fingerprint = ConanEmbedder.load(model_dir).fingerprint()
    assert fp32["config"]["mined_by"]["fingerprint"] == fingerprint
    assert bf16["config"]["mined_by"]["fingerprint"] == fingerprint + "-bf16"
    # Same shard cache dir, different entries: neither precision reads the other's vectors.
    assert bf16["counts"]["shards_encoded"] == fp32["counts"]["shards_encoded"] == 4
    assert len(list((tmp_path / "cache").glob("*-bf16.npy"))) == 4
    a = CandidateLists.load(tmp_path / "fp32").queries
    b = CandidateLists.load(tmp_path / "bf16").queries
    assert a.keys() == b.keys()
    # bf16 rounds each matmul's inputs to 8 bits of mantissa: scores move in the 2nd-3rd decimal, not more.
    diffs = [abs(a[q].scores[0] - b[q].scores[0]) for q in a]
    assert max(diffs) < 0.03 and any(d > 0 for d in diffs)


def read_manifest_counts(path: Path) -> dict:
    from conan_core.io.dataset import read_manifest

    counts = read_manifest(path)["counts"]
    return {"shards_encoded": counts["shards_encoded"], "remined_queries": counts["remined_queries"]}


@pytest.mark.slow
def test_killed_actor_is_restarted_and_no_query_is_lost(ray_running, data_dir: Path, tmp_path: Path) -> None:
    config = MiningConfig(top_k=20, shard_rows=50, skip_ranks=0, margin=0.95, workers=2)
    undisturbed = run_mine("unused", data_dir, tmp_path / "a", config.model_copy(update={
        "cache_dir": str(tmp_path / "cache-a")}), encoder_factory=Factory(HashEncoder()))
    corpus = read_dataset(tmp_path / "a" / "corpus").column("text").to_pylist()
    trigger = corpus[120]  # a document of shard 2 (served by actor 0, which also holds shard 0)
    marker = tmp_path / "crashed"
    disturbed = run_mine("unused", data_dir, tmp_path / "b", config.model_copy(update={
        "cache_dir": str(tmp_path / "cache-b")}),
        encoder_factory=Factory(CrashingHashEncoder(trigger, str(marker))))
    assert marker.exists()
    assert disturbed["counts"]["actor_restarts"] >= 1 and undisturbed["counts"]["actor_restarts"] == 0
    a = read_dataset(tmp_path / "a").select(["query_id", "doc_ids", "scores"]).to_pylist()
    b = read_dataset(tmp_path / "b").select(["query_id", "doc_ids", "scores"]).to_pylist()
    assert len(b) == 40 and a == b
    # Margin: every kept score is below 0.95 * positive, and lists are as long as the corpus allows
    # (the pool fetches deeper when the margin emptied the first top-k).
    corpus_vectors = HashEncoder().encode(corpus)
    norm_corpus = [normalise_for_match(t) for t in corpus]
    for row in read_dataset(tmp_path / "a").select(["query", "positive", "scores", "positive_score"]).to_pylist():
        limit = row["positive_score"] * 0.95
        assert all(s < limit for s in row["scores"])
        query_vector = HashEncoder().encode([row["query"]])[0]
        # The positive's score comes from its corpus vector (scored by the actor holding its shard).
        assert row["positive_score"] == pytest.approx(float(HashEncoder().encode([row["positive"]])[0] @ query_vector),
                                                      abs=1e-5)
        banned = {normalise_for_match(row["query"]), normalise_for_match(row["positive"])}
        eligible = sum(1 for score, norm in zip(corpus_vectors @ query_vector, norm_corpus, strict=True)
                       if score < limit and norm not in banned)
        assert len(row["scores"]) == min(20, eligible)

    # ray.kill between two searches: the restarted actor reloads its shard (from the cache) and answers.
    shards = shard_refs(tmp_path / "a" / "corpus")
    queries = HashEncoder().encode(corpus[:30])
    with MiningPool(Factory(HashEncoder()), config.model_copy(update={"cache_dir": str(tmp_path / "cache-a")}),
                    size=2) as pool:
        before = pool.search(shards, queries, 10)
        ray.kill(pool.actor(0), no_restart=False)
        after = pool.search(shards, queries, 10)
        assert pool.encoded_shards == 0
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])


@pytest.mark.slow
def test_positives_outside_the_corpus_are_encoded_for_the_margin(ray_running, data_dir: Path, tmp_path: Path
                                                                 ) -> None:
    """With a separate --corpus (no positive in it), every positive score is still its cosine with the query."""
    rng = random.Random(1)
    other = write_records(tmp_path / "corpus", [
        make_record(kind="sts", query=sentence(rng, 4), positive=sentence(rng, 8), score=0.5, source="t", lang="en")
        for _ in range(80)])
    config = MiningConfig(top_k=10, shard_rows=50, margin=0.95, workers=2, cache_dir=str(tmp_path / "cache"))
    run_mine("unused", data_dir, tmp_path / "out", config, corpus_dir=other, encoder_factory=Factory(HashEncoder()))
    rows = read_dataset(tmp_path / "out").select(["query", "positive", "scores", "positive_score"]).to_pylist()
    assert len(rows) == 40
    for row in rows:
        query, positive = HashEncoder().encode([row["query"], row["positive"]])
        assert row["positive_score"] == pytest.approx(float(query @ positive), abs=1e-5)
        assert all(score < row["positive_score"] * 0.95 for score in row["scores"])


def test_empty_query_set_is_a_clear_error(tmp_path: Path) -> None:
    from conan_core.errors import ConanError

    records = [make_record(kind="sts", query="a b", positive="c d", score=1.0, source="t", lang="en")]
    path = write_records(tmp_path / "ds", records)
    with pytest.raises(ConanError, match="no query records"):
        run_mine("unused", path, tmp_path / "out", MiningConfig(), encoder_factory=Factory(HashEncoder()))


@pytest.mark.slow
def test_cli_mine_writes_candidates(ray_running, data_dir: Path, model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from conan_cli.main import app

    def mine(out: Path, *extra: str) -> CandidateLists:
        result = CliRunner().invoke(app, ["mine", "--model", str(model_dir), "--data", str(data_dir),
                                          "--out", str(out), "--top-k", "12", "--workers", "1", "--index", "ivf",
                                          *extra])
        assert result.exit_code == 0, result.output
        assert "mined by" in result.output
        return CandidateLists.load(out)

    # Default: the positive-aware guard (margin 0.95) is on; the tiny random model scores everything close to
    # the positive, and IVF only probes some lists, so a list can hold fewer than 12 (even none).
    guarded = mine(tmp_path / "c")
    assert guarded.mining_config["margin"] == 0.95
    assert len(guarded.queries) == 40 and any(q.doc_ids for q in guarded.queries.values())
    for entry in guarded.queries.values():
        assert len(entry.doc_ids) <= 12 and all(s < 0.95 * entry.positive_score for s in entry.scores)
    unguarded = mine(tmp_path / "c-no-margin", "--no-margin")
    assert unguarded.mining_config["margin"] is None
    assert len(unguarded.queries) == 40 and all(len(q.doc_ids) == 12 for q in unguarded.queries.values())


def test_cli_mine_bad_model_is_one_line(data_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from conan_cli.main import app

    result = CliRunner().invoke(app, ["mine", "--model", str(tmp_path / "nope"), "--data", str(data_dir),
                                      "--out", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {tmp_path / 'nope'}: not a model dir (no config.json)"]
