"""Exact and near-duplicate (MinHash LSH over character n-grams) removal; the first occurrence is kept.

Everything per row is computed where the rows are read (in parallel, `row_keys`): the exact key, the
MinHash signature and one 64-bit hash per LSH band. The index is then filled in input order in one
process (`DedupIndex`), so "first" means first in the order of the inputs; that pass only does set and
dict look-ups, and compares signatures only for the rare rows whose band hash is already taken.

The signatures are datasketch's (2.0, scheme "affine32", crc32 of each UTF-8 n-gram as the input hash),
computed for a whole unit in a few numpy passes instead of one MinHash object per row; the bands are
MinHashLSH's for the same threshold and permutation count, and a candidate counts only if one band is
equal value for value, as in MinHashLSH (the band hash only finds it). So the rows dropped are exactly
those datasketch's MinHashLSH with our Jaccard check would drop; `tests/test_clean.py` checks both.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from conan_core.clean.config import CleanConfig
from conan_core.errors import ConanError

# MurmurHash3's 32-bit finalizer (datasketch's pre-mix of the input hash, scheme "affine32").
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))
_FMIX64 = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(33), np.uint64(0xC4CEB9FE1A85EC53),
           np.uint64(33))


def exact_key(record: dict[str, Any]) -> bytes:
    """Key of the normalised pair (kind, query, positive, label): equal keys are exact duplicates."""
    text = "\x1f".join([record["kind"], record["query"], record["positive"], record["label"] or ""])
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def dedup_text(record: dict[str, Any]) -> str:
    return f"{record['query']}\x1f{record['positive']}".lower()


def char_ngrams(text: str, n: int) -> set[str]:
    """Distinct character n-grams (the whole text when shorter than n)."""
    if len(text) <= n:
        return {text}
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def _fmix(values: np.ndarray, constants: tuple) -> np.ndarray:
    s1, m1, s2, m2, s3 = constants
    values = values ^ (values >> s1)
    values = values * m1
    values = values ^ (values >> s2)
    values = values * m2
    return values ^ (values >> s3)


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutations (a odd, b) for `seed`, drawn as MinHash draws them."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def signatures(texts: list[str], config: CleanConfig) -> np.ndarray:
    """MinHash signatures [len(texts), num_perm] (uint32) of the texts' character n-grams."""
    starts = np.empty(len(texts), dtype=np.intp)
    hashes: list[int] = []
    for row, text in enumerate(texts):
        starts[row] = len(hashes)
        # crc32 (C, deterministic in every process): several times faster than datasketch's default sha1.
        hashes.extend(map(zlib.crc32, map(str.encode, char_ngrams(text, config.minhash_ngram))))
    mixed = _fmix(np.array(hashes, dtype=np.uint32), _FMIX32)
    a, b = _permutations(config.minhash_num_perm, config.minhash_seed)
    out = np.empty((config.minhash_num_perm, len(texts)), dtype=np.uint32)
    if texts:  # every text has at least one n-gram, so no segment of reduceat is empty
        permuted = np.empty_like(mixed)
        # one permutation at a time over all n-grams of the unit: a small array that stays in cache
        for k in range(config.minhash_num_perm):
            np.multiply(mixed, a[k], out=permuted)
            np.add(permuted, b[k], out=permuted)
            out[k] = np.minimum.reduceat(permuted, starts)
    return np.ascontiguousarray(out.T)


@lru_cache(maxsize=8)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) as datasketch's MinHashLSH picks them (weights 0.5 / 0.5): the pair with
    b * r <= num_perm that minimises the mean of the false-positive and false-negative areas.

    Computed here rather than read off a MinHashLSH because importing datasketch imports scipy (~1 s in
    every worker). The integrands are polynomials of degree b * r <= num_perm, so Gauss-Legendre with
    num_perm // 2 + 1 nodes integrates them exactly (up to rounding); tests/test_clean.py checks the choice
    against datasketch's over a grid of thresholds and permutation counts.
    """
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 1)
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=float)
    bands, rows = pairs[:, :1], pairs[:, 1:]

    def area(lo: float, hi: float, false_negative: bool) -> np.ndarray:
        s = (hi - lo) / 2 * nodes + (hi + lo) / 2
        p = 1 - (1 - s ** rows) ** bands  # probability that a pair of Jaccard s becomes a candidate
        return ((1 - p) if false_negative else p) @ weights * (hi - lo) / 2

    error = area(0.0, threshold, False) * 0.5 + area(threshold, 1.0, True) * 0.5
    b, r = pairs[int(np.argmin(error))]  # argmin: the first minimum, as datasketch's strict "<" keeps it
    if b < 2:  # as MinHashLSH refuses it: one band is no LSH
        raise ConanError(f"minhash_threshold {threshold} with minhash_num_perm {num_perm} leaves a single LSH "
                         f"band; lower the threshold or use more permutations")
    return int(b), int(r)


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit hash per LSH band [len(sigs), bands]: equal bands hash equal (unequal ones rarely)."""
    banded = sigs[:, :bands * rows].reshape(len(sigs), bands, rows).astype(np.uint64)
    weights = _fmix(np.arange(1, rows + 1, dtype=np.uint64), _FMIX64) | np.uint64(1)
    return _fmix((banded * weights).sum(axis=2, dtype=np.uint64), _FMIX64)  # uint64 arithmetic wraps


