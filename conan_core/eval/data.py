"""In-memory task data, one shape per task family, and seeded subsampling for quick runs.

Loaders (built-in tasks and task folders) produce these; `mteb_tasks.py` turns them into mteb tasks.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

from conan_core.eval.config import EvalConfig


@dataclass
class PairData:
    """STS (graded score) and pair classification (0/1 label) data."""

    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class LabelledTexts:
    """Clustering data, or one split of classification data."""

    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class ClassificationData:
    train: LabelledTexts
    test: LabelledTexts

    def __len__(self) -> int:
        return len(self.test)


@dataclass
class RetrievalData:
    """BEIR-shaped retrieval data; `top_ranked` (candidates per query) makes it a reranking task."""

    corpus: dict[str, tuple[str, str]]  # doc id -> (title, text)
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    top_ranked: dict[str, list[str]] | None = None

    def __len__(self) -> int:
        return len(self.queries)


TaskData = PairData | LabelledTexts | ClassificationData | RetrievalData


@dataclass
class Subsample:
    """What a subsampling cap did to one task (recorded in its result)."""

    seed: int
    caps: dict[str, int]
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "caps": self.caps, "before": self.before, "after": self.after}


def data_fingerprint(data: TaskData) -> str:
    """A short content hash: filed as the dataset revision, so two runs on different data never look alike."""
    if isinstance(data, RetrievalData):
        content: Any = [sorted(data.corpus.items()), sorted(data.queries.items()),
                        sorted((q, sorted(d.items())) for q, d in data.qrels.items()),
                        sorted(data.top_ranked.items()) if data.top_ranked else None]
    elif isinstance(data, ClassificationData):
        content = [data.train.texts, data.train.labels, data.test.texts, data.test.labels]
    elif isinstance(data, LabelledTexts):
        content = [data.texts, data.labels]
    else:
        content = [data.sentence1, data.sentence2, data.scores]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()[:12]


def _sample_indices(n: int, cap: int, rng: random.Random) -> list[int]:
    """`cap` indices out of `n`, drawn with `rng`, in their original order."""
    return sorted(rng.sample(range(n), cap))


def _pick(values: list[Any], indices: list[int]) -> list[Any]:
    return [values[i] for i in indices]


def _subsample_pairs(data: PairData, cap: int, rng: random.Random) -> PairData:
    idx = _sample_indices(len(data), cap, rng)
    return PairData(_pick(data.sentence1, idx), _pick(data.sentence2, idx), _pick(data.scores, idx))


def _subsample_texts(data: LabelledTexts, cap: int, rng: random.Random) -> LabelledTexts:
    idx = _sample_indices(len(data), cap, rng)
    return LabelledTexts(_pick(data.texts, idx), _pick(data.labels, idx))


def _subsample_retrieval(data: RetrievalData, max_queries: int | None, max_docs: int | None,
                         rng: random.Random) -> RetrievalData:
    query_ids = sorted(data.queries)
    if max_queries is not None and len(query_ids) > max_queries:
        query_ids = [query_ids[i] for i in _sample_indices(len(query_ids), max_queries, rng)]
    qrels = {q: data.qrels[q] for q in query_ids if q in data.qrels}
    top_ranked = {q: data.top_ranked[q] for q in query_ids} if data.top_ranked is not None else None
    doc_ids = sorted(data.corpus)
    if max_docs is not None and len(doc_ids) > max_docs and top_ranked is None:
        # Keep every relevant document of the kept queries, so the scores stay meaningful; fill up with others.
        needed = {d for judged in qrels.values() for d, score in judged.items() if score > 0 and d in data.corpus}
        others = [d for d in doc_ids if d not in needed]
        room = max(0, max_docs - len(needed))
        fill = [others[i] for i in _sample_indices(len(others), min(room, len(others)), rng)]
        doc_ids = sorted(needed | set(fill))
    corpus = {d: data.corpus[d] for d in doc_ids}
    qrels = {q: {d: s for d, s in judged.items() if d in corpus} for q, judged in qrels.items()}
    return RetrievalData(corpus, {q: data.queries[q] for q in query_ids}, qrels, top_ranked)


def _sizes(data: TaskData) -> dict[str, int]:
    if isinstance(data, RetrievalData):
        return {"queries": len(data.queries), "documents": len(data.corpus)}
    if isinstance(data, ClassificationData):
        return {"train": len(data.train), "test": len(data.test)}
    if isinstance(data, LabelledTexts):
        return {"texts": len(data)}
    return {"pairs": len(data)}


def subsample(data: TaskData, config: EvalConfig) -> tuple[TaskData, Subsample | None]:
    """Apply the config's caps with its seed. Returns the data unchanged and None when no cap bites."""
    rng = random.Random(config.seed)
    before = _sizes(data)
    caps: dict[str, int] = {}
    if isinstance(data, PairData) and config.max_pairs is not None and len(data) > config.max_pairs:
        caps["max_pairs"] = config.max_pairs
        data = _subsample_pairs(data, config.max_pairs, rng)
    elif isinstance(data, LabelledTexts) and config.max_docs is not None and len(data) > config.max_docs:
        caps["max_docs"] = config.max_docs
        data = _subsample_texts(data, config.max_docs, rng)
    elif isinstance(data, ClassificationData) and config.max_docs is not None:
        train, test = data.train, data.test
        if len(train) > config.max_docs:
            train = _subsample_texts(train, config.max_docs, rng)
        if len(test) > config.max_docs:
            test = _subsample_texts(test, config.max_docs, rng)
        if (len(train), len(test)) != (len(data.train), len(data.test)):
            caps["max_docs"] = config.max_docs
            data = ClassificationData(train, test)
    elif isinstance(data, RetrievalData):
        for name, cap, size in (("max_queries", config.max_queries, len(data.queries)),
                                ("max_docs", config.max_docs, len(data.corpus))):
            if cap is not None and size > cap and not (name == "max_docs" and data.top_ranked is not None):
                caps[name] = cap
        if caps:
            data = _subsample_retrieval(data, caps.get("max_queries"), caps.get("max_docs"), rng)
    if not caps:
        return data, None
    return data, Subsample(seed=config.seed, caps=caps, before=before, after=_sizes(data))
