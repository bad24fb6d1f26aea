"""The mining corpus: deduplicated document texts written as a sharded dataset, and the embedding cache.

The corpus is a dataset dir (same manifest + checksummed shards as every other dataset) with columns
`doc_id` (sha256 of the text, 16 hex) and `text`. Each shard is what one mining actor encodes and
indexes; its embeddings are cached per (shard sha256, model fingerprint) so nothing is encoded twice.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conan_core.errors import ConanError, DatasetIntegrityError
from conan_core.io.dataset import read_dataset, read_manifest, sha256_file, write_dataset
from conan_core.paths import work_dir

CORPUS_SCHEMA = pa.schema([pa.field("doc_id", pa.string(), nullable=False),
                           pa.field("text", pa.string(), nullable=False)])


@dataclass(frozen=True)
class ShardRef:
    """One corpus shard as an actor sees it: where it is, what it should hash to, its global offset."""

    index: int
    path: str
    sha256: str
    rows: int
    offset: int


def doc_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def corpus_texts(records: pa.Table) -> list[str]:
    """Every positive and negative text of a records table, first occurrence order, no duplicates.

    A record with neither (a classification text, a lone sentence) contributes its `query` text.
    """
    seen: dict[str, None] = {}
    for query, positive, negatives in zip(records.column("query").to_pylist(),
                                          records.column("positive").to_pylist(),
                                          records.column("negatives").to_pylist(), strict=True):
        texts = ([positive] if positive else []) + [n for n in (negatives or []) if n]
        for text in texts or ([query] if query else []):
            seen.setdefault(text, None)
    return list(seen)


def write_corpus(out_dir: Path, texts: list[str], *, shard_rows: int, inputs: list[Path]) -> dict:
    """Write the corpus dataset (doc_id, text) in shards of `shard_rows`; returns its manifest."""
    if not texts:
        raise ConanError("the mining corpus is empty: the dataset has no positive or negative texts")
    table = pa.table({"doc_id": [doc_id(t) for t in texts], "text": texts}, schema=CORPUS_SCHEMA)
    return write_dataset(out_dir, table, None, config={"kind": "mining-corpus"}, inputs=inputs,
                         counts={"documents": len(texts)}, shard_rows=shard_rows)


def shard_refs(corpus_dir: Path) -> list[ShardRef]:
    """The corpus shards in order, with absolute paths and global row offsets."""
    corpus_dir = Path(corpus_dir).resolve()
    refs, offset = [], 0
    for index, shard in enumerate(read_manifest(corpus_dir)["shards"]):
        refs.append(ShardRef(index=index, path=str(corpus_dir / shard["path"]), sha256=shard["sha256"],
                             rows=int(shard["rows"]), offset=offset))
        offset += int(shard["rows"])
    return refs


def read_shard_texts(ref: ShardRef) -> list[str]:
    """The texts of one shard, after checking its sha256 against the manifest."""
    if sha256_file(Path(ref.path)) != ref.sha256:
        raise DatasetIntegrityError(f"{ref.path}: sha256 does not match the corpus manifest")
    return pq.read_table(ref.path, columns=["text"]).column("text").to_pylist()


def read_corpus(corpus_dir: Path) -> pa.Table:
    return read_dataset(corpus_dir)


def default_cache_dir(configured: str | None) -> Path:
    return Path(configured) if configured else work_dir() / "mining_cache"


def cache_path(cache_dir: Path, shard_sha256: str, model_fingerprint: str) -> Path:
    return Path(cache_dir) / f"{shard_sha256[:24]}-{model_fingerprint}.npy"


def load_cached(path: Path, rows: int) -> np.ndarray | None:
    """Cached embeddings of a shard, or None when absent or not matching the shard's row count."""
    if not path.is_file():
        return None
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None  # a torn or foreign file: re-encode rather than trust it
    if vectors.ndim != 2 or len(vectors) != rows or vectors.dtype != np.float32:
        return None
    return vectors


def save_cached(path: Path, vectors: np.ndarray) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, vectors, allow_pickle=False)
    os.replace(tmp, path)
