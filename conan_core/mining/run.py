"""Hard-negative mining over the actor pool, and its entry points.

`mine` is the algorithm (guarded, ranked candidate lists; searches deeper when the margin left a list
short); `run_mine` (the `conan mine` stage) and `remine` (between finetuning epochs) open a Ray session
and a `MiningPool` (`conan_core.mining.pool`), mine, and write the candidate lists.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conan_core.errors import ConanError
from conan_core.io.dataset import read_dataset, read_manifest
from conan_core.mining.actor import EmbeddingModel, encoder_factory_for
from conan_core.mining.candidates import CandidateLists, QueryCandidates, write_candidates
from conan_core.mining.config import MiningConfig
from conan_core.mining.corpus import ShardRef, corpus_texts, shard_refs, write_corpus
from conan_core.mining.guards import excluded_doc_indices, guard_candidates, normalise_for_match
from conan_core.mining.pool import MiningPool, pool_size
from conan_core.raysession import ray_session


def _norm_index(texts: Sequence[str]) -> dict[str, list[int]]:
    index: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        index.setdefault(normalise_for_match(text), []).append(i)
    return index


def mine(pool: MiningPool, shards: list[ShardRef], doc_ids: Sequence[str], doc_texts: Sequence[str],
         records: dict[str, QueryCandidates], config: MiningConfig) -> dict[str, QueryCandidates]:
    """Ranked, guarded candidate lists for `records` (query id -> record texts; lists filled in)."""
    order = {qid: i for i, qid in enumerate(records)}
    unique_queries = list(dict.fromkeys(r.query for r in records.values()))
    query_row = {q: i for i, q in enumerate(unique_queries)}
    # Every positive of a query text is a positive of each record with that text (never its negative).
    positives_of: dict[str, set[str]] = {}
    for rec in records.values():
        positives_of.setdefault(rec.query, set()).add(rec.positive)
    norm_to_docs = _norm_index(doc_texts)
    excluded = {q: excluded_doc_indices([q, *positives_of[q]], norm_to_docs) for q in unique_queries}
    k_fetch = config.top_k + max((len(e) for e in excluded.values()), default=0)

    query_vectors = pool.encode(unique_queries)
    records_of: dict[str, list[str]] = {}
    for qid, rec in records.items():
        records_of.setdefault(rec.query, []).append(qid)

    # The margin needs each positive's score. A positive that is a corpus document (the default corpus holds
    # every positive) is scored by the actor holding its shard, from the shard's vectors; only the others are
    # encoded here.
    doc_row = {text: i for i, text in enumerate(doc_texts)} if config.margin else {}
    in_corpus = {qid: doc_row[r.positive] for qid, r in records.items() if r.positive in doc_row}
    pairs = np.array([(query_row[records[qid].query], row) for qid, row in in_corpus.items()],
                     dtype=np.int64).reshape(-1, 2)
    scores, indices, pair_scores = pool.search_scoring(shards, query_vectors, k_fetch, pairs)
    positive_scores: dict[str, float] = {}
    if config.margin:
        elsewhere = {qid: r for qid, r in records.items() if qid not in in_corpus}
        positive_scores = _positive_scores(pool, elsewhere, query_vectors, query_row) if elsewhere else {}
        positive_scores.update({qid: float(s) for qid, s in zip(in_corpus, pair_scores, strict=True)})

    mined: dict[str, QueryCandidates] = {}
    pending = list(range(len(unique_queries)))
    while True:
        short = []
        for row, query_index in enumerate(pending):
            query = unique_queries[query_index]
            for qid in records_of[query]:
                rec = records[qid]
                kept, kept_scores = guard_candidates(indices[row], scores[row], excluded[query],
                                                     positive_scores.get(qid), config.margin, config.top_k)
                mined[qid] = QueryCandidates(query=rec.query, positive=rec.positive, negatives=rec.negatives,
                                             doc_ids=[doc_ids[i] for i in kept], scores=kept_scores,
                                             positive_score=positive_scores.get(qid))
                # The margin dropped so many that the list is short while the corpus has more: fetch deeper.
                if len(kept) < config.top_k and k_fetch < len(doc_ids):
                    short.append(query_index)
        pending = list(dict.fromkeys(short))
        if not pending:
            break
        k_fetch = min(2 * k_fetch, len(doc_ids))
        scores, indices = pool.search(shards, query_vectors[pending], k_fetch)
    return dict(sorted(mined.items(), key=lambda item: order[item[0]]))


def _positive_scores(pool: MiningPool, records: dict[str, QueryCandidates], query_vectors: np.ndarray,
                     query_row: dict[str, int]) -> dict[str, float]:
    """Scores of positives that are not corpus documents: encoded here."""
    positives = list(dict.fromkeys(r.positive for r in records.values()))
    positive_vectors = pool.encode(positives)
    positive_row = {p: i for i, p in enumerate(positives)}
    return {qid: float(query_vectors[query_row[r.query]] @ positive_vectors[positive_row[r.positive]])
            for qid, r in records.items()}


def query_records(records_table: Any, config: MiningConfig) -> dict[str, QueryCandidates]:
    """The dataset's query records (kinds in config.query_kinds, with a positive), lists still empty."""
    out: dict[str, QueryCandidates] = {}
    for row in records_table.select(["id", "kind", "query", "positive", "negatives"]).to_pylist():
        if row["kind"] in config.query_kinds and row["positive"] and row["query"]:
            out[row["id"]] = QueryCandidates(query=row["query"], positive=row["positive"],
                                             negatives=list(row["negatives"] or []), doc_ids=[], scores=[])
    return out


