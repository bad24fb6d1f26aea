"""Benchmark of the mining actor pool (issue #5). One run; prints every figure and its baseline.

Same model (the shipped all-MiniLM-L6-v2, max 128 tokens) and corpus for both sides: 2,000 queries
(STS-benchmark sentence pairs with score >= 3: sentence1 -> sentence2) and 20,000 documents (every
sentence of STS-benchmark, SICK and TrecQA answer sentences, deduplicated) from the shared data.

1. Re-mining throughput: `remine` with a checkpoint whose embeddings are not cached (the pool re-encodes
   the corpus and queries and searches) vs sentence-transformers `util.mine_hard_negatives`
   (use_faiss, same model, range 10..110, top strategy). Ray is already running for the pool (a trainer
   has it up between epochs); actor start-up and model loading are included.
2. A between-epoch re-mine as a fraction of one finetuning epoch, the epoch estimated from a measured
   CBB step (FinetuneConfig defaults: 4 queries x (positive + 2x4 negatives) + 32 STS pairs, fwd+bwd+AdamW).
3. The cost of a DHNM check (2k and 100k observed queries) in training steps.
4. Encode + search at 10k / 50k / 100k documents: encode from the measured pool rate (extrapolated),
   search measured (2,000 queries, flat index, 20k-row shards merged as the pool does).

Run: .venv/bin/python bench/bench_mining.py   (about 10 minutes on 2 idle cores)
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


def bench_sentence_transformers(model_dir: Path, pairs: list[tuple[str, str]], corpus: list[str]) -> float:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    start = time.perf_counter()
    model = SentenceTransformer(str(model_dir), device="cpu")
    dataset = Dataset.from_dict({"query": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
    mine_hard_negatives(dataset, model, corpus=corpus, range_min=SKIP, range_max=SKIP + TOP_K, num_negatives=7,
                        sampling_strategy="top", batch_size=64, use_faiss=True, verbose=False,
                        output_format="n-tuple")
    return time.perf_counter() - start


def bench_step(model_dir: Path, corpus: list[str], steps: int = 4) -> tuple[float, int]:
    """Seconds per CBB step at the FinetuneConfig defaults (one process doing every rank's work)."""
    import torch

    from conan_core.losses.cosent import cosent_loss
    from conan_core.losses.infonce import hard_negative_infonce
    from conan_core.model import ConanEmbedder
    from conan_core.train.config import FinetuneConfig

    cfg = FinetuneConfig()
    n_neg = cfg.layout.retrieval_group * cfg.negatives_per_rank
    model = ConanEmbedder.load(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    rng = np.random.default_rng(0)
    times = []
    for step in range(steps + 1):
        texts = [corpus[i] for i in rng.integers(0, len(corpus), cfg.retrieval_batch * (2 + n_neg))]
        sts = [corpus[i] for i in rng.integers(0, len(corpus), 2 * cfg.sts_batch)]
        start = time.perf_counter()
        emb = torch.nn.functional.normalize(model.embed(texts), dim=-1)
        b = cfg.retrieval_batch
        q, p, negs = emb[:b], emb[b:2 * b], emb[2 * b:].reshape(b, n_neg, -1)
        s = torch.nn.functional.normalize(model.embed(sts), dim=-1)
        loss = hard_negative_infonce(q, p, negs) + cfg.beta * cosent_loss(
            s[: cfg.sts_batch], s[cfg.sts_batch:], torch.rand(cfg.sts_batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return float(np.median(times)), cfg.retrieval_batch


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


def bench_search(sizes: list[int], dim: int = 384, n_queries: int = N_QUERIES) -> dict[int, tuple[float, float]]:
    """(flat single index, 20k-row shards merged) search seconds for `n_queries` queries at each corpus size."""
    from conan_core.mining.index import build_index, configure_faiss, merge_topk, search

    configure_faiss(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    out = {}
    for size in sizes:
        corpus = rng.standard_normal((size, dim)).astype(np.float32)
        corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
        _, flat_s = timed(lambda c=corpus: search(build_index(c), queries, TOP_K + SKIP))
        start = time.perf_counter()
        parts = [(search(build_index(corpus[i:i + 20_000]), queries, TOP_K + SKIP), i)
                 for i in range(0, size, 20_000)]
        merge_topk([p[0][0] for p in parts], [p[0][1] for p in parts], [p[1] for p in parts], TOP_K + SKIP)
        out[size] = (flat_s, time.perf_counter() - start)
    return out


def main() -> None:
    print(f"load average at start: {os.getloadavg()}", flush=True)
    pairs, corpus = load_texts()
    model_dir, data_dir = write_inputs(pairs, corpus)
    print(f"queries {len(pairs)}, documents {len(corpus)}", flush=True)

    st_s = bench_sentence_transformers(model_dir, pairs, corpus)
    print(f"[1] sentence-transformers mine_hard_negatives: {st_s:.1f} s", flush=True)
    pool = bench_pool(model_dir, data_dir)
    print(f"[1] pool: initial mine (cold cache) {pool['mine_cold_s']:.1f} s; re-mine, new checkpoint "
          f"(not cached) {pool['remine_cold_s']:.1f} s; re-mine, cached embeddings {pool['remine_cached_s']:.1f} s "
          f"({pool['documents']} docs, {pool['queries']} queries)")
    print(f"[1] re-mining throughput ratio pool / sentence-transformers: {st_s / pool['remine_cold_s']:.2f}x "
          f"(goal >= 1.5x); with cached embeddings {st_s / pool['remine_cached_s']:.2f}x", flush=True)

    step_s, batch = bench_step(model_dir, corpus)
    steps_per_epoch = -(-pool["queries"] // batch)
    epoch_s = steps_per_epoch * step_s
    print(f"[2] CBB step {step_s:.2f} s; epoch = {steps_per_epoch} steps = {epoch_s:.0f} s; between-epoch "
          f"re-mine {pool['remine_cold_s']:.1f} s = {pool['remine_cold_s'] / epoch_s:.1%} of an epoch "
          f"(goal <= 15%)", flush=True)

    for n in (2000, 100_000):
        check_s = bench_check(pool["lists"], n)
        print(f"[3] DHNM check, {n} observed queries: {check_s * 1000:.1f} ms = {check_s / step_s:.3f} steps "
              f"(paper: about 1 step)", flush=True)

    # Whole re-mine time (queries, search and actor start included) per document: a lower bound on the rate.
    docs_per_s = pool["documents"] / pool["remine_cold_s"]
    sizes = [int(x) for x in os.environ.get("BENCH_SIZES", "10000,50000,100000").split(",")]
    for size, (flat_s, sharded_s) in bench_search(sizes).items():
        print(f"[4] {size:>7} docs: encode ~{size / docs_per_s:.0f} s (extrapolated at {docs_per_s:.0f} docs/s), "
              f"search {N_QUERIES} queries top-{TOP_K + SKIP}: flat {flat_s:.2f} s, "
              f"20k shards + merge {sharded_s:.2f} s",
              flush=True)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(BENCH_DIR, ignore_errors=True)  # model copy, datasets, caches, Ray temp
