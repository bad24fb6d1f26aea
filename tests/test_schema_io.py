"""Record schema and the sharded, checksummed dataset format."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from conan_core.errors import DatasetIntegrityError
from conan_core.io.dataset import (
    dataset_fingerprint,
    read_dataset,
    read_manifest,
    read_quarantine,
    write_dataset,
)
from conan_core.schema import (
    RECORD_SCHEMA,
    SchemaError,
    make_quarantine_row,
    make_record,
    quarantine_table,
    records_table,
    validate_records,
)


def _records(n: int) -> pa.Table:
    return records_table(
        make_record(kind="retrieval", query=f"问题 {i}", positive=f"答案 {i}", negatives=[f"错 {i}"],
                    source="unit", lang="zh")
        for i in range(n)
    )


def _write(out: Path, n: int = 25, shard_rows: int = 10, input_file: Path | None = None) -> dict:
    quarantine = quarantine_table([make_quarantine_row(source="unit", reason="malformed_json", raw="{oops")])
    return write_dataset(out, _records(n), quarantine, config={"a": 1},
                         inputs=[input_file] if input_file else [], counts={"unit": {"kept": n}},
                         shard_rows=shard_rows)


def test_record_ids_are_stable_and_content_based() -> None:
    a = make_record(kind="pair", query="q", positive="p", source="s", lang="en")
    b = make_record(kind="pair", query="q", positive="p", source="s", lang="en")
    c = make_record(kind="pair", query="q", positive="p2", source="s", lang="en")
    assert a["id"] == b["id"] != c["id"]
    with pytest.raises(SchemaError):
        make_record(kind="nonsense", query="q", source="s", lang="en")


def test_records_table_follows_schema() -> None:
    table = _records(3)
    assert table.schema == RECORD_SCHEMA
    validate_records(table)
    with pytest.raises(SchemaError):
        validate_records(table.drop_columns(["lang"]))


def test_write_then_read_roundtrip_with_shards(tmp_path: Path) -> None:
    source_file = tmp_path / "in.jsonl"
    source_file.write_text("{}\n", encoding="utf-8")
    manifest = _write(tmp_path / "ds", input_file=source_file)
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 5]
    assert manifest["inputs"][0]["sha256"] and manifest["rows"] == 25
    table = read_dataset(tmp_path / "ds")
    assert table.num_rows == 25 and table.schema == RECORD_SCHEMA
    assert table.column("query").to_pylist() == [f"问题 {i}" for i in range(25)]
    assert read_quarantine(tmp_path / "ds").column("reason").to_pylist() == ["malformed_json"]
    assert read_manifest(tmp_path / "ds") == manifest


def test_rewrite_is_byte_identical_and_drops_stale_shards(tmp_path: Path) -> None:
    _write(tmp_path / "ds", n=45)
    first = dataset_fingerprint(tmp_path / "ds")
    files = {p.name: p.read_bytes() for p in (tmp_path / "ds" / "data").iterdir()}
    _write(tmp_path / "ds", n=45)
    assert dataset_fingerprint(tmp_path / "ds") == first
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds" / "data").iterdir()} == files
    _write(tmp_path / "ds", n=5)
    assert sorted(p.name for p in (tmp_path / "ds" / "data").iterdir()) == ["part-00000.parquet"]


def test_corrupt_shard_is_a_clear_error(tmp_path: Path) -> None:
    _write(tmp_path / "ds")
    shard = tmp_path / "ds" / "data" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetIntegrityError, match="part-00001.parquet: sha256"):
        read_dataset(tmp_path / "ds")


def test_missing_shard_or_manifest_is_a_clear_error(tmp_path: Path) -> None:
    _write(tmp_path / "ds")
    (tmp_path / "ds" / "data" / "part-00002.parquet").unlink()
    with pytest.raises(DatasetIntegrityError, match="missing"):
        read_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "manifest.json").unlink()
    with pytest.raises(DatasetIntegrityError, match="no manifest.json"):
        read_dataset(tmp_path / "ds")


def test_row_count_mismatch_is_detected(tmp_path: Path) -> None:
    _write(tmp_path / "ds")
    manifest_path = tmp_path / "ds" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["rows"] = 11
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetIntegrityError, match="manifest says 11"):
        read_dataset(tmp_path / "ds")


def test_interrupted_write_leaves_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "ds")
    import conan_core.io.dataset as dataset_module

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(dataset_module.pq, "write_table", fail)
    with pytest.raises(OSError):
        _write(tmp_path / "ds")
    with pytest.raises(DatasetIntegrityError, match="no manifest.json"):
        read_dataset(tmp_path / "ds")


def test_empty_dataset_keeps_its_schema(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", records_table([]), None, config={}, inputs=[], counts={})
    table = read_dataset(tmp_path / "ds")
    assert table.num_rows == 0 and table.schema == RECORD_SCHEMA
