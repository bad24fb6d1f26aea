"""Training examples from conan datasets, and their token ids computed once per worker.

Pretraining uses every (query, positive) of `pair` and `retrieval` records. Finetuning splits records
into the two CBB tasks (paper §2.3):
  * retrieval: `retrieval` records, `pair` records without a score (no negatives of their own: other
    queries' positives fill in), and `classification` records converted (same label = positive,
    other labels of the same source = negatives);
    (at most `classification_max_per_source` queries per source, so 2-label sentiment reviews cannot
    dominate the pool);
  * STS (CoSENT): `sts` records and `pair` records with a score (pair classification as 0/1). Each keeps
    its source: CoSENT ranks pairs by their gold score, which only means something on one label scale,
    so an STS batch is drawn from one source (0/1 labels, STS-B 0-5 and SICK 1-5 never mix).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from conan_core.train.batching import TrainDataError


def load_records(data_dirs: Sequence[str | Path]) -> pa.Table:
    """All records of the given dataset dirs (checksums verified), as one table."""
    from conan_core.io.dataset import read_dataset

    if not data_dirs:
        raise TrainDataError("no training data given (pass at least one dataset dir)")
    tables = [read_dataset(Path(d)) for d in data_dirs]
    return pa.concat_tables(tables, promote_options="default")


@dataclass
class PairExamples:
    ids: list[str]
    sources: list[str]
    queries: list[str]
    positives: list[str]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class RetrievalExamples:
    ids: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    positives: list[str] = field(default_factory=list)
    negatives: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, indices) -> RetrievalExamples:
        """The examples at `indices`, in that order."""
        out = RetrievalExamples()
        for i in indices:
            out.append(self.ids[i], self.queries[i], self.positives[i], self.negatives[i])
        return out

    def append(self, id_: str, query: str, positive: str, negatives: list[str]) -> None:
        self.ids.append(id_)
        self.queries.append(query)
        self.positives.append(positive)
        self.negatives.append(negatives)


@dataclass
class StsExamples:
    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    first: list[str] = field(default_factory=list)
    second: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def pretrain_pairs(table: pa.Table) -> PairExamples:
    """(query, positive) pairs of `pair` and `retrieval` records with both sides non-empty."""
    rows = table.select(["id", "kind", "query", "positive", "source"]).to_pylist()
    keep = [r for r in rows if r["kind"] in ("pair", "retrieval") and r["query"] and r["positive"]]
    if not keep:
        raise TrainDataError("no (query, positive) pairs in the pretraining data (kinds pair/retrieval)")
    return PairExamples([r["id"] for r in keep], [r["source"] for r in keep],
                        [r["query"] for r in keep], [r["positive"] for r in keep])


def finetune_tasks(table: pa.Table, *, classification_negatives: int, seed: int = 0,
                   classification_max_per_source: int | None = None
                   ) -> tuple[RetrievalExamples, StsExamples, dict[str, int]]:
    """Split records into the retrieval and STS tasks; returns counts of what went where."""
    retrieval, sts = RetrievalExamples(), StsExamples()
    classification: list[dict] = []
    counts: dict[str, int] = defaultdict(int)
    for row in table.to_pylist():
        kind = row["kind"]
        if kind == "classification":
            classification.append(row)
        elif kind == "sts" or (kind == "pair" and row["score"] is not None):
            if row["score"] is None or not row["query"] or not row["positive"]:
                counts["skipped_sts_incomplete"] += 1
                continue
            sts.ids.append(row["id"])
            sts.sources.append(row["source"])
            sts.first.append(row["query"])
            sts.second.append(row["positive"])
            sts.scores.append(float(row["score"]))
            counts["sts"] += 1
        elif kind in ("retrieval", "pair") and row["query"] and row["positive"]:
            retrieval.append(row["id"], row["query"], row["positive"], list(row["negatives"] or []))
            counts["retrieval"] += 1
        else:
            counts["skipped_incomplete"] += 1
    converted = classification_as_retrieval(classification, classification_negatives, seed,
                                            max_per_source=classification_max_per_source)
    for i in range(len(converted)):
        retrieval.append(converted.ids[i], converted.queries[i], converted.positives[i], converted.negatives[i])
    counts["classification_as_retrieval"] = len(converted)
    counts["skipped_classification"] = len(classification) - len(converted)
    return retrieval, sts, dict(counts)


def classification_as_retrieval(rows: list[dict], n_negatives: int, seed: int = 0,
                                max_per_source: int | None = None) -> RetrievalExamples:
    """Paper §2.4: a text's positive is another text with the same label, its negatives texts with other
    labels (from the same source, so label sets do not mix). Texts whose label has no second member,
    or whose source has one label only, are dropped; a source with more than `max_per_source` texts
    keeps a random (seeded) subset of that size as queries (all its texts stay positives/negatives)."""
    rng = np.random.default_rng(seed)
    by_source: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["query"] and row["label"] is not None:
            by_source[row["source"]][row["label"]].append(row)
    out = RetrievalExamples()
    for source in sorted(by_source):
        labels = by_source[source]
        if len(labels) < 2:
            continue
        converted = RetrievalExamples()
        for label in sorted(labels):
            members = labels[label]
            others = [r["query"] for other in sorted(labels) if other != label for r in labels[other]]
            if len(members) < 2:
                continue
            for i, row in enumerate(members):
                partner = members[(i + 1 + int(rng.integers(len(members) - 1))) % len(members)]
                picks = rng.choice(len(others), size=min(n_negatives, len(others)), replace=False)
                converted.append(row["id"], row["query"], partner["query"], [others[j] for j in picks])
        if max_per_source is not None and len(converted) > max_per_source:
            converted = converted.select(sorted(rng.choice(len(converted), max_per_source, replace=False)))
        for i in range(len(converted)):
            out.append(converted.ids[i], converted.queries[i], converted.positives[i], converted.negatives[i])
    return out


class TokenBank:
    """Token ids of every text, computed once (batched, fast tokenizer) and reused at every step."""

    def __init__(self, tokenizer, max_length: int, chunk: int = 2048) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.chunk = chunk
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._ids: dict[str, np.ndarray] = {}

    def add(self, texts: Iterable[str]) -> None:
        """Tokenise the texts not seen yet (no padding: padding is added per batch)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._ids))
        for start in range(0, len(missing), self.chunk):
            part = missing[start:start + self.chunk]
            encoded = self.tokenizer(part, truncation=True, max_length=self.max_length, padding=False,
                                     return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            for text, ids in zip(part, encoded, strict=True):
                self._ids[text] = np.asarray(ids, dtype=np.int64)

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        self.add(texts)
        return np.array([len(self._ids[t]) for t in texts], dtype=np.int64)

    def features(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """A padded batch (input_ids, attention_mask) as long as its longest text, no longer."""
        self.add(texts)
        rows = [self._ids[t] for t in texts]
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
