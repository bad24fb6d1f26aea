"""Candidate lists: per query, its ranked candidate documents from the mining run.

On disk this is a dataset dir (manifest.json + checksummed shards, written by `write_dataset`) with one
row per query record:

  query_id (the record id), query, positive, negatives (the record's own negatives),
  doc_ids list<string>, ranks list<int32>, scores list<float32>, positive_score float32 (nullable)

Ranks count from 0 after the false-negative guards; DHNM windows start at `skip_ranks`. The manifest's
`config` records `mined_by` (model fingerprint and path), the mining config and the corpus dir, whose
texts the doc ids refer to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from conan_core.errors import ConanError
from conan_core.io.dataset import dataset_fingerprint, read_dataset, read_manifest, write_dataset

CANDIDATE_SCHEMA = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("query", pa.string(), nullable=False),
    pa.field("positive", pa.string(), nullable=False),
    pa.field("negatives", pa.list_(pa.string()), nullable=False),
    pa.field("doc_ids", pa.list_(pa.string()), nullable=False),
    pa.field("ranks", pa.list_(pa.int32()), nullable=False),
    pa.field("scores", pa.list_(pa.float32()), nullable=False),
    pa.field("positive_score", pa.float32()),
])


class CandidatesError(ConanError):
    """A candidates dir is missing, malformed, or does not match what uses it."""


@dataclass
class QueryCandidates:
    """One query's ranked candidates (doc ids best first, their scores) and its record's texts."""

    query: str
    positive: str
    negatives: list[str]
    doc_ids: list[str]
    scores: list[float]
    positive_score: float | None = None


@dataclass
class CandidateLists:
    """All candidate lists of a mining run plus the texts of the documents they name."""

    queries: dict[str, QueryCandidates]
    doc_texts: dict[str, str]
    skip_ranks: int
    mined_by: dict[str, Any] = field(default_factory=dict)
    mining_config: dict[str, Any] = field(default_factory=dict)
    corpus_dir: str | None = None
    path: Path | None = None
    fingerprint: str = ""

    @classmethod
    def load(cls, path: Path) -> CandidateLists:
        """Read a candidates dir and the corpus it refers to (checksums verified)."""
        path = Path(path)
        config = read_manifest(path).get("config", {})
        if config.get("kind") != "candidates":
            raise CandidatesError(f"{path}: not a candidates dir (manifest config.kind={config.get('kind')!r})")
        corpus_dir = Path(config["corpus_dir"])
        if not corpus_dir.is_absolute():
            corpus_dir = (path / corpus_dir).resolve()
        corpus = read_dataset(corpus_dir)
        doc_texts = dict(zip(corpus.column("doc_id").to_pylist(), corpus.column("text").to_pylist(), strict=True))
        return cls(queries=queries_from_table(read_dataset(path)), doc_texts=doc_texts,
                   skip_ranks=int(config["mining"]["skip_ranks"]), mined_by=config.get("mined_by", {}),
                   mining_config=config["mining"],
                   corpus_dir=str(corpus_dir), path=path, fingerprint=dataset_fingerprint(path))

    def query_ids(self) -> list[str]:
        return list(self.queries)

    def get(self, query_id: str) -> QueryCandidates:
        try:
            return self.queries[query_id]
        except KeyError:
            raise CandidatesError(f"query id {query_id!r} has no candidate list") from None

    def texts(self, doc_ids: Iterable[str]) -> list[str]:
        return [self.doc_texts[d] for d in doc_ids]


def queries_from_table(table: pa.Table) -> dict[str, QueryCandidates]:
    rows = table.to_pylist()
    return {row["query_id"]: QueryCandidates(query=row["query"], positive=row["positive"],
                                             negatives=list(row["negatives"]), doc_ids=list(row["doc_ids"]),
                                             scores=[float(s) for s in row["scores"]],
                                             positive_score=row["positive_score"])
            for row in rows}


def queries_to_table(queries: dict[str, QueryCandidates]) -> pa.Table:
    items = list(queries.items())
    return pa.table({
        "query_id": [qid for qid, _ in items],
        "query": [q.query for _, q in items],
        "positive": [q.positive for _, q in items],
        "negatives": [q.negatives for _, q in items],
        "doc_ids": [q.doc_ids for _, q in items],
        "ranks": [list(range(len(q.doc_ids))) for _, q in items],
        "scores": [q.scores for _, q in items],
        "positive_score": [q.positive_score for _, q in items],
    }, schema=CANDIDATE_SCHEMA)


def write_candidates(out_dir: Path, queries: dict[str, QueryCandidates], *, corpus_dir: Path,
                     mined_by: dict[str, Any], mining_config: dict[str, Any], inputs: list[Path],
                     counts: dict[str, Any], shard_rows: int = 200_000) -> CandidateLists:
    """Write the candidates dir; returns it loaded (with its fingerprint)."""
    config = {"kind": "candidates", "mined_by": mined_by, "mining": mining_config,
              "corpus_dir": str(Path(corpus_dir).resolve())}
    write_dataset(out_dir, queries_to_table(queries), None, config=config, inputs=inputs, counts=counts,
                  shard_rows=shard_rows)
    return CandidateLists.load(out_dir)
