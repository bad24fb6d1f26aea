"""The one record schema every reader produces and every stage consumes (Arrow).

A record is one training example of one of four kinds:

- ``pair``: (query, positive), a weak or supervised positive pair (pretraining, extracted LLM pairs).
- ``retrieval``: (query, positive, negatives), retrieval with (hard) negatives.
- ``sts``: (query=sentence1, positive=sentence2, score), a graded or 0/1 similarity pair.
- ``classification``: (query=text, label), positive empty.

Quarantined rows keep the reason they were dropped and the raw input, plus whatever record columns
were parsed before the problem was found.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from conan_core.errors import ConanError

SCHEMA_VERSION = 1

KIND_PAIR = "pair"
KIND_RETRIEVAL = "retrieval"
KIND_STS = "sts"
KIND_CLASSIFICATION = "classification"
RECORD_KINDS = (KIND_PAIR, KIND_RETRIEVAL, KIND_STS, KIND_CLASSIFICATION)

RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("positive", pa.string(), nullable=False),
        pa.field("negatives", pa.list_(pa.string()), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("label", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("lang", pa.string(), nullable=False),
        pa.field("teacher_score", pa.float64()),
    ]
)
RECORD_COLUMNS = tuple(RECORD_SCHEMA.names)

# Quarantine rows: every record column nullable (parsing may have failed before any was known).
QUARANTINE_SCHEMA = pa.schema(
    [pa.field("source", pa.string()), pa.field("reason", pa.string()), pa.field("raw", pa.string())]
    + [pa.field(f.name, f.type) for f in RECORD_SCHEMA if f.name != "source"]
)
QUARANTINE_COLUMNS = tuple(QUARANTINE_SCHEMA.names)


class SchemaError(ConanError):
    """A table or record does not follow RECORD_SCHEMA."""


def make_record_id(source: str, kind: str, query: str, positive: str = "", negatives: Sequence[str] = (),
                   score: float | None = None, label: str | None = None) -> str:
    """Stable id: sha256 over source and content, so the same example always gets the same id."""
    payload = json.dumps([source, kind, query, positive, list(negatives), score, label],
                         ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def make_record(*, kind: str, query: str, source: str, lang: str, positive: str = "",
                negatives: Sequence[str] = (), score: float | None = None, label: str | None = None,
                teacher_score: float | None = None) -> dict[str, Any]:
    """One record as a plain dict with every RECORD_SCHEMA column; the id is derived from the content."""
    if kind not in RECORD_KINDS:
        raise SchemaError(f"unknown record kind {kind!r} (expected one of {', '.join(RECORD_KINDS)})")
    return {
        "id": make_record_id(source, kind, query, positive, negatives, score, label),
        "kind": kind,
        "query": query,
        "positive": positive,
        "negatives": list(negatives),
        "score": score,
        "label": label,
        "source": source,
        "lang": lang,
        "teacher_score": teacher_score,
    }


def with_new_id(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its id recomputed (after its text was normalised)."""
    out = dict(record)
    out["id"] = make_record_id(out["source"], out["kind"], out["query"], out["positive"], out["negatives"],
                               out["score"], out["label"])
    return out


def make_quarantine_row(*, source: str, reason: str, raw: str | None,
                        record: dict[str, Any] | None = None) -> dict[str, Any]:
    """One quarantine row; `record` (possibly partial) fills the record columns it has."""
    row: dict[str, Any] = {name: None for name in QUARANTINE_COLUMNS}
    if record:
        for name in QUARANTINE_COLUMNS:
            if name in record:
                row[name] = record[name]
    row["source"] = source
    row["reason"] = reason
    row["raw"] = raw
    return row


def records_table(records: Iterable[dict[str, Any]]) -> pa.Table:
    """Arrow table in RECORD_SCHEMA from record dicts (missing nullable columns become null)."""
    rows = list(records)
    columns = {name: [row.get(name) for row in rows] for name in RECORD_COLUMNS}
    columns["negatives"] = [list(value or []) for value in columns["negatives"]]
    try:
        return pa.table(columns, schema=RECORD_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise SchemaError(f"records do not fit RECORD_SCHEMA: {err}") from None


def quarantine_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Arrow table in QUARANTINE_SCHEMA from quarantine row dicts."""
    rows = list(rows)
    columns = {name: [row.get(name) for row in rows] for name in QUARANTINE_COLUMNS}
    return pa.table(columns, schema=QUARANTINE_SCHEMA)


def validate_records(table: pa.Table) -> None:
    """Raise SchemaError unless `table` has exactly RECORD_SCHEMA's columns and types and known kinds."""
    if table.schema.names != list(RECORD_COLUMNS):
        raise SchemaError(f"columns {table.schema.names} differ from RECORD_SCHEMA {list(RECORD_COLUMNS)}")
    for field in RECORD_SCHEMA:
        if table.schema.field(field.name).type != field.type:
            raise SchemaError(f"column {field.name!r} has type {table.schema.field(field.name).type}, "
                              f"expected {field.type}")
    unknown = set(table.column("kind").unique().to_pylist()) - set(RECORD_KINDS)
    if unknown:
        raise SchemaError(f"unknown record kinds {sorted(map(str, unknown))}")
