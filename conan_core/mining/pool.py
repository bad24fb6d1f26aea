"""The mining actor pool: one Ray actor per corpus shard (or several shards in turn), fan-out + merge.

Every actor loads the model once, and for a search: loads one shard's embeddings (from the cache keyed by
(shard sha256, model fingerprint), or by encoding the shard), builds its FAISS index, drops the previous
shard's vectors first, and returns that shard's top-k for all queries. The driver sends the queries to
every shard (each actor directly: ActorPool balances load, it does not broadcast) and merges the lists.
No process ever holds more than one shard's vectors. An actor that dies is restarted by Ray
(`max_restarts`) and the shard calls it lost are sent again, so no query is lost.

Entry points: `run_mine` (the `conan mine` stage) and `remine` (between finetuning epochs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from conan_core.errors import ConanError, ModelLoadError
from conan_core.io.dataset import read_dataset, read_manifest
from conan_core.mining.candidates import CandidateLists, QueryCandidates, write_candidates
from conan_core.mining.config import MiningConfig
from conan_core.mining.corpus import (
    ShardRef,
    cache_path,
    corpus_texts,
    default_cache_dir,
    load_cached,
    read_shard_texts,
    save_cached,
    shard_refs,
    write_corpus,
)
from conan_core.mining.guards import excluded_doc_indices, guard_candidates, normalise_for_match
from conan_core.mining.index import build_index, configure_faiss, merge_topk, search
from conan_core.raysession import ray_session

RESTART_WAIT_S = 120.0  # how long a restarting actor may take (model load) before it is replaced


class MiningActorError(ConanError):
    """A mining actor kept dying: its shard could not be searched."""


class Encoder(Protocol):
    def encode(self, texts: Sequence[str], batch_size: int = 64, normalize: bool = True) -> np.ndarray: ...

    def fingerprint(self) -> str: ...


class ModelEncoderFactory:
    """Picklable recipe sent to each actor: load the ConanEmbedder saved at `model_path`."""

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = str(model_path)

    def __call__(self) -> Encoder:
        from conan_core.model import ConanEmbedder

        return ConanEmbedder.load(self.model_path)


def _encoder_factory(model_path: str | Path, given: Callable[[], Encoder] | None) -> Callable[[], Encoder]:
    """The given factory, or the model dir's after a cheap check here (an actor's failure is less clear)."""
    if given is not None:
        return given
    if not (Path(model_path) / "config.json").is_file():
        raise ModelLoadError(f"{model_path}: not a model dir (no config.json)")
    return ModelEncoderFactory(model_path)


# ---- Ray session ------------------------------------------------------------------------------------

# ---- the actor ------------------------------------------------------------------------------------

class ShardWorker:
    """Body of one mining actor: the encoder, and at most one shard's vectors + index at a time."""

    def __init__(self, encoder_factory: Callable[[], Encoder], config: MiningConfig, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        configure_faiss(threads)
        self._config = config
        self._cache_dir = default_cache_dir(config.cache_dir)
        self._encoder = encoder_factory()
        self._fingerprint = self._encoder.fingerprint()
        self._shard_sha: str | None = None
        self._index: Any = None

    def fingerprint(self) -> str:
        return self._fingerprint

    def pid(self) -> int:
        return os.getpid()

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._encoder.encode(texts, batch_size=self._config.encode_batch_size, normalize=True)

    def search(self, shard: ShardRef, queries: np.ndarray, k: int) -> dict[str, Any]:
        """This shard's top-k for every query: {"scores", "rows", "encoded", "seconds"}."""
        started = time.perf_counter()
        encoded = self._load(shard)
        scores, rows = search(self._index, queries, min(k, shard.rows), self._config.query_batch_size)
        return {"scores": scores, "rows": rows, "encoded": encoded, "seconds": time.perf_counter() - started}

    def _load(self, shard: ShardRef) -> bool:
        """Make `shard` the one held; True when it had to be encoded (not cached)."""
        if self._shard_sha == shard.sha256:
            return False
        # Drop the previous shard before touching the next: one shard's vectors per process.
        self._index, self._shard_sha = None, None
        path = cache_path(self._cache_dir, shard.sha256, self._fingerprint)
        vectors = load_cached(path, shard.rows)
        encoded = vectors is None
        if vectors is None:
            vectors = self.encode(read_shard_texts(shard))
            save_cached(path, vectors)
        self._index = build_index(vectors, self._config.index, self._config.ivf_nlist, self._config.ivf_nprobe)
        self._shard_sha = shard.sha256
        return encoded


ShardActor = ray.remote(ShardWorker)


# ---- the pool -----------------------------------------------------------------------------------

class MiningPool:
    """`size` mining actors; encode() splits texts over them, search() fans queries out to every shard."""

    def __init__(self, encoder_factory: Callable[[], Encoder], config: MiningConfig, size: int) -> None:
        self._factory = encoder_factory
        self._config = config
        self.size = max(1, size)
        self.restarts = 0
        self.encoded_shards = 0
        self._threads = max(1, (os.cpu_count() or 1) // self.size)
        available = ray.available_resources().get("CPU", 0.0)
        # Fractional CPUs so the pool also fits beside a running trainer (0 = schedule anyway).
        self._num_cpus = min(1.0, available / self.size) if available >= 0.01 * self.size else 0.0
        self._actors = [self._new_actor() for _ in range(self.size)]
        try:
            fingerprints = set(self._run([(slot, lambda a: a.fingerprint.remote()) for slot in range(self.size)]))
            if len(fingerprints) != 1:
                raise ConanError(f"mining actors loaded different models: {sorted(fingerprints)}")
        except BaseException:
            self.close()  # no __exit__ for a pool that never finished starting
            raise
        self.fingerprint = fingerprints.pop()

    def _new_actor(self) -> Any:
        return ShardActor.options(num_cpus=self._num_cpus, max_restarts=self._config.max_actor_retries,
                                  max_task_retries=0).remote(self._factory, self._config, self._threads)

    def actor(self, slot: int) -> Any:
        return self._actors[slot]

    def close(self) -> None:
        for handle in self._actors:
            ray.kill(handle, no_restart=True)
        self._actors = []

    def __enter__(self) -> MiningPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised embeddings of `texts`, encoded in `size` parts in parallel (input order kept)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        # Strided parts (every size-th text) give each actor a similar mix of lengths.
        slots = [slot for slot in range(self.size) if texts[slot::self.size]]
        encoded = self._run([(slot, lambda a, slot=slot: a.encode.remote(texts[slot::self.size])) for slot in slots])
        out = np.zeros((len(texts), encoded[0].shape[1]), dtype=np.float32)
        for slot, vectors in zip(slots, encoded, strict=True):
            out[slot::self.size] = vectors
        return out

    def search(self, shards: list[ShardRef], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Global top-k (scores, corpus indices) of every query over all shards."""
        queries_ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        calls = [(shard.index % self.size, lambda a, shard=shard: a.search.remote(shard, queries_ref, k))
                 for shard in shards]
        results = self._run(calls)
        self.encoded_shards += sum(bool(r["encoded"]) for r in results)
        return merge_topk([r["scores"] for r in results], [r["rows"] for r in results],
                          [s.offset for s in shards], k)

    def _run(self, calls: list[tuple[int, Callable[[Any], Any]]]) -> list[Any]:
        """Submit each (actor slot, call); a call whose actor died is sent again once the actor is back."""
        results: list[Any] = [None] * len(calls)
        attempts = [0] * len(calls)
        pending = {make(self._actors[slot]): (i, self._actors[slot]) for i, (slot, make) in enumerate(calls)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i, handle = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except RayTaskError as err:
                if isinstance(err.cause, ConanError):
                    raise err.cause from None
                raise
            except RayActorError as err:
                slot, make = calls[i]
                attempts[i] += 1
                if attempts[i] > self._config.max_actor_retries:
                    raise MiningActorError(f"mining actor {slot} died {attempts[i]} times; last: "
                                           f"{str(err).splitlines()[0]}") from None
                self._recover(slot, handle)
                pending[make(self._actors[slot])] = (i, self._actors[slot])
        return results

    def _recover(self, slot: int, failed: Any) -> None:
        """Wait for Ray to restart the actor in `slot`; if it stays dead, put a fresh actor there."""
        if self._actors[slot] is not failed:
            return  # another lost call already brought this slot back
        self.restarts += 1
        deadline = time.monotonic() + RESTART_WAIT_S
        while time.monotonic() < deadline:
            try:
                ray.get(failed.pid.remote(), timeout=RESTART_WAIT_S)
                return
            except ActorUnavailableError:  # restarting: calls sent now would fail too
                time.sleep(0.2)
            except (RayActorError, GetTimeoutError):
                break
        ray.kill(failed, no_restart=True)
        self._actors[slot] = self._new_actor()


def pool_size(config: MiningConfig, shards: int, workers: int | None) -> int:
    """Explicit workers, else the config's, else one actor per shard but no more than the CPUs."""
    size = workers or config.workers or min(shards, os.cpu_count() or 1)
    return max(1, min(size, shards))


# ---- mining ---------------------------------------------------------------------------------------

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
    positive_scores = _positive_scores(pool, records, query_vectors, query_row) if config.margin else {}
    records_of: dict[str, list[str]] = {}
    for qid, rec in records.items():
        records_of.setdefault(rec.query, []).append(qid)

    mined: dict[str, QueryCandidates] = {}
    pending = list(range(len(unique_queries)))
    while pending:
        scores, indices = pool.search(shards, query_vectors[pending], k_fetch)
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
        k_fetch = min(2 * k_fetch, len(doc_ids))
    return dict(sorted(mined.items(), key=lambda item: order[item[0]]))


def _positive_scores(pool: MiningPool, records: dict[str, QueryCandidates], query_vectors: np.ndarray,
                     query_row: dict[str, int]) -> dict[str, float]:
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
             corpus_dir: str | Path | None = None, workers: int | None = None,
             encoder_factory: Callable[[], Encoder] | None = None) -> dict:
    """Initial mining: candidate lists for every query record of `data_dir`, written to `out_dir`.

    The corpus (every positive/negative text of `corpus_dir`, default `data_dir`) is written as a sharded
    dataset under `out_dir/corpus`. Returns the candidates manifest (its config records mined_by).
    """
    started = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    factory = _encoder_factory(model_path, encoder_factory)
    records = query_records(read_dataset(data_dir), config)
    if not records:
        raise ConanError(f"{data_dir}: no query records (kinds {config.query_kinds} with a positive) to mine for")
    source_dir = Path(corpus_dir) if corpus_dir else data_dir
    texts = corpus_texts(read_dataset(source_dir))
    corpus_out = out_dir / "corpus"
    write_corpus(corpus_out, texts, shard_rows=config.shard_rows, inputs=[source_dir / "manifest.json"])
    shards = shard_refs(corpus_out)
    doc_ids = read_dataset(corpus_out).column("doc_id").to_pylist()
    with ray_session(), MiningPool(factory, config, pool_size(config, len(shards), workers)) as pool:
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
           *, config: MiningConfig | None = None, out_dir: str | Path | None = None, workers: int | None = None,
           encoder_factory: Callable[[], Encoder] | None = None) -> CandidateLists:
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
    factory = _encoder_factory(model_path, encoder_factory)
    with ray_session(), MiningPool(factory, config, pool_size(config, len(shards), workers)) as pool:
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
