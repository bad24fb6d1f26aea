"""A dataset on disk: `manifest.json` + `data/part-NNNNN.parquet` + `quarantine/part-NNNNN.parquet`.

The manifest lists every shard with its row count and sha256, the config that produced it, the
input files' checksums and the kept/dropped counts. Writes are atomic: the old manifest is removed
first, each shard is written to a temp file, fsynced and renamed, the shard folders are fsynced, and
the new manifest is fsynced and renamed into place last. So an interrupted run or a power cut leaves
either no manifest (the dir is not a dataset) or a manifest whose shards are all complete on disk.
Writing the same table with the same config gives byte-identical files. A manifest that is not a
JSON object with well-formed `shards` / `quarantine_shards` lists is a DatasetIntegrityError.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from conan_core.errors import ConanError, DatasetIntegrityError, OutputWriteError
from conan_core.schema import SCHEMA_VERSION

MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
QUARANTINE_DIR = "quarantine"
_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_inputs(inputs: list[Path]) -> list[dict[str, Any]]:
    """Path, size and sha256 of each input file (directories: each file inside, sorted)."""
    described = []
    for path in inputs:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.exists():
                described.append({"path": str(file), "bytes": file.stat().st_size,
                                  "sha256": sha256_file(file)})
    return described


def _fsync_path(path: Path) -> None:
    """Flush a written file's data (or a directory's entries, after renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _one_chunk(table: pa.Table) -> pa.Table:
    """`table` in one chunk per column where that fits (string offsets are int32): Parquet's page layout
    follows the chunks, so equal rows give equal bytes however the table was put together."""
    try:
        return table.combine_chunks()
    except pa.ArrowInvalid:  # over 2 GiB of text in one column: written as it is
        return table


def _write_shard(table: pa.Table, path: Path) -> dict[str, Any]:
    table = _one_chunk(table)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # No statistics timestamps or writer ids vary between runs, so equal tables give equal bytes.
    pq.write_table(table, tmp, compression="zstd", row_group_size=min(max(table.num_rows, 1), 50_000))
    _fsync_path(tmp)  # on disk before the manifest (fsynced last) can point at it
    os.replace(tmp, path)
    return {"path": path.relative_to(path.parent.parent).as_posix(), "rows": table.num_rows,
            "sha256": sha256_file(path)}


