"""One reader per source format -> records in RECORD_SCHEMA (as dicts) plus quarantine rows.

A `ReadSpec` says how to read one file: its format, which fields hold query / positive / negatives /
score / label, which rows to keep (`where`), and the source name and language. Specs come from the
catalog for the shared data and from `sniff_spec` for user files. Line formats are split on b"\\n"
only (some texts contain U+2028 / U+0085) and each line is decoded on its own, so an invalid UTF-8
line is quarantined without losing its neighbours. Large line files are read as several units
(line ranges) so the clean stage can spread them over workers.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conan_core.errors import ConanError
from conan_core.io.conversations import ASSISTANT, ConversationError, conversation_turns, prompt_response_pairs
from conan_core.schema import (
    KIND_CLASSIFICATION,
    KIND_PAIR,
    KIND_RETRIEVAL,
    KIND_STS,
    make_quarantine_row,
    make_record,
)

LINE_FORMATS = ("jsonl", "tsv", "bge", "instruct_jsonl")
WHOLE_FORMATS = ("csv", "json_array", "instruct_json", "beir")
FORMATS = LINE_FORMATS + WHOLE_FORMATS
Field = str | int  # a JSON key or a 0-based column index


class ReaderError(ConanError):
    """A file cannot be read at all (missing, unknown format)."""


@dataclass(frozen=True)
class FieldMap:
    """Where the record fields live in a source row, and which rows to keep."""

    kind: str
    query: Field
    positive: Field | None = None
    negatives: Field | None = None  # a list field (BGE `neg`) or one string field (SimCLUE `neg_title`)
    score: Field | None = None
    label: Field | None = None
    label_scores: tuple[tuple[str, float], ...] = ()  # label text -> score (e.g. NLI entailment -> 1.0)
    where: tuple[tuple[Field, tuple[str, ...]], ...] = ()  # keep rows whose field value is one of these


@dataclass(frozen=True)
class ReadSpec:
    format: str
    source: str
    lang: str
    fields: FieldMap | None = None
    header: bool = False  # tsv/csv: the first line names the columns (fields may then be names)
    delimiter: str = "\t"


@dataclass(frozen=True)
class ReadUnit:
    """One piece of work: a file (or a BEIR dir) and, for line formats, a line range."""

    path: str
    spec: ReadSpec
    start: int = 0
    stop: int | None = None


@dataclass
class ReadResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0  # rows deselected by the spec's `where` (not bad input, so not quarantined)


class _BadRow(Exception):
    def __init__(self, reason: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial or {}


# ---------------------------------------------------------------- lines and units

def split_lines(data: bytes) -> list[bytes]:
    """Records of a line file: split on b"\\n" only, drop one trailing empty line and any "\\r"."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def plan_units(path: Path, spec: ReadSpec, *, lines_per_unit: int = 20_000) -> list[ReadUnit]:
    """Split a line file into line-range units; whole-file formats are one unit."""
    if not Path(path).exists():
        raise ReaderError(f"{path}: no such file or directory")
    if spec.format not in LINE_FORMATS:
        return [ReadUnit(str(path), spec)]
    total = Path(path).read_bytes().count(b"\n") + 1
    first = 1 if spec.header else 0
    return [ReadUnit(str(path), spec, start, min(start + lines_per_unit, total))
            for start in range(first, max(total, first + 1), lines_per_unit)]


# ---------------------------------------------------------------- field extraction

def _get(row: dict | list, key: Field | None) -> Any:
    if key is None:
        return None
    if isinstance(row, dict):
        return row.get(key)  # type: ignore[arg-type]
    return row[key] if isinstance(key, int) and key < len(row) else None


def _text(row: dict | list, key: Field | None, *, required: bool) -> str:
    value = _get(row, key)
    if value is None:
        if required:
            raise _BadRow("missing_field")
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _BadRow("wrong_type")
    return value


def _score(value: Any) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise _BadRow("invalid_score") from None
    if not math.isfinite(score):
        raise _BadRow("invalid_score")
    return score


def _selected(row: dict | list, fields: FieldMap) -> bool:
    return all(str(_get(row, key)) in values for key, values in fields.where)


