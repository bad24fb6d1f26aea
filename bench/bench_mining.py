"""Benchmark of the mining actor pool (issue #5). One run; prints every figure and its baseline.

Same model (the shipped all-MiniLM-L6-v2, max 128 tokens) and corpus for both sides: 2,000 queries
(STS-benchmark sentence pairs with score >= 3: sentence1 -> sentence2) and 20,000 documents (every
sentence of STS-benchmark, SICK and TrecQA answer sentences, deduplicated) from the shared data.

1. Re-mining throughput: `remine` with a checkpoint whose embeddings are not cached (the pool re-encodes
   the corpus and queries and searches) vs sentence-transformers `util.mine_hard_negatives`
   (use_faiss, same model, range 10..110, top strategy), at its default (fp32) and inside the same bf16
   autocast the pool uses where the CPU has AMX (`MiningConfig.bf16`, auto). Ray is already running for
   the pool (a trainer has it up between epochs); actor start-up and model loading are included.
2. A between-epoch re-mine as a fraction of one finetuning epoch: the epoch is steps-per-epoch x the
   median time of the trainer's own `train_step` (FinetuneConfig defaults, all logical ranks in this
   process as on one node) on the bench's data and candidate lists.
3. The cost of a DHNM check (2k and 100k observed queries) in training steps.
4. Growth: 2,000 queries + 10k / 50k / 100k documents of real text (every built-in evaluation task's
   texts, shuffled) encoded by a pool of 2 actors, encode time measured per size; search as the pool does
   it (20k-row shards, top-k each, merged) with flat and IVF shards, and IVF's recall@k against flat. 1M
   documents: search on noisy copies of the distinct documents' vectors; its encode is measured only with
   GROWTH_MAX_ENCODE=1000000 (the ~156k distinct shared texts repeated; ~25 more minutes).

Run: .venv/bin/python bench/bench_mining.py   (about 30 minutes on 2 idle cores)
Only the 20k / 2k part: BENCH_SIZES=10000 GROWTH_MAX_ENCODE=10000 .venv/bin/python bench/bench_mining.py
Smaller: BENCH_QUERIES=500 BENCH_DOCS=5000 .venv/bin/python bench/bench_mining.py
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

csv.field_size_limit(sys.maxsize)
BENCH_DIR = Path(tempfile.mkdtemp(prefix="conan-bench-mining-"))
os.environ.setdefault("CONAN_WORK_DIR", str(BENCH_DIR / "work"))

from conan_core.paths import offline_env, shared_data_dir  # noqa: E402

offline_env()

N_QUERIES = int(os.environ.get("BENCH_QUERIES", 2000))  # smaller values: a quick smoke run
N_DOCS = int(os.environ.get("BENCH_DOCS", 20_000))
TOP_K, SKIP = 100, 10


def load_texts() -> tuple[list[tuple[str, str]], list[str]]:
    data = shared_data_dir()
    pairs, sentences = [], []
    with open(data / "eval/en_stsbenchmark/stsbenchmark.tsv", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            sentences += [row["sentence1"], row["sentence2"]]
            if float(row["score"]) >= 3.0 and row["sentence1"] != row["sentence2"]:
                pairs.append((row["sentence1"], row["sentence2"]))
    for name in ("SICK_train.txt", "SICK_trial.txt", "SICK_test_annotated.txt"):
        with open(data / "eval/en_sick2014" / name, encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
                sentences += [row["sentence_A"], row["sentence_B"]]
    for name in ("train.csv", "dev.csv", "test.csv"):
        with open(data / "pairs/en_trecqa_wang" / name, encoding="utf-8", newline="") as handle:
            sentences += [row["atext"] for row in csv.DictReader(handle)]
    pairs = list(dict.fromkeys(pairs))[:N_QUERIES]
    corpus = list(dict.fromkeys([p for _, p in pairs] + [s for s in sentences if s.strip()]))[:N_DOCS]
    return pairs, corpus


def write_inputs(pairs: list[tuple[str, str]], corpus: list[str]) -> tuple[Path, Path]:
    from conan_core.io.dataset import write_dataset
    from conan_core.model import ConanEmbedder
    from conan_core.schema import make_record, records_table

    model_dir = ConanEmbedder.from_base("all-MiniLM-L6-v2", max_seq_length=128).save(BENCH_DIR / "model")
    records = [make_record(kind="retrieval", query=q, positive=p, source="bench", lang="en") for q, p in pairs]
    positives = {p for _, p in pairs}
    records += [make_record(kind="sts", query="-", positive=t, score=0.0, source="bench", lang="en")
                for t in corpus if t not in positives]  # puts the other documents into the default corpus
    data_dir = BENCH_DIR / "data"
    write_dataset(data_dir, records_table(records), None, config={}, inputs=[], counts={})
    return model_dir, data_dir


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def bench_pool(model_dir: Path, data_dir: Path) -> dict:
    from conan_core.mining.config import MiningConfig
    from conan_core.mining.run import remine, run_mine
    from conan_core.raysession import ray_session

    out: dict = {}
    # Two shards: one per actor, one actor per core.
    config = MiningConfig(top_k=TOP_K, skip_ranks=SKIP, shard_rows=-(-N_DOCS // 2),
                          cache_dir=str(BENCH_DIR / "cache-1"))
    with ray_session():
        manifest, out["mine_cold_s"] = timed(run_mine, model_dir, data_dir, BENCH_DIR / "cands", config)
        out["documents"], out["queries"] = manifest["counts"]["documents"], manifest["counts"]["queries"]
        _, out["remine_cached_s"] = timed(remine, model_dir, BENCH_DIR / "cands", None, config=config,
                                          out_dir=BENCH_DIR / "cands-cached")
        fresh = config.model_copy(update={"cache_dir": str(BENCH_DIR / "cache-2")})
        lists, out["remine_cold_s"] = timed(remine, model_dir, BENCH_DIR / "cands", None, config=fresh,
                                            out_dir=BENCH_DIR / "cands-cold")
    out["lists"] = lists
    return out


def bench_sentence_transformers(model_dir: Path, pairs: list[tuple[str, str]], corpus: list[str],
                                bf16: bool = False) -> float:
    """Seconds of `mine_hard_negatives` (model load included); bf16: inside the same CPU bf16 autocast the
    pool uses (not sentence-transformers' default, shown so that the precision is not the whole story)."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    start = time.perf_counter()
    model = SentenceTransformer(str(model_dir), device="cpu")
    dataset = Dataset.from_dict({"query": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        mine_hard_negatives(dataset, model, corpus=corpus, range_min=SKIP, range_max=SKIP + TOP_K,
                            num_negatives=7, sampling_strategy="top", batch_size=64, use_faiss=True,
                            verbose=False, output_format="n-tuple")
    return time.perf_counter() - start


def bench_step(model_dir: Path, data_dir: Path, candidates_dir: Path, steps: int = 4) -> tuple[float, int]:
    """(median seconds per finetuning step, steps per epoch): the trainer's own `train_step` at the
    FinetuneConfig defaults on the bench's data and candidate lists, all logical ranks in this process
    (what `conan train finetune` runs on one node), fwd + bwd + AdamW. The first step is not timed."""
    import torch

    from conan_core.mining.config import MiningConfig
    from conan_core.model import ConanEmbedder
    from conan_core.train.config import FinetuneConfig
    from conan_core.train.loop import build_workload, make_encoder, make_optimizer, train_step
    from conan_core.train.spec import TrainSpec

    config = FinetuneConfig(log_every=1)
    spec = TrainSpec(stage="finetune", config=config, data_dirs=[data_dir], model_path=model_dir,
                     out_dir=BENCH_DIR / "step", candidates_dir=candidates_dir, mining=MiningConfig())
    model = ConanEmbedder.load(model_dir)
    model.train()
    optimizer = make_optimizer(model, config)
    encode = make_encoder(model, config, torch.device("cpu"))
    workload = build_workload(spec, encode, rank=0)
    total = workload.steps_per_epoch()
    times = [train_step(step, total, config, model, optimizer, workload, encode)["step_seconds"]
             for step in range(1, steps + 2)]
    return float(np.median(times[1:])), total


def bench_check(lists, n_queries: int) -> float:
    """Seconds of one DHNM check with `n_queries` observed queries (v1, every query stale)."""
    from conan_core.mining.candidates import CandidateLists, QueryCandidates
    from conan_core.mining.config import DHNMConfig
    from conan_core.mining.dhnm import DynamicNegatives

    base = list(lists.queries.values())
    queries = {f"q{i}": QueryCandidates(query="q", positive="p", negatives=[], doc_ids=base[i % len(base)].doc_ids,
                                        scores=base[i % len(base)].scores) for i in range(n_queries)}
    big = CandidateLists(queries=queries, doc_texts=lists.doc_texts, skip_ranks=SKIP, fingerprint="bench")
    dyn = DynamicNegatives(big, 8, DHNMConfig(check_every=1))
    ids = list(queries)
    dyn.observe(ids, np.full((n_queries, 8), 0.6))
    dyn.observe(ids, np.full((n_queries, 8), 0.3))
    _, seconds = timed(dyn.maybe_check, 1)
    return seconds


def growth_texts(n: int, seed: int = 0) -> tuple[list[str], int]:
    """`n` texts from every built-in evaluation task's data (zh and en sentences, reviews, titles, passages:
    their real length mix), distinct ones in a seeded shuffle, repeated in that order past the last distinct
    one (encoding does not deduplicate, so repeats cost what new texts of that length cost); and how many are
    distinct. A throughput corpus: nothing is trained on it."""
    from conan_core.eval.data import ClassificationData, LabelledTexts, PairData, RetrievalData
    from conan_core.eval.tasks import builtin_tasks

    texts: list[str] = []
    for spec in builtin_tasks().values():
        data = spec.load()
        if isinstance(data, PairData):
            texts += data.sentence1 + data.sentence2
        elif isinstance(data, LabelledTexts):
            texts += data.texts
        elif isinstance(data, ClassificationData):
            texts += data.train.texts + data.test.texts
        elif isinstance(data, RetrievalData):
            texts += [f"{title} {text}".strip() for title, text in data.corpus.values()] + list(data.queries.values())
    unique = list(dict.fromkeys(t for t in texts if t.strip()))
    np.random.default_rng(seed).shuffle(unique)
    return [unique[i % len(unique)] for i in range(n)], len(unique)


def encode_growth(model_dir: Path, texts: list[str], marks: list[int]) -> tuple[np.ndarray, dict[int, float]]:
    """Encode `texts` with the mining pool (2 actors, as `remine` runs it) in order; the seconds spent when
    the first `m` texts are done, for each mark (measured, one pass)."""
    from conan_core.mining.actor import encoder_factory_for
    from conan_core.mining.config import MiningConfig
    from conan_core.mining.pool import MiningPool
    from conan_core.raysession import ray_session

    parts, seconds, done, elapsed = [], {}, 0, 0.0
    with ray_session(), MiningPool(encoder_factory_for(model_dir, None), MiningConfig(), size=2) as pool:
        pool.encode(texts[:64])  # actor start-up and model load, not counted: a running trainer has them up
        for mark in marks:
            for start in range(done, mark, 50_000):  # calls of at most 50k texts: bounded transfers
                vectors, took = timed(pool.encode, texts[start:min(mark, start + 50_000)])
                parts.append(vectors)
                elapsed += took
            seconds[mark], done = elapsed, mark
    return np.concatenate(parts), seconds


def sharded_search(corpus: np.ndarray, queries: np.ndarray, kind: str, shard_rows: int = 20_000
                   ) -> tuple[np.ndarray, float, float]:
    """The pool's search: one index per `shard_rows` documents (flat or IVF at MiningConfig's nlist/nprobe),
    top-(k+skip) per shard, merged. Returns (merged rows, index build seconds, search + merge seconds)."""
    from conan_core.mining.config import MiningConfig
    from conan_core.mining.index import build_index, merge_topk, search

    config, k = MiningConfig(), TOP_K + SKIP
    build_s = search_s = 0.0
    scores, rows, offsets = [], [], []
    for offset in range(0, len(corpus), shard_rows):
        index, took = timed(build_index, corpus[offset:offset + shard_rows], kind, config.ivf_nlist,
                            config.ivf_nprobe)
        build_s += took
        (found_scores, found_rows), took = timed(search, index, queries, k)
        search_s += took
        scores.append(found_scores)
        rows.append(found_rows)
        offsets.append(offset)
    (_, merged_rows), took = timed(merge_topk, scores, rows, offsets, k)
    return merged_rows, build_s, search_s + took


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k rows that `found` also returns (per query)."""
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found.tolist(), exact.tolist(), strict=True)]))


def noisy_copies(vectors: np.ndarray, copies: int, sigma: float = 0.05, seed: int = 0) -> np.ndarray:
    """`copies` perturbed copies of each (unit) vector, renormalised: a larger corpus with the real one's
    cluster structure, for index growth where encoding that many real texts does not fit the bench."""
    rng = np.random.default_rng(seed)
    out = np.concatenate([vectors + rng.normal(0, sigma / np.sqrt(vectors.shape[1]), vectors.shape)
                          for _ in range(copies)]).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def bench_growth(model_dir: Path, sizes: list[int]) -> None:
    """[4] Texts encoded by the pool up to GROWTH_MAX_ENCODE documents, encode seconds measured per size;
    each size: flat vs IVF shard search and IVF's recall@k against flat. Search runs on the real vectors while
    the documents are distinct; above that (repeated texts, or sizes past GROWTH_MAX_ENCODE) on noisy copies
    of the distinct documents' vectors (exact duplicates would make the recall a matter of tie order)."""
    encoded_max = min(max(sizes), int(os.environ.get("GROWTH_MAX_ENCODE", 100_000)))
    texts, distinct = growth_texts(N_QUERIES + encoded_max)
    marks = [N_QUERIES] + [N_QUERIES + s for s in sizes if s <= encoded_max]
    vectors, seconds = encode_growth(model_dir, texts, marks)
    queries = vectors[:N_QUERIES]
    real_docs = vectors[N_QUERIES:min(len(vectors), distinct)]
    print(f"[4] growth: {N_QUERIES} queries + up to {encoded_max} documents from the shared evaluation texts "
          f"({distinct} distinct), encoded by a pool of 2 actors (max 128 tokens); the {N_QUERIES} queries took "
          f"{seconds[N_QUERIES]:.1f} s", flush=True)
    for size in sizes:
        if size <= encoded_max:
            encode_s = seconds[N_QUERIES + size] - seconds[N_QUERIES]
            encode = f"encode {encode_s:.0f} s ({size / encode_s:.0f} docs/s, measured)"
        else:
            rate = encoded_max / (seconds[N_QUERIES + encoded_max] - seconds[N_QUERIES])
            encode = f"encode not measured (~{size / rate:.0f} s at the measured rate)"
        if size <= len(real_docs):
            corpus, vectors_note = real_docs[:size], "real vectors"
        else:
            corpus = noisy_copies(real_docs, -(-size // len(real_docs)))[:size]
            vectors_note = f"noisy copies of the {len(real_docs)} distinct documents' vectors"
        exact, flat_build, flat_search = sharded_search(corpus, queries, "flat")
        found, ivf_build, ivf_search = sharded_search(corpus, queries, "ivf")
        print(f"[4] {size:>8} docs: {encode}; search ({vectors_note}) {N_QUERIES} queries top-{TOP_K + SKIP}, "
              f"20k-row shards: flat {flat_build:.1f} + {flat_search:.1f} s, IVF {ivf_build:.1f} + "
              f"{ivf_search:.1f} s (build + search), IVF recall@{TOP_K + SKIP} vs flat "
              f"{recall_at_k(found, exact):.3f}", flush=True)


def main() -> None:
    print(f"load average at start: {os.getloadavg()}", flush=True)
    pairs, corpus = load_texts()
    model_dir, data_dir = write_inputs(pairs, corpus)
    print(f"queries {len(pairs)}, documents {len(corpus)}", flush=True)

    from conan_core.precision import resolve_cpu_bf16

    st_s = bench_sentence_transformers(model_dir, pairs, corpus)
    print(f"[1] sentence-transformers mine_hard_negatives (its default, fp32): {st_s:.1f} s", flush=True)
    st_bf16_s = bench_sentence_transformers(model_dir, pairs, corpus, bf16=True)
    print(f"[1] sentence-transformers mine_hard_negatives in bf16 autocast: {st_bf16_s:.1f} s", flush=True)
    print(f"[1] pool encodes in bf16 (MiningConfig.bf16 auto: AMX on this CPU): {resolve_cpu_bf16(None)}",
          flush=True)
    pool = bench_pool(model_dir, data_dir)
    print(f"[1] pool: initial mine (cold cache) {pool['mine_cold_s']:.1f} s; re-mine, new checkpoint "
          f"(not cached) {pool['remine_cold_s']:.1f} s; re-mine, cached embeddings {pool['remine_cached_s']:.1f} s "
          f"({pool['documents']} docs, {pool['queries']} queries)")
    print(f"[1] re-mining throughput ratio pool / sentence-transformers: {st_s / pool['remine_cold_s']:.2f}x "
          f"(goal >= 1.5x); with cached embeddings {st_s / pool['remine_cached_s']:.2f}x; against "
          f"sentence-transformers in bf16 {st_bf16_s / pool['remine_cold_s']:.2f}x", flush=True)

    step_s, steps_per_epoch = bench_step(model_dir, data_dir, BENCH_DIR / "cands")
    epoch_s = steps_per_epoch * step_s
    print(f"[2] CBB step (the trainer's train_step, FinetuneConfig defaults) {step_s:.2f} s; epoch = "
          f"{steps_per_epoch} steps = {epoch_s:.0f} s; between-epoch "
          f"re-mine {pool['remine_cold_s']:.1f} s = {pool['remine_cold_s'] / epoch_s:.1%} of an epoch "
          f"(goal <= 15%)", flush=True)

    for n in (2000, 100_000):
        check_s = bench_check(pool["lists"], n)
        print(f"[3] DHNM check, {n} observed queries: {check_s * 1000:.1f} ms = {check_s / step_s:.3f} steps "
              f"(paper: about 1 step)", flush=True)

    sizes = [int(x) for x in os.environ.get("BENCH_SIZES", "10000,50000,100000,1000000").split(",")]
    bench_growth(model_dir, sizes)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(BENCH_DIR, ignore_errors=True)  # model copy, datasets, caches, Ray temp