def _write_shards(table: pa.Table, folder: Path, shard_rows: int) -> list[dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.parquet"):  # leftovers of an earlier run with more shards
        stale.unlink()
    for stale in folder.glob(".*.tmp-*"):
        stale.unlink()
    starts = range(0, max(table.num_rows, 1), shard_rows)  # an empty table still gets one shard (its schema)
    shards = [_write_shard(table.slice(start, shard_rows), folder / f"part-{index:05d}.parquet")
              for index, start in enumerate(starts)]
    _fsync_path(folder)  # the renames too
    return shards


def write_dataset(out_dir: Path, records: pa.Table, quarantine: pa.Table | None, *, config: dict,
                  inputs: list[Path], counts: dict, shard_rows: int = 200_000) -> dict:
    """Write `records` (and `quarantine`) as a sharded, checksummed dataset; return the manifest."""
    if shard_rows < 1:
        raise ConanError(f"shard_rows must be >= 1, got {shard_rows}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputWriteError(f"{out_dir}: cannot write the dataset (exists and is not a directory)")
    try:
        described = describe_inputs(inputs)
    except OSError as err:
        raise ConanError(f"cannot read an input to checksum it ({_os_reason(err)})") from None
    try:
        return _write_dataset(out_dir, records, quarantine, config=config, inputs=described, counts=counts,
                              shard_rows=shard_rows)
    except OSError as err:
        raise OutputWriteError(f"{out_dir}: cannot write the dataset ({_os_reason(err)})") from None


def _os_reason(err: OSError) -> str:
    reason = err.strerror or type(err).__name__
    return f"{reason}: {err.filename}" if err.filename else reason


def ensure_writable_dir(path: Path) -> None:
    """ConanError unless `path` is (or can be created as) a directory this process can write into.

    Stages can call it before their work, so an unwritable output fails in a second, not at the end."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputWriteError(f"{path}: cannot write the output directory (exists and is not a directory)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputWriteError(f"{path}: cannot write the output directory ({_os_reason(err)})") from None


def _write_dataset(out_dir: Path, records: pa.Table, quarantine: pa.Table | None, *, config: dict,
                   inputs: list[dict[str, Any]], counts: dict, shard_rows: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    manifest_path.unlink(missing_ok=True)  # from here until the end the dir is not a valid dataset
    shards = _write_shards(records, out_dir / DATA_DIR, shard_rows)
    quarantine_shards = (_write_shards(quarantine, out_dir / QUARANTINE_DIR, shard_rows)
                         if quarantine is not None else [])
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "columns": records.schema.names,
        "rows": records.num_rows,
        "quarantined_rows": quarantine.num_rows if quarantine is not None else 0,
        "shards": shards,
        "quarantine_shards": quarantine_shards,
        "config": config,
        "inputs": inputs,
        "counts": counts,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    _atomic_write_bytes(manifest_path, text.encode("utf-8"))
    return json.loads(text)


def read_manifest(path: Path) -> dict:
    """The manifest of the dataset at `path` (a dataset dir); DatasetIntegrityError if absent or broken."""
    manifest_path = Path(path) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DatasetIntegrityError(f"{path}: no {MANIFEST_NAME} (not a dataset, or its write was "
                                    "interrupted)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetIntegrityError(f"{manifest_path}: unreadable manifest ({err})") from None
    except OSError as err:
        raise DatasetIntegrityError(f"{manifest_path}: cannot read ({_os_reason(err)})") from None
    if not isinstance(manifest, dict):
        raise DatasetIntegrityError(f"{manifest_path}: not a manifest (a JSON {_json_type(manifest)}, "
                                    "expected an object)")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetIntegrityError(f"{manifest_path}: schema_version {manifest.get('schema_version')!r}, "
                                    f"this code reads {SCHEMA_VERSION}")
    for key in ("shards", "quarantine_shards"):
        _check_shard_list(manifest_path, key, manifest.get(key))
    return manifest


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string"), (int, "number"),
                       (float, "number")):
        if isinstance(value, kind):
            return name
    return "null"


def _check_shard_list(manifest_path: Path, key: str, shards: Any) -> None:
    if not isinstance(shards, list):
        what = "missing" if shards is None else f"a JSON {_json_type(shards)}, expected an array"
        raise DatasetIntegrityError(f"{manifest_path}: {key!r} is {what}")
    for index, shard in enumerate(shards):
        where = f"{manifest_path}: {key}[{index}]"
        if not isinstance(shard, dict):
            raise DatasetIntegrityError(f"{where} is not an object")
        path, rows, digest = shard.get("path"), shard.get("rows"), shard.get("sha256")
        if not isinstance(path, str) or not path or Path(path).is_absolute() or ".." in Path(path).parts:
            raise DatasetIntegrityError(f"{where}: 'path' must be a relative path inside the dataset, got {path!r}")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise DatasetIntegrityError(f"{where}: 'rows' must be a count, got {rows!r}")
        if not isinstance(digest, str):
            raise DatasetIntegrityError(f"{where}: 'sha256' must be a hex string, got {digest!r}")


def _read_shards(root: Path, shards: list[dict], verify: bool) -> pa.Table:
    tables = []
    for shard in shards:
        path = root / shard["path"]
        if not path.is_file():
            raise DatasetIntegrityError(f"{path}: shard listed in the manifest is missing")
        if verify and sha256_file(path) != shard["sha256"]:
            raise DatasetIntegrityError(f"{path}: sha256 does not match the manifest (changed or corrupt)")
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DatasetIntegrityError(f"{path}: unreadable shard ({err})") from None
        if table.num_rows != shard["rows"]:
            raise DatasetIntegrityError(f"{path}: {table.num_rows} rows, manifest says {shard['rows']}")
        tables.append(table)
    return pa.concat_tables(tables) if tables else pa.table({})


def read_dataset(path: Path, *, verify: bool = True) -> pa.Table:
    """All data shards of the dataset at `path` as one table, checksums verified unless verify=False."""
    path = Path(path)
    return _read_shards(path, read_manifest(path)["shards"], verify)


def read_quarantine(path: Path, *, verify: bool = True) -> pa.Table:
    """The quarantined rows (QUARANTINE_SCHEMA) of the dataset at `path`."""
    path = Path(path)
    return _read_shards(path, read_manifest(path)["quarantine_shards"], verify)


def dataset_fingerprint(path: Path) -> str:
    """sha256 of manifest.json: changes whenever any shard, config or input changes."""
    manifest_path = Path(path) / MANIFEST_NAME
    read_manifest(path)
    return sha256_file(manifest_path)