def unique_mask(values: np.ndarray) -> np.ndarray:
    """True where a value occurs once in `values`."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] == 1


@dataclass
class RowKeys:
    """What the ordered dedup pass needs of a unit's rows, computed in the worker.

    exact: 16-byte keys, one per row. near_rows: the rows near-dedup applies to (their kind is in
    near_dedup_kinds); signatures and bands have one row per entry of near_rows.
    """

    exact: np.ndarray  # dtype S16 [rows]
    near_rows: np.ndarray  # int64 [k]
    signatures: np.ndarray  # uint32 [k, num_perm]
    bands: np.ndarray  # uint64 [k, bands]


def row_keys(records: list[dict[str, Any]], config: CleanConfig) -> RowKeys:
    exact = np.array([exact_key(r) for r in records], dtype="S16")
    near = [i for i, r in enumerate(records) if r["kind"] in config.near_dedup_kinds] if config.near_dedup else []
    sigs = signatures([dedup_text(records[i]) for i in near], config)
    bands = band_hashes(sigs, *lsh_bands(config.minhash_threshold, config.minhash_num_perm)) if near else \
        np.empty((0, 0), dtype=np.uint64)
    return RowKeys(exact, np.array(near, dtype=np.int64), sigs, bands)


class _SignatureStore:
    """Signatures of every row offered to the index, by id (a growable array: no object per row)."""

    def __init__(self, num_perm: int) -> None:
        self._data = np.empty((1024, num_perm), dtype=np.uint32)
        self.size = 0

    def extend(self, sigs: np.ndarray) -> int:
        """Append `sigs`; return the id of the first."""
        while self.size + len(sigs) > len(self._data):
            grown = np.empty((2 * len(self._data), self._data.shape[1]), dtype=np.uint32)
            grown[:self.size] = self._data[:self.size]
            self._data = grown
        first = self.size
        self._data[first:first + len(sigs)] = sigs
        self.size += len(sigs)
        return first

    def __getitem__(self, index: int) -> np.ndarray:
        return self._data[index]


class NearDuplicateIndex:
    """MinHash LSH: `is_new(id, bands)` answers False for a near-duplicate of a signature already kept.

    A kept signature is listed under each of its band hashes; a candidate is a kept signature that
    shares one whole band with the new one, and it is a near-duplicate when the signatures agree in at
    least `minhash_threshold` of their positions (the estimated Jaccard).

    The buckets hold plain ints (the first kept id of a band hash), with the rare further ids in a
    separate dict of lists: a dict of ints is left alone by Python's garbage collector, while one holding
    lists would be walked entry by entry in every full collection, which made a 1M-row clean quadratic.
    """

    def __init__(self, config: CleanConfig) -> None:
        self._bands, self._rows = lsh_bands(config.minhash_threshold, config.minhash_num_perm)
        # fewest equal positions whose share reaches the threshold, by the same float comparison as before
        self._agree = next(c for c in range(config.minhash_num_perm + 1)
                           if c / config.minhash_num_perm >= config.minhash_threshold)
        self.store = _SignatureStore(config.minhash_num_perm)
        self._first: list[dict[int, int]] = [{} for _ in range(self._bands)]  # band hash -> first kept id
        self._more: list[dict[int, list[int]]] = [{} for _ in range(self._bands)]  # band hash -> later ids

    def add_signatures(self, sigs: np.ndarray) -> int:
        """Make `sigs` known under consecutive ids (not yet kept); return the first id."""
        return self.store.extend(sigs)

    def fresh(self, bands: np.ndarray) -> np.ndarray:
        """Which rows of `bands` [k, bands] have every band hash new to the index and unique among them."""
        fresh = np.ones(len(bands), dtype=bool)
        for band in range(self._bands):
            column = bands[:, band]
            fresh &= unique_mask(column)
            known = self._first[band].keys() & column.tolist()
            if known:
                fresh &= ~np.isin(column, np.fromiter(known, dtype=np.uint64, count=len(known)))
        return fresh

    def add_fresh(self, ids: np.ndarray, bands: np.ndarray) -> None:
        """Keep signatures `ids` whose band hashes `fresh` found new and unique (no look-up needed)."""
        for band in range(self._bands):
            self._first[band].update(zip(bands[:, band].tolist(), ids.tolist(), strict=True))

    def is_new(self, index: int, bands: tuple[int, ...] | list[int]) -> bool:
        """False if signature `index` is a near-duplicate of a kept one; else keep it and answer True."""
        for band, key in enumerate(bands):
            if key in self._first[band] and self._any_match(index, band, key):
                return False
        for band, key in enumerate(bands):
            if self._first[band].setdefault(key, index) != index:
                self._more[band].setdefault(key, []).append(index)
        return True

    def _any_match(self, index: int, band: int, key: int) -> bool:
        sig = self.store[index]
        lo, hi = band * self._rows, (band + 1) * self._rows
        for kept in (self._first[band][key], *self._more[band].get(key, ())):
            equal = self.store[kept] == sig
            # the Jaccard estimate, and the band itself must be equal (a hash collision is no candidate)
            if np.count_nonzero(equal) >= self._agree and equal[lo:hi].all():
                return True
        return False
