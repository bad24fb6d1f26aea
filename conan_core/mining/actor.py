"""The mining actor: one Ray actor's body (the encoder, and at most one corpus shard's vectors + index).

Each actor loads the model once. For a search it loads one shard's embeddings (from the cache keyed by
(shard sha256, model fingerprint), or by encoding the shard), builds its FAISS index after dropping the
previous shard's vectors, and returns that shard's top-k for all queries. The pool that runs these actors
is `conan_core.mining.pool`; the mining algorithm and its entry points are `conan_core.mining.run`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray

from conan_core.errors import ModelLoadError
from conan_core.mining.config import MiningConfig
from conan_core.mining.corpus import ShardRef, cache_path, default_cache_dir, load_cached, read_shard_texts, save_cached
from conan_core.mining.index import build_index, configure_faiss, search
from conan_core.precision import resolve_cpu_bf16


class EmbeddingModel(Protocol):
    """What mining needs of a model: text in, normalised vectors out, and a fingerprint for the cache."""

    def encode(self, texts: Sequence[str], batch_size: int = 64, normalize: bool = True) -> np.ndarray: ...

    def fingerprint(self) -> str: ...


class ModelEncoderFactory:
    """Picklable recipe sent to each actor: load the ConanEmbedder saved at `model_path`."""

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = str(model_path)

    def __call__(self) -> EmbeddingModel:
        from conan_core.model import ConanEmbedder

        return ConanEmbedder.load(self.model_path)


def encoder_factory_for(model_path: str | Path,
                        given: Callable[[], EmbeddingModel] | None) -> Callable[[], EmbeddingModel]:
    """The given factory, or the model dir's after a cheap check here (an actor's failure is less clear)."""
    if given is not None:
        return given
    if not (Path(model_path) / "config.json").is_file():
        raise ModelLoadError(f"{model_path}: not a model dir (no config.json)")
    return ModelEncoderFactory(model_path)


class ShardWorker:
    """Body of one mining actor: the encoder, and at most one shard's vectors + index at a time."""

    def __init__(self, encoder_factory: Callable[[], EmbeddingModel], config: MiningConfig, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        configure_faiss(threads)
        self._config = config
        self._cache_dir = default_cache_dir(config.cache_dir)
        self._encoder = encoder_factory()
        self._bf16 = resolve_cpu_bf16(config.bf16)
        # bf16 vectors are cached apart from fp32 ones: the precision is part of what made them.
        self._fingerprint = self._encoder.fingerprint() + ("-bf16" if self._bf16 else "")
        self._shard_sha: str | None = None
        self._index: Any = None
        self._vectors: np.ndarray | None = None

    def fingerprint(self) -> str:
        return self._fingerprint

    def pid(self) -> int:
        return os.getpid()

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._bf16):
            vectors = self._encoder.encode(texts, batch_size=self._config.encode_batch_size, normalize=True)
        return np.asarray(vectors, dtype=np.float32)

    def search(self, shard: ShardRef, queries: np.ndarray, k: int, pairs: np.ndarray | None = None
               ) -> dict[str, Any]:
        """This shard's top-k for every query: {"scores", "rows", "encoded", "seconds", "pair_scores"};
        `pairs` [m, 2] (query row, row within this shard): the cosine of each pair, from the shard's vectors
        (the positives' scores for the margin, without encoding the positives again)."""
        started = time.perf_counter()
        encoded = self._load(shard)
        scores, rows = search(self._index, queries, min(k, shard.rows), self._config.query_batch_size)
        pair_scores = (np.einsum("ij,ij->i", queries[pairs[:, 0]], self._vectors[pairs[:, 1]])
                       if pairs is not None and len(pairs) else np.zeros(0, dtype=np.float32))
        return {"scores": scores, "rows": rows, "encoded": encoded, "seconds": time.perf_counter() - started,
                "pair_scores": pair_scores}

    def _load(self, shard: ShardRef) -> bool:
        """Make `shard` the one held; True when it had to be encoded (not cached)."""
        if self._shard_sha == shard.sha256:
            return False
        # Drop the previous shard before touching the next: one shard's vectors per process.
        self._index, self._vectors, self._shard_sha = None, None, None
        path = cache_path(self._cache_dir, shard.sha256, self._fingerprint)
        vectors = load_cached(path, shard.rows)
        encoded = vectors is None
        if vectors is None:
            vectors = self.encode(read_shard_texts(shard))
            save_cached(path, vectors)
        self._index = build_index(vectors, self._config.index, self._config.ivf_nlist, self._config.ivf_nprobe)
        self._vectors, self._shard_sha = vectors, shard.sha256
        return encoded


ShardActor = ray.remote(ShardWorker)
