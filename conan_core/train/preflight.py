"""Checks a training run's inputs in the driver, before Ray starts: what the workers would otherwise fail on
after Ray's start-up (half a minute here), found in a second with a one-line error.

Datasets: the manifest, every data shard present with its sha256 and row count (the checks of the
workers' `read_dataset`, and of `conan mine`, without loading the data). Model dirs: every JSON file parses
and every safetensors file has a readable header and all the bytes it declares. Light to import (no
torch): `conan run`'s preflight uses it too.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from conan_core.errors import DatasetIntegrityError, ModelLoadError


def check_dataset(path: Path) -> dict[str, Any]:
    """What the workers' `read_dataset` checks, without loading the data: the manifest, every data shard
    present with the listed sha256 and row count. DatasetIntegrityError (one line) otherwise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conan_core.io.dataset import read_manifest, sha256_file

    manifest = read_manifest(path)
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise DatasetIntegrityError(f"{path / 'manifest.json'}: lists no shards")
    for shard in shards:
        try:
            shard_path, digest, rows = path / shard["path"], shard["sha256"], shard["rows"]
        except (KeyError, TypeError):
            raise DatasetIntegrityError(f"{path / 'manifest.json'}: malformed shard entry {shard!r}") from None
        if not shard_path.is_file():
            raise DatasetIntegrityError(f"{shard_path}: shard listed in the manifest is missing")
        if sha256_file(shard_path) != digest:
            raise DatasetIntegrityError(f"{shard_path}: sha256 does not match the manifest (changed or corrupt)")
        try:
            found = pq.read_metadata(shard_path).num_rows
        except (pa.ArrowInvalid, OSError) as err:
            raise DatasetIntegrityError(f"{shard_path}: unreadable shard ({err})") from None
        if found != rows:
            raise DatasetIntegrityError(f"{shard_path}: {found} rows, manifest says {rows}")
    return manifest


def check_candidates(path: Path) -> None:
    """A candidates dir from `conan mine` and the corpus it refers to (see `check_dataset`)."""
    manifest = check_dataset(path)
    corpus = (manifest.get("config") or {}).get("corpus_dir")
    if corpus:
        corpus_dir = Path(corpus) if Path(corpus).is_absolute() else (path / corpus).resolve()
        check_dataset(corpus_dir)


def check_model_files(model_dir: Path) -> None:
    """Cheap checks of a model dir before any worker loads it: every JSON file (configs, tokenizer) parses
    and every safetensors file has a readable header and all the bytes it declares. ModelLoadError."""
    for path in sorted(model_dir.rglob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelLoadError(f"{path}: not valid JSON ({str(err).splitlines()[0]})") from None
    weights = sorted(model_dir.rglob("*.safetensors"))
    if not weights and not any(model_dir.glob("pytorch_model*.bin")):
        raise ModelLoadError(f"{model_dir}: no model weights (model.safetensors)")
    for path in weights:
        _check_safetensors(path)


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path}: truncated safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ModelLoadError(f"{path}: truncated safetensors file (header of {length} bytes, file {size})")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{path}: unreadable safetensors header") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: unreadable safetensors header")
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        raise ModelLoadError(f"{path}: truncated safetensors file ({size} of {needed} bytes)")
