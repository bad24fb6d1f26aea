"""Decontamination of the data stages: match keys of the catalogued eval splits, so a training row that
collides with an eval example is dropped (reason `eval_overlap`) before any model sees it."""

from __future__ import annotations

import hashlib
import os
import unicodedata
from pathlib import Path
from typing import Any

from conan_core.io.catalog import EVAL_FILES, EVAL_TEXT_FILES
from conan_core.io.readers import ReadUnit, read_unit
from conan_core.paths import shared_data_dir, work_dir
from conan_core.schema import KIND_CLASSIFICATION


def overlap_key(text: str) -> str:
    """Loose match key for decontamination: NFKC, lower case, no whitespace."""
    return "".join(unicodedata.normalize("NFKC", text).lower().split())


def is_eval_path(path: str) -> bool:
    """True for a catalogued eval file (it is never checked against itself)."""
    try:
        key = Path(path).resolve().relative_to(shared_data_dir()).as_posix()
    except ValueError:
        return False
    return key in EVAL_FILES


def eval_match_keys(record: dict[str, Any]) -> list[str]:
    """Keys under which a record collides with an eval example.

    A classification text collides with any eval text (`t:`); a pair-like row collides with an eval
    pair of the same two texts in either order (`p:`). Pair tasks reuse sentences across pairs by
    design (SICK, STS-B), so a shared single sentence is not a leak, a shared pair is.
    """
    query = overlap_key(record["query"])
    if record["kind"] == KIND_CLASSIFICATION or not record["positive"]:
        return [f"t:{query}"]
    positive = overlap_key(record["positive"])
    return [f"p:{query}\x1f{positive}", f"p:{positive}\x1f{query}"]


# Bump when overlap_key / eval_match_keys change what a key is: cached key files of older versions are ignored.
_KEYS_VERSION = 1


def _read_eval_keys(paths: list[tuple[str, Path]]) -> frozenset[str]:
    keys: set[str] = set()
    for relative, path in paths:
        for record in read_unit(ReadUnit(str(path), EVAL_FILES[relative])).records:
            keys.update(f"t:{overlap_key(text)}" for text in (record["query"], record["positive"]) if text)
            if record["positive"]:
                keys.add(eval_match_keys(record)[0])
    return frozenset(keys)


def _cache_file(paths: list[tuple[str, Path]]) -> Path:
    """The key file for these eval splits' contents (and this key version), under the work dir."""
    digest = hashlib.blake2b(f"v{_KEYS_VERSION}".encode(), digest_size=16)
    for relative, path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]  # BEIR: a dir
        for file in files:
            name = file.relative_to(path.parent).as_posix() if path.is_dir() else relative
            digest.update(name.encode() + b"\0" + hashlib.blake2b(file.read_bytes()).digest())
    return work_dir() / "eval_keys" / f"{digest.hexdigest()}.txt"


def load_eval_keys() -> frozenset[str]:
    """Match keys (see eval_match_keys) of every catalogued eval split that is present on disk.

    Reading the splits takes seconds (~4 s for the shared data's 26 MB, before any unit can start), so the
    keys are kept in a text file under the work dir, named by a hash of the splits' contents: a changed or
    added split gives another file. A key holds no whitespace (overlap_key drops it), so one per line."""
    paths = [(relative, shared_data_dir() / relative) for relative in EVAL_TEXT_FILES]
    paths = [(relative, path) for relative, path in paths if path.exists()]
    cache = _cache_file(paths)
    if cache.exists():
        text = cache.read_text(encoding="utf-8")
        return frozenset(text.split("\n")) if text else frozenset()
    keys = _read_eval_keys(paths)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        tmp.write_text("\n".join(sorted(keys)), encoding="utf-8")
        os.replace(tmp, cache)  # whole or absent, also with two runs writing at once
    except OSError:
        pass  # a read-only work dir: the keys are simply read again next time
    return keys