def run_mine(model_path: str | Path, data_dir: str | Path, out_dir: str | Path, config: MiningConfig, *,
             corpus_dir: str | Path | None = None, encoder_factory: Callable[[], EmbeddingModel] | None = None) -> dict:
    """Initial mining: candidate lists for every query record of `data_dir`, written to `out_dir`.

    The corpus (every positive/negative text of `corpus_dir`, default `data_dir`) is written as a sharded
    dataset under `out_dir/corpus`. Returns the candidates manifest (its config records mined_by).
    """
    started = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    factory = encoder_factory_for(model_path, encoder_factory)
    records = query_records(read_dataset(data_dir), config)
    if not records:
        raise ConanError(f"{data_dir}: no query records (kinds {config.query_kinds} with a positive) to mine for")
    source_dir = Path(corpus_dir) if corpus_dir else data_dir
    texts = corpus_texts(read_dataset(source_dir))
    corpus_out = out_dir / "corpus"
    write_corpus(corpus_out, texts, shard_rows=config.shard_rows, inputs=[source_dir / "manifest.json"])
    shards = shard_refs(corpus_out)
    doc_ids = read_dataset(corpus_out).column("doc_id").to_pylist()
    with ray_session(), MiningPool(factory, config, pool_size(config, len(shards))) as pool:
        mined = mine(pool, shards, doc_ids, texts, records, config)
        stats = {"actors": pool.size, "actor_restarts": pool.restarts, "shards_encoded": pool.encoded_shards}
        fingerprint = pool.fingerprint
    counts = _counts(mined, len(texts), len(shards), stats, time.perf_counter() - started)
    lists = write_candidates(out_dir, mined, corpus_dir=corpus_out,
                             mined_by={"fingerprint": fingerprint, "model_path": str(Path(model_path).resolve())},
                             mining_config=config.model_dump(mode="json"),
                             inputs=[data_dir / "manifest.json"], counts=counts)
    return _manifest(lists)


def remine(model_path: str | Path, candidates: str | Path | CandidateLists, query_ids: Sequence[str] | None = None,
           *, config: MiningConfig | None = None, out_dir: str | Path | None = None,
           encoder_factory: Callable[[], EmbeddingModel] | None = None) -> CandidateLists:
    """Re-mine the candidate lists of `query_ids` (None: all) with the checkpoint at `model_path`.

    The corpus is re-encoded with that checkpoint unless its embeddings are cached for
    (shard, fingerprint); the other queries keep their lists. The result is written to `out_dir`
    (default: `<candidates dir>-remined-<fingerprint>`) and returned loaded.
    """
    started = time.perf_counter()
    old = candidates if isinstance(candidates, CandidateLists) else CandidateLists.load(Path(candidates))
    if old.path is None or old.corpus_dir is None:
        raise ConanError("remine needs candidate lists loaded from a candidates dir")
    config = config or MiningConfig.model_validate(old.mining_config)
    wanted = list(old.queries) if query_ids is None else [q for q in query_ids if q in old.queries]
    shards = shard_refs(Path(old.corpus_dir))
    corpus = read_dataset(Path(old.corpus_dir))
    doc_ids, texts = corpus.column("doc_id").to_pylist(), corpus.column("text").to_pylist()
    factory = encoder_factory_for(model_path, encoder_factory)
    with ray_session(), MiningPool(factory, config, pool_size(config, len(shards))) as pool:
        mined = mine(pool, shards, doc_ids, texts, {q: old.queries[q] for q in wanted}, config) if wanted else {}
        stats = {"actors": pool.size, "actor_restarts": pool.restarts, "shards_encoded": pool.encoded_shards,
                 "remined_queries": len(wanted)}
        fingerprint = pool.fingerprint
    merged = {qid: mined.get(qid, old_list) for qid, old_list in old.queries.items()}
    target = Path(out_dir) if out_dir else old.path.with_name(f"{old.path.name}-remined-{fingerprint}")
    counts = _counts(merged, len(texts), len(shards), stats, time.perf_counter() - started)
    return write_candidates(target, merged, corpus_dir=Path(old.corpus_dir),
                            mined_by={"fingerprint": fingerprint, "model_path": str(Path(model_path).resolve()),
                                      "previous": old.fingerprint},
                            mining_config=config.model_dump(mode="json"), inputs=[old.path / "manifest.json"],
                            counts=counts)


def _counts(mined: dict[str, QueryCandidates], documents: int, shards: int, stats: dict[str, Any],
            seconds: float) -> dict[str, Any]:
    lengths = [len(q.doc_ids) for q in mined.values()]
    return {"queries": len(mined), "documents": documents, "shards": shards,
            "mean_candidates": float(np.mean(lengths)) if lengths else 0.0,
            "empty_lists": sum(1 for n in lengths if n == 0), "seconds": round(seconds, 3), **stats}


def _manifest(lists: CandidateLists) -> dict:
    if lists.path is None:
        raise ConanError("candidate lists were not written to a dir")
    return read_manifest(lists.path)
