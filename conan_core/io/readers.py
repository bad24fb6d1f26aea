"""One reader per source format -> records in RECORD_SCHEMA (as dicts) plus quarantine rows.

A `ReadSpec` says how to read one file: its format, which fields hold query / positive / negatives /
score / label, which rows to keep (`where`), and the source name and language. Specs come from the
catalog for the shared data and from `sniff_spec` for user files. Line formats are split on b"\\n"
only (some texts contain U+2028 / U+0085) and each line is decoded on its own, so an invalid UTF-8
line is quarantined without losing its neighbours. Large line files are read as several units
(line ranges) so the clean stage can spread them over workers.

Nothing is guessed. A row that does not fit its spec is quarantined with its reason, never repaired,
and the other rows of the file still come through:

- Text fields (query, positive, each negative) must be strings: a number, list, object or boolean
  there is `wrong_type` (`"pos": [123]` is not read as "123"). A label may be a string or a JSON
  integer (read as its decimal text, `1` -> "1"); a score a number or a numeric string.
- List fields must be lists: BGE `pos` / `neg` given as one string is `wrong_type` (not wrapped).
  Only a catalogued field declared `single_negative` (SimCLUE `neg_title`) holds one string.
- Uncatalogued (sniffed) TSV / CSV: the first data row fixes the column count (2: text1, text2;
  3: text1, text2, score) and every row must have exactly that many cells, else `malformed_row`
  (`a<TAB>b<TAB>0.3<TAB>extra` in a 3-column file is not cut to a scored pair). The first row is a
  header, quarantined as `header` (counted, not read), when every cell is a known column name
  (HEADER_NAMES: query, pos, sentence1, label, score, ...) or, in a 3-column file, when its third
  cell is not a number while the next row's is.
- Catalogued files name their columns (by index or header name) and may have more columns than
  they use; a header-named row with another cell count is `malformed_row`.
- A user file is sniffed from its first non-blank line that is valid UTF-8, read whole however long
  it is (invalid lines before it are quarantined `invalid_utf8` when the file is read). A file with
  no such line among its first 1000 non-blank ones, or that starts with a UTF-16 byte-order mark, is
  rejected with an error naming the encoding problem. A file that cannot be opened or read
  (permissions, a directory where a file belongs) is a ReaderError naming the path, not a traceback.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conan_core.errors import ConanError
from conan_core.io import beir
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
    """A file cannot be read at all (missing, unreadable, not UTF-8, unknown format)."""


def _unreadable(path: Path | str, err: OSError) -> ReaderError:
    what = err.strerror or type(err).__name__
    return ReaderError(f"{path}: cannot read ({what})")


def _read_bytes(path: Path | str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise _unreadable(path, err) from None


@dataclass(frozen=True)
class FieldMap:
    """Where the record fields live in a source row, and which rows to keep."""

    kind: str
    query: Field
    positive: Field | None = None
    negatives: Field | None = None  # a list-of-strings field (BGE `neg`), or see single_negative
    score: Field | None = None
    label: Field | None = None
    label_scores: tuple[tuple[str, float], ...] = ()  # label text -> score (e.g. NLI entailment -> 1.0)
    where: tuple[tuple[Field, tuple[str, ...]], ...] = ()  # keep rows whose field value is one of these
    single_negative: bool = False  # `negatives` names one string field (SimCLUE `neg_title`), not a list


@dataclass(frozen=True)
class ReadSpec:
    format: str
    source: str
    lang: str
    fields: FieldMap | None = None
    header: bool = False  # tsv/csv: the first line names the columns (fields may then be names)
    delimiter: str = "\t"
    columns: int | None = None  # tsv/csv without header: every row must have exactly this many cells
    header_line: int | None = None  # tsv/csv: this line (0-based) is a header row, quarantined as `header`


@dataclass(frozen=True)
class ReadUnit:
    """One piece of work: a file (or a BEIR dir) and, for line formats, a line range."""

    path: str
    spec: ReadSpec
    start: int = 0
    stop: int | None = None
    # Byte range of lines [start, stop) when plan_units knows it, so a unit reads only its own lines
    # (None: read the whole file and take the line range).
    byte_range: tuple[int, int] | None = None


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


def plan_units(path: Path, spec: ReadSpec, *, lines_per_unit: int = 5_000) -> list[ReadUnit]:
    """Split a line file into line-range units; whole-file formats are one unit."""
    if not Path(path).exists():
        raise ReaderError(f"{path}: no such file or directory")
    if spec.format == "beir":
        _check_beir_readable(Path(path))
    if spec.format not in LINE_FORMATS:
        if spec.format != "beir":
            _check_readable(Path(path))  # fail here, in the driver, not inside a worker
        return [ReadUnit(str(path), spec)]
    data = _read_bytes(path)
    # where each line starts (line i after the i-th b"\n"), and one past the end
    line_starts = np.concatenate([[0], np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A) + 1,
                                  [len(data)]])
    total = len(line_starts) - 1  # = count(b"\n") + 1, the last line possibly empty
    first = 1 if spec.header else 0
    units = []
    for start in range(first, max(total, first + 1), lines_per_unit):
        stop = min(start + lines_per_unit, total)
        units.append(ReadUnit(str(path), spec, start, stop,
                              (int(line_starts[min(start, total)]), int(line_starts[stop]))))
    return units


def unit_lines(unit: ReadUnit) -> list[bytes]:
    """Lines [start, stop) of a line-format unit (split as split_lines does)."""
    if unit.byte_range is None:
        return split_lines(_read_bytes(unit.path))[unit.start:unit.stop]
    begin, end = unit.byte_range
    try:
        with open(unit.path, "rb") as handle:
            handle.seek(begin)
            return split_lines(handle.read(end - begin))
    except OSError as err:
        raise _unreadable(unit.path, err) from None


def _first_line(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.readline().removesuffix(b"\n").removesuffix(b"\r")
    except OSError as err:
        raise _unreadable(path, err) from None


def _check_readable(path: Path) -> None:
    """ReaderError unless `path` is a regular file this process can open for reading."""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as err:
        raise _unreadable(path, err) from None


def _check_beir_readable(root: Path) -> None:
    for name in (beir.CORPUS_FILE, beir.QUERIES_FILE):
        _check_readable(root / name)
    qrels = root / beir.QRELS_DIR
    if not qrels.is_dir():
        raise ReaderError(f"{qrels}: a BEIR folder needs a qrels/ directory")
    for file in beir.all_qrels_paths(root):
        _check_readable(file)


# ---------------------------------------------------------------- field extraction

def _get(row: dict | list, key: Field | None) -> Any:
    if key is None:
        return None
    if isinstance(row, dict):
        return row.get(key)  # type: ignore[arg-type]
    return row[key] if isinstance(key, int) and key < len(row) else None


def _text(row: dict | list, key: Field | None, *, required: bool, integer_ok: bool = False) -> str:
    """A string field; with integer_ok (labels) a JSON integer is read as its decimal text."""
    value = _get(row, key)
    if value is None:
        if required:
            raise _BadRow("missing_field")
        return ""
    if integer_ok and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _BadRow("wrong_type")  # never str() a number, list or object into a text
    return value


def _score(value: Any) -> float:
    if isinstance(value, bool):
        raise _BadRow("invalid_score")
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
        if raw_negatives is None:
            raw_negatives = []
        elif fields.single_negative:
            if not isinstance(raw_negatives, str):
                raise _BadRow("wrong_type", partial)
            raw_negatives = [raw_negatives]
        if not isinstance(raw_negatives, list) or not all(isinstance(n, str) for n in raw_negatives):
            raise _BadRow("wrong_type", partial)  # a string where a list belongs is not wrapped
        negatives = raw_negatives
    try:
        label = _text(row, fields.label, required=True, integer_ok=True) if fields.label is not None else None
    except _BadRow as bad:
        raise _BadRow(bad.reason, partial) from None
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
        if spec.columns is not None and len(cells) != spec.columns:
            raise _BadRow("malformed_row")  # extra or missing cells: never cut to fit
        return cells
    if len(cells) != len(header):
        raise _BadRow("malformed_row")
    return dict(zip(header, cells, strict=True))


def _bge_records(obj: Any, spec: ReadSpec) -> list[dict[str, Any]]:
    if not isinstance(obj, dict):
        raise _BadRow("malformed_record")
    positives = obj.get("pos")
    partial = {"query": obj.get("query") if isinstance(obj.get("query"), str) else None}
    if positives is not None and not isinstance(positives, list):
        raise _BadRow("wrong_type", partial)  # `pos` is a list of strings; one string is not wrapped
    if not positives:
        raise _BadRow("missing_field", partial)
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
    header = None
    if spec.format == "tsv" and spec.header:
        header = _first_line(unit.path).decode("utf-8-sig", errors="replace").split(spec.delimiter)
    for index, line in enumerate(unit_lines(unit), start=unit.start):
        if index == spec.header_line:
            result.quarantine.append(make_quarantine_row(source=spec.source, reason="header",
                                                         raw=line.decode("utf-8-sig", errors="replace")))
            continue
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
    data = _read_bytes(path)
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
    expected = len(header) if header is not None else spec.columns
    line = rows.line_num  # the source line the next row starts on
    for cells in rows:
        start, line = line, rows.line_num
        if not cells:
            continue
        raw = spec.delimiter.join(cells)
        if start == spec.header_line:
            result.quarantine.append(make_quarantine_row(source=spec.source, reason="header", raw=raw))
            continue
        if expected is not None and len(cells) != expected:
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
    """BEIR dir: corpus.jsonl + queries.jsonl + qrels/*.tsv -> one retrieval pair per relevant doc.

    The format is conan_core.io.beir's; this reader's policy differs from eval's (conan_core.eval.taskdir)
    on purpose: every split's qrels file is read (all judgements are training pairs), a bad line is
    quarantined instead of failing the folder, and queries get their title joined like documents do.
    """
    spec, root = unit.spec, Path(unit.path)
    docs = _beir_texts(root / beir.CORPUS_FILE, spec, result)
    queries = _beir_texts(root / beir.QUERIES_FILE, spec, result)
    for qrels in beir.all_qrels_paths(root):
        for line in split_lines(_read_bytes(qrels)):
            _add_beir_judgement(line.decode("utf-8", errors="replace").split("\t"), docs, queries, spec, result)


def _beir_texts(path: Path, spec: ReadSpec, result: ReadResult) -> dict[str, str]:
    """`_id` -> text (title joined) of a BEIR jsonl file; a line that is not a valid record is quarantined."""
    texts: dict[str, str] = {}
    for line in split_lines(_read_bytes(path)):
        try:
            record = beir.parse_record(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, beir.BeirRowError):
            # a blank line is malformed_json too (json.loads("") fails); eval skips blank lines
            result.quarantine.append(make_quarantine_row(source=spec.source, reason="malformed_json",
                                                         raw=line.decode("utf-8", errors="replace")))
            continue
        # An empty text is kept (the clean stage's filters drop it) and a repeated _id replaces the earlier
        # line; eval rejects both (or skips empty texts for the shared data).
        texts[record.id] = beir.joined_text(record.title, record.text)
    return texts


def _add_beir_judgement(cells: list[str], docs: dict[str, str], queries: dict[str, str], spec: ReadSpec,
                        result: ReadResult) -> None:
    """One qrels row -> a pair (relevant), a skip (not relevant) or a quarantine row (bad score, unknown id)."""
    # Positional columns; a header line anywhere (concatenated files) and a short row are passed over, not
    # quarantined, and cells past the third are ignored. Eval reads the header's column order and fails there.
    if len(cells) < 3 or beir.is_qrel_header(cells):
        return
    raw = "\t".join(cells)
    try:
        relevant = beir.is_relevant(beir.qrel_score(cells[2]))
    except beir.BeirRowError:
        result.quarantine.append(make_quarantine_row(source=spec.source, reason="invalid_score", raw=raw))
        return
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


# ---------------------------------------------------------------- sniffing user files

# Cell values (stripped, lower-cased) that make a sniffed table's first row a header row.
HEADER_NAMES = frozenset({
    "query", "pos", "neg", "positive", "negative", "negatives", "anchor", "text", "text1", "text2", "text_a",
    "text_b", "sentence", "sentence1", "sentence2", "sentence_a", "sentence_b", "title", "question", "answer",
    "passage", "document", "label", "score", "similarity", "relatedness_score",
})
_SNIFF_MAX_LINES = 1000  # non-blank lines a sniffer looks through for its first usable one
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _non_blank_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(index, line) of the non-blank lines, indexed as split_lines does; each line read whole, any length."""
    try:
        with open(path, "rb") as handle:
            for index, line in enumerate(handle):  # a binary file iterates on b"\n" only
                line = line.removesuffix(b"\n").removesuffix(b"\r")
                if line.strip():
                    yield index, line
    except OSError as err:
        raise _unreadable(path, err) from None


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(index, text) of the first non-blank lines that are valid UTF-8 (a BOM dropped). Raises ReaderError
    naming the encoding problem when none of the first _SNIFF_MAX_LINES non-blank lines decodes."""
    first_bad: tuple[int, bytes, UnicodeDecodeError] | None = None
    looked = found = 0
    for index, line in _non_blank_lines(path):
        if index == 0 and line.startswith(_UTF16_BOMS):
            raise ReaderError(f"{path}: not UTF-8 text (starts with a UTF-16 byte-order mark); "
                              "re-encode the file as UTF-8")
        try:
            text = line.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            first_bad = first_bad or (index, line, err)
            looked += 1
            if looked >= _SNIFF_MAX_LINES:
                break
            continue
        yield index, text
        looked += 1
        found += 1
        if looked >= _SNIFF_MAX_LINES:
            return
    if found:
        return
    if first_bad is None:
        raise ReaderError(f"{path}: empty file (no non-blank line)")
    index, line, err = first_bad
    raise ReaderError(f"{path}: not UTF-8 text: none of its first {looked} non-blank line(s) is valid UTF-8 "
                      f"(line {index + 1}: byte 0x{line[err.start]:02x} at offset {err.start}); "
                      "re-encode the file as UTF-8")


def _first_byte(path: Path) -> bytes:
    """The file's first non-whitespace byte (after a UTF-8 BOM), or b"" for an empty file."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(3)
            if not head.startswith(b"\xef\xbb\xbf"):
                handle.seek(0)
            while chunk := handle.read(1 << 16):
                stripped = chunk.lstrip()
                if stripped:
                    return stripped[:1]
    except OSError as err:
        raise _unreadable(path, err) from None
    return b""


def _first_json_object(path: Path) -> Any:
    if _first_byte(path) == b"[":
        return [None]  # a JSON array: the whole-file reader decides per item
    for _index, text in _text_lines(path):
        try:
            return json.loads(text)
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


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _is_header(cells: list[str], next_cells: list[str] | None) -> bool:
    """The HEADER_NAMES rule, or (3 columns) a non-numeric score cell above a numeric one."""
    if all(cell.strip().lower() in HEADER_NAMES for cell in cells):
        return True
    return (len(cells) == 3 and next_cells is not None and len(next_cells) == 3
            and not _is_number(cells[2]) and _is_number(next_cells[2]))


def _sniff_table(path: Path, source: str, lang: str, delimiter: str) -> ReadSpec:
    fmt = "csv" if delimiter == "," else "tsv"

    def split(text: str) -> list[str]:
        return next(csv.reader([text], delimiter=delimiter), []) if fmt == "csv" else text.split(delimiter)

    lines = list(itertools.islice(_text_lines(path), 2))
    if not lines:
        raise ReaderError(f"{path}: no readable line")
    cells = split(lines[0][1])
    header_line = lines[0][0] if _is_header(cells, split(lines[1][1]) if len(lines) > 1 else None) else None
    if len(cells) == 2:
        fields = FieldMap(kind=KIND_PAIR, query=0, positive=1)
    elif len(cells) == 3:
        fields = FieldMap(kind=KIND_STS, query=0, positive=1, score=2)
    else:
        sep = "<TAB>" if fmt == "tsv" else ","
        raise ReaderError(f"{path}: cannot tell the columns of a {len(cells)}-column file; expected "
                          f"text1{sep}text2[{sep}score]")
    return ReadSpec(fmt, source, lang, fields, delimiter=delimiter, columns=len(cells), header_line=header_line)


def sniff_spec(path: Path, *, source: str | None = None, lang: str = "auto") -> ReadSpec:
    """A ReadSpec for a user file, guessed from its extension and first record (lang "auto": detected)."""
    path = Path(path)
    source = source or path.stem
    if path.is_dir():
        if (path / beir.CORPUS_FILE).exists() and (path / beir.QUERIES_FILE).exists():
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