def record_from_row(row: dict | list, spec: ReadSpec) -> dict[str, Any]:
    """Map one parsed source row to a record (raises _BadRow with the quarantine reason)."""
    fields = spec.fields
    assert fields is not None
    query = _text(row, fields.query, required=True)
    needs_positive = fields.kind in (KIND_PAIR, KIND_RETRIEVAL, KIND_STS)
    positive = _text(row, fields.positive, required=needs_positive) if fields.positive is not None else ""
    partial = {"kind": fields.kind, "query": query, "positive": positive, "lang": spec.lang}
    negatives: list[str] = []
    if fields.negatives is not None:
        raw_negatives = _get(row, fields.negatives)
        raw_negatives = [raw_negatives] if isinstance(raw_negatives, str) else raw_negatives or []
        if not isinstance(raw_negatives, list) or not all(isinstance(n, str) for n in raw_negatives):
            raise _BadRow("wrong_type", partial)
        negatives = raw_negatives
    label = _text(row, fields.label, required=True) if fields.label is not None else None
    score = None
    if fields.score is not None:
        try:
            score = _score(_get(row, fields.score))
        except _BadRow as bad:
            raise _BadRow(bad.reason, partial) from None
    elif fields.label_scores:
        mapping = dict(fields.label_scores)
        if label not in mapping:
            raise _BadRow("invalid_label", {**partial, "label": label})
        score = mapping[label]
    kind = fields.kind
    if kind == KIND_RETRIEVAL and not negatives:
        kind = KIND_PAIR  # a BGE row without negatives is a plain pair
    return make_record(kind=kind, query=query, positive=positive, negatives=negatives, score=score,
                       label=label, source=spec.source, lang=spec.lang)


# ---------------------------------------------------------------- per-format row parsing

