"""Small datasets and a saved tiny model for the training tests."""

from __future__ import annotations

import random
from pathlib import Path

from conan_core.io.dataset import write_dataset
from conan_core.schema import make_record, records_table
from conan_core.testing import tiny_model

WORDS = ("the a is of and to in on for with what how why who cat dog car house tree water food music book "
         "city good bad new old big small").split()


def _sentence(rng: random.Random, low: int = 3, high: int = 9) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_pairs(path: Path, n: int, source: str, seed: int = 0) -> Path:
    rng = random.Random(seed)
    records = [make_record(kind="pair", query=f"{source} {i} " + _sentence(rng), positive=_sentence(rng, 5, 14),
                           source=source, lang="en") for i in range(n)]
    write_dataset(path, records_table(records), None, config={}, inputs=[], counts={"rows": n})
    return path


def write_finetune(path: Path, n_retrieval: int, n_sts: int, n_cls: int = 0, seed: int = 0) -> Path:
    rng = random.Random(seed)
    records = [make_record(kind="retrieval", query=f"q{i} " + _sentence(rng), positive=_sentence(rng, 5, 12),
                           negatives=[_sentence(rng, 5, 12) for _ in range(rng.randint(0, 5))],
                           source="ret", lang="en") for i in range(n_retrieval)]
    records += [make_record(kind="sts", query=f"s{i} " + _sentence(rng), positive=_sentence(rng),
                            score=float(rng.randint(0, 5)), source="sts", lang="en") for i in range(n_sts)]
    records += [make_record(kind="classification", query=f"c{i} " + _sentence(rng), label=rng.choice("xyz"),
                            source="cls", lang="en") for i in range(n_cls)]
    write_dataset(path, records_table(records), None, config={}, inputs=[], counts={"rows": len(records)})
    return path


def save_tiny_model(path: Path, **kw) -> Path:
    return tiny_model(**kw).save(path)


def write_candidates_for(path: Path, dataset_dir: Path, list_length: int = 30, seed: int = 0) -> Path:
    """A candidates dir (as `conan mine` writes it) for the retrieval records of `dataset_dir`: each query
    gets `list_length` random corpus documents as its ranked list."""
    from conan_core.io.dataset import read_dataset
    from conan_core.mining.candidates import QueryCandidates, write_candidates
    from conan_core.mining.config import MiningConfig
    from conan_core.mining.corpus import doc_id, write_corpus

    rng = random.Random(seed)
    rows = [r for r in read_dataset(dataset_dir).to_pylist() if r["kind"] == "retrieval"]
    corpus = sorted({_sentence(rng, 4, 10) + f" doc{i}" for i in range(3 * list_length)})
    write_corpus(path / "corpus", corpus, shard_rows=1000, inputs=[])
    queries = {}
    for row in rows:
        docs = rng.sample(corpus, list_length)
        queries[row["id"]] = QueryCandidates(query=row["query"], positive=row["positive"],
                                             negatives=list(row["negatives"]), doc_ids=[doc_id(t) for t in docs],
                                             scores=[1.0 - r / 100 for r in range(list_length)])
    write_candidates(path / "cands", queries, corpus_dir=path / "corpus", mined_by={"fingerprint": "test"},
                     mining_config=MiningConfig(skip_ranks=2).model_dump(mode="json"), inputs=[],
                     counts={"queries": len(queries)})
    return path / "cands"
