"""Decontamination of the data stages: match keys of the catalogued eval splits, so a training row that
collides with an eval example is dropped (reason `eval_overlap`) before any model sees it."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

from conan_core.io.catalog import EVAL_FILES, EVAL_TEXT_FILES
from conan_core.io.readers import ReadUnit, read_unit
from conan_core.paths import shared_data_dir
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


def load_eval_keys() -> frozenset[str]:
    """Match keys (see eval_match_keys) of every catalogued eval split that is present on disk."""
    keys: set[str] = set()
    for relative in EVAL_TEXT_FILES:
        path = shared_data_dir() / relative
        if not path.exists():
            continue
        for record in read_unit(ReadUnit(str(path), EVAL_FILES[relative])).records:
            keys.update(f"t:{overlap_key(text)}" for text in (record["query"], record["positive"]) if text)
            if record["positive"]:
                keys.add(eval_match_keys(record)[0])
    return frozenset(keys)