def _parse_json_line(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise _BadRow("malformed_json") from None


def _tsv_row(text: str, spec: ReadSpec, header: list[str] | None) -> dict | list:
    cells = text.split(spec.delimiter)
    if header is None:
        return cells
    if len(cells) != len(header):
        raise _BadRow("malformed_row")
    return dict(zip(header, cells, strict=True))


def _bge_records(obj: Any, spec: ReadSpec) -> list[dict[str, Any]]:
    if not isinstance(obj, dict):
        raise _BadRow("malformed_record")
    positives = obj.get("pos")
    if isinstance(positives, str):
        positives = [positives]
    if not isinstance(positives, list) or not positives:
        raise _BadRow("missing_field", {"query": obj.get("query") if isinstance(obj.get("query"), str) else None})
    fields = FieldMap(kind=KIND_RETRIEVAL, query="query", positive="_pos", negatives="neg")
    one = ReadSpec(spec.format, spec.source, spec.lang, fields)
    return [record_from_row({**obj, "_pos": positive}, one) for positive in positives]


def instruct_records(obj: Any, spec: ReadSpec) -> list[dict[str, Any]]:
    """Pairs (user turn -> assistant turn) of one chat record, without extraction filters."""
    try:
        turns = conversation_turns(obj)
    except ConversationError as err:
        raise _BadRow(err.reason) from None
    records = []
    for prompt, answer, _context in prompt_response_pairs(turns):
        if prompt is None or answer.text is None or answer.role != ASSISTANT:
            continue
        records.append(make_record(kind=KIND_PAIR, query=prompt, positive=answer.text,
                                   source=spec.source, lang=spec.lang))
    if not records:
        raise _BadRow("no_pairs")
    return records


def _records_from_object(obj: Any, spec: ReadSpec, result: ReadResult) -> list[dict[str, Any]]:
    if spec.format == "bge":
        return _bge_records(obj, spec)
    if spec.format in ("instruct_jsonl", "instruct_json"):
        return instruct_records(obj, spec)
    assert spec.fields is not None
    if not isinstance(obj, dict | list):
        raise _BadRow("malformed_record")
    if not _selected(obj, spec.fields):
        result.skipped += 1
        return []
    return [record_from_row(obj, spec)]


def _add(result: ReadResult, spec: ReadSpec, raw: str, parse: Any) -> None:
    try:
        result.records.extend(parse())
    except _BadRow as bad:
        result.quarantine.append(make_quarantine_row(source=spec.source, reason=bad.reason, raw=raw,
                                                     record=bad.partial))


def _read_line_unit(unit: ReadUnit, result: ReadResult) -> None:
    spec = unit.spec
    lines = split_lines(Path(unit.path).read_bytes())
    header = None
    if spec.format == "tsv" and spec.header:
        header = lines[0].decode("utf-8-sig", errors="replace").split(spec.delimiter) if lines else []
    for line in lines[unit.start:unit.stop]:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            result.quarantine.append(make_quarantine_row(source=spec.source, reason="invalid_utf8",
                                                         raw=line.decode("utf-8", errors="replace")))
            continue
        if not text.strip():
            continue  # blank lines separate nothing and hold nothing
        if spec.format == "tsv":
            _add(result, spec, text, lambda t=text: _records_from_object(_tsv_row(t, spec, header), spec, result))
        else:
            _add(result, spec, text, lambda t=text: _records_from_object(_parse_json_line(t), spec, result))


def _decode_whole(path: Path, spec: ReadSpec, result: ReadResult) -> str | None:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        result.quarantine.append(make_quarantine_row(source=spec.source, reason="invalid_utf8",
                                                     raw=f"{path}: {err}"))
        return None


def _read_csv(unit: ReadUnit, result: ReadResult) -> None:
    spec = unit.spec
    text = _decode_whole(Path(unit.path), spec, result)
    if text is None:
        return
    rows = csv.reader(text.split("\n"), delimiter=spec.delimiter)
    header = next(rows, None) if spec.header else None
    for cells in rows:
        if not cells:
            continue
        raw = spec.delimiter.join(cells)
        if header is not None and len(cells) != len(header):
            result.quarantine.append(make_quarantine_row(source=spec.source, reason="malformed_row", raw=raw))
            continue
        row = dict(zip(header, cells, strict=True)) if header is not None else cells
        _add(result, spec, raw, lambda r=row: _records_from_object(r, spec, result))


def _read_json_array(unit: ReadUnit, result: ReadResult) -> None:
    spec = unit.spec
    text = _decode_whole(Path(unit.path), spec, result)
    if text is None:
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        result.quarantine.append(make_quarantine_row(source=spec.source, reason="malformed_json",
                                                     raw=f"{unit.path}: {err}"))
        return
    if not isinstance(items, list):
        items = [items]
    for item in items:
        raw = json.dumps(item, ensure_ascii=False)
        _add(result, spec, raw, lambda i=item: _records_from_object(i, spec, result))


def _read_beir(unit: ReadUnit, result: ReadResult) -> None:
    """BEIR dir: corpus.jsonl + queries.jsonl + qrels/*.tsv -> one retrieval pair per relevant doc."""
    spec, root = unit.spec, Path(unit.path)
    docs: dict[str, str] = {}
    queries: dict[str, str] = {}
    for name, target in (("corpus.jsonl", docs), ("queries.jsonl", queries)):
        for line in split_lines((root / name).read_bytes()):
            try:
                obj = json.loads(line.decode("utf-8"))
                title = obj.get("title") or ""
                target[str(obj["_id"])] = f"{title} {obj['text']}".strip() if title else obj["text"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                result.quarantine.append(make_quarantine_row(source=spec.source, reason="malformed_json",
                                                             raw=line.decode("utf-8", errors="replace")))
    for qrels in sorted((root / "qrels").glob("*.tsv")):
        for line in split_lines(qrels.read_bytes()):
            cells = line.decode("utf-8", errors="replace").split("\t")
            if len(cells) < 3 or cells[0] == "query-id":
                continue
            raw = "\t".join(cells)
            try:
                relevant = _score(cells[2]) > 0
            except _BadRow:
                result.quarantine.append(make_quarantine_row(source=spec.source, reason="invalid_score", raw=raw))
                continue
            if not relevant:
                result.skipped += 1
            elif cells[0] not in queries or cells[1] not in docs:
                result.quarantine.append(make_quarantine_row(source=spec.source, reason="missing_field", raw=raw))
            else:
                result.records.append(make_record(kind=KIND_PAIR, query=queries[cells[0]], positive=docs[cells[1]],
                                                  source=spec.source, lang=spec.lang))


def read_unit(unit: ReadUnit) -> ReadResult:
    """Read one unit; bad rows become quarantine rows, never exceptions."""
    result = ReadResult()
    fmt = unit.spec.format
    if fmt not in FORMATS:
        raise ReaderError(f"{unit.path}: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    if fmt in LINE_FORMATS:
        _read_line_unit(unit, result)
    elif fmt == "csv":
        _read_csv(unit, result)
    elif fmt == "beir":
        _read_beir(unit, result)
    else:
        _read_json_array(unit, result)
    return result


def read_file(path: Path, spec: ReadSpec | None = None) -> ReadResult:
    """Every unit of one file, in order (spec: from the catalog, else sniffed)."""
    from conan_core.io.catalog import spec_for_path

    spec = spec or spec_for_path(Path(path))
    total = ReadResult()
    for unit in plan_units(Path(path), spec):
        part = read_unit(unit)
        total.records += part.records
        total.quarantine += part.quarantine
        total.skipped += part.skipped
    return total


# ---------------------------------------------------------------- sniffing user files

def _first_json_object(path: Path) -> Any:
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    stripped = head.lstrip()
    if stripped.startswith(b"["):
        return [None]  # a JSON array: the whole-file reader decides per item
    for line in split_lines(head):
        if line.strip():
            try:
                return json.loads(line.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                continue
    return None


def _sniff_json(path: Path, source: str, lang: str) -> ReadSpec:
    first = _first_json_object(path)
    if first == [None]:
        return ReadSpec("instruct_json", source, lang)
    if not isinstance(first, dict):
        raise ReaderError(f"{path}: cannot tell the format (first record is not a JSON object)")
    keys = set(first)
    if {"query", "pos"} <= keys:
        return ReadSpec("bge", source, lang)
    if keys & {"instruction", "conversations", "messages"}:
        return ReadSpec("instruct_jsonl", source, lang)
    for a, b in (("sentence1", "sentence2"), ("text1", "text2"), ("query", "title")):
        if {a, b} <= keys:
            score = "score" if "score" in keys else "label" if "label" in keys else None
            kind = KIND_STS if score else KIND_PAIR
            return ReadSpec("jsonl", source, lang, FieldMap(kind=kind, query=a, positive=b, score=score))
    for text_key in ("sentence", "text", "content"):
        if text_key in keys and "label" in keys:
            return ReadSpec("jsonl", source, lang, FieldMap(kind=KIND_CLASSIFICATION, query=text_key, label="label"))
    raise ReaderError(f"{path}: cannot tell the format from keys {sorted(keys)[:8]}")


def _sniff_table(path: Path, source: str, lang: str, delimiter: str) -> ReadSpec:
    with open(path, "rb") as handle:
        first = split_lines(handle.read(1 << 16))[:1]
    cells = first[0].decode("utf-8-sig", errors="replace").split(delimiter) if first else []
    fmt = "csv" if delimiter == "," else "tsv"
    if len(cells) == 2:
        return ReadSpec(fmt, source, lang, FieldMap(kind=KIND_PAIR, query=0, positive=1), delimiter=delimiter)
    if len(cells) == 3:
        return ReadSpec(fmt, source, lang, FieldMap(kind=KIND_STS, query=0, positive=1, score=2),
                        delimiter=delimiter)
    raise ReaderError(f"{path}: cannot tell the columns of a {len(cells)}-column file; expected "
                      "text1<TAB>text2[<TAB>score]")


def sniff_spec(path: Path, *, source: str | None = None, lang: str = "auto") -> ReadSpec:
    """A ReadSpec for a user file, guessed from its extension and first record (lang "auto": detected)."""
    path = Path(path)
    source = source or path.stem
    if path.is_dir():
        if (path / "corpus.jsonl").exists() and (path / "queries.jsonl").exists():
            return ReadSpec("beir", source, lang)
        raise ReaderError(f"{path}: a directory input must be a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    if not path.exists():
        raise ReaderError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _sniff_json(path, source, lang)
    if suffix in (".tsv", ".txt", ".data"):
        return _sniff_table(path, source, lang, "\t")
    if suffix == ".csv":
        return _sniff_table(path, source, lang, ",")
    raise ReaderError(f"{path}: unknown file type {suffix!r} (jsonl, json, tsv, txt, csv, or a BEIR dir)")
