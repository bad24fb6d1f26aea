"""Line-level readers for evaluation data, shared by the built-in tasks and task folders.

Every problem is a `TaskDataError` naming the file (and line) and the problem in one line. Records are
split on "\\n" only: some shared texts contain U+2028 / U+0085, which `str.splitlines()` would break on.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conan_core.errors import ConanError


class TaskDataError(ConanError):
    """A task's data file is missing or malformed (the message names the file and the problem)."""


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (a trailing "\\r" is dropped)."""
    if not path.is_file():
        raise TaskDataError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TaskDataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return [line for line in lines if line.strip()]


def read_tsv(path: Path, n_fields: int) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a header-less TSV whose rows all have `n_fields` fields."""
    for number, line in enumerate(read_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) != n_fields:
            raise TaskDataError(f"{path}: line {number} has {len(fields)} tab-separated fields, expected {n_fields}")
        yield number, fields


def read_tsv_with_header(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: value}) of a TSV whose header holds at least `columns` (other columns ignored)."""
    lines = read_lines(path)
    if not lines:
        raise TaskDataError(f"{path}: empty file (expected a header {'<TAB>'.join(columns)})")
    header = lines[0].lstrip("\ufeff").split("\t")
    missing = [c for c in columns if c not in header]
    if missing:
        raise TaskDataError(f"{path}: header {header} lacks column(s) {missing} "
                            f"(expected {'<TAB>'.join(columns)})")
    positions = {c: header.index(c) for c in columns}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise TaskDataError(f"{path}: line {number} has {len(fields)} tab-separated fields, "
                                f"the header has {len(header)}")
        yield number, {c: fields[i] for c, i in positions.items()}


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSON-lines file; every line must be a JSON object."""
    for number, line in enumerate(read_lines(path), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskDataError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise TaskDataError(f"{path}: line {number} is not a JSON object")
        yield number, record


def read_csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(row number, {column: value}) of a comma-separated file with a header (quoted fields allowed)."""
    if not path.is_file():
        raise TaskDataError(f"{path}: file not found")
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise TaskDataError(f"{path}: header lacks column(s) {missing}")
    for number, row in enumerate(reader, start=2):
        yield number, {c: row[c] or "" for c in columns}


def parse_float(path: Path, number: int, value: str, what: str = "score") -> float:
    try:
        score = float(value)
    except ValueError:
        raise TaskDataError(f"{path}: line {number}: {what} {value!r} is not a number") from None
    if score != score or score in (float("inf"), float("-inf")):
        raise TaskDataError(f"{path}: line {number}: {what} {value!r} is not a finite number")
    return score


def require_text(path: Path, number: int, value: Any, what: str) -> str:
    """`value` as a non-empty string, or an error naming the line."""
    if not isinstance(value, str) or not value.strip():
        raise TaskDataError(f"{path}: line {number}: empty or missing {what}")
    return value
