"""Exact and near-duplicate (MinHash LSH over character n-grams) removal; the first occurrence is kept.

Signatures are computed where the rows are read (in parallel); the LSH index is then filled in input
order in one process, so "first" means first in the order of the inputs.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from conan_core.clean.config import CleanConfig


def exact_key(record: dict[str, Any]) -> str:
    """Key of the normalised pair (kind, query, positive, label): equal keys are exact duplicates."""
    text = "\x1f".join([record["kind"], record["query"], record["positive"], record["label"] or ""])
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def dedup_text(record: dict[str, Any]) -> str:
    return f"{record['query']}\x1f{record['positive']}".lower()


def char_ngrams(text: str, n: int) -> list[bytes]:
    """Distinct character n-grams (the whole text when shorter than n)."""
    if len(text) <= n:
        return [text.encode("utf-8")]
    return list({text[i:i + n].encode("utf-8") for i in range(len(text) - n + 1)})


def signatures(texts: list[str], config: CleanConfig) -> np.ndarray:
    """MinHash signatures [len(texts), num_perm] (uint64) of the texts' character n-grams."""
    out = np.empty((len(texts), config.minhash_num_perm), dtype=np.uint64)
    # crc32 (C, deterministic in every process) instead of datasketch's default sha1: several times faster,
    # and the random permutations on top make its linearity harmless for Jaccard estimates.
    template = MinHash(num_perm=config.minhash_num_perm, seed=config.minhash_seed, hashfunc=zlib.crc32)
    for row, text in enumerate(texts):
        minhash = template.copy()
        minhash.update_batch(char_ngrams(text, config.minhash_ngram))
        out[row] = minhash.hashvalues
    return out


class NearDuplicateIndex:
    """MinHash LSH: `is_new(signature)` answers False for a near-duplicate of something already added."""

    def __init__(self, config: CleanConfig) -> None:
        self._lsh = MinHashLSH(threshold=config.minhash_threshold, num_perm=config.minhash_num_perm)
        self._seed = config.minhash_seed
        # the permutation scheme of the signatures (same constructor arguments as in `signatures`)
        self._scheme = MinHash(num_perm=config.minhash_num_perm, seed=config.minhash_seed,
                               hashfunc=zlib.crc32).scheme
        self._threshold = config.minhash_threshold
        self._kept: list[np.ndarray] = []

    def is_new(self, signature: np.ndarray) -> bool:
        minhash = LeanMinHash(seed=self._seed, hashvalues=signature, scheme=self._scheme)
        for key in self._lsh.query(minhash):
            # LSH buckets give candidates; confirm with the signature's Jaccard estimate.
            if float(np.mean(self._kept[int(key)] == signature)) >= self._threshold:
                return False
        self._lsh.insert(str(len(self._kept)), minhash, check_duplication=False)
        self._kept.append(signature)
        return True
