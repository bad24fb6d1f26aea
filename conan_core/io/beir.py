"""The BEIR folder format, defined once for the two readers of it.

A BEIR folder holds `corpus.jsonl` and `queries.jsonl` (one JSON object a line: `_id`, `text`, an
optional `title`) and `qrels/<split>.tsv` (`query-id<TAB>corpus-id<TAB>score`, an optional header line;
a score > 0 means relevant). This module says what a valid row is and how a title joins its text;
it never decides what to do with a bad row, because the two callers want opposite things:

- `conan_core.io.readers` (ingest, `conan clean`): a bad row becomes a quarantine row and the rest of
  the folder still comes through; every qrels/*.tsv is read, one training pair per relevant judgement.
- `conan_core.eval.taskdir` (`conan eval`): the first bad row is a one-line `TaskDataError` naming the
  file and line; only qrels/{split}.tsv is read, and the corpus keeps (title, text) apart because mteb
  joins them itself, with the same rule as `joined_text`.

The row functions raise `BeirRowError`, whose message is the problem in the words of the eval error
(`missing "_id"`), so eval only adds the file and line; ingest maps it to its quarantine reason.
They take the parsed JSON object: splitting and decoding lines stays with each caller (ingest splits
bytes on b"\\n" and quarantines one undecodable line; eval rejects a file that is not UTF-8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"
QREL_COLUMNS = ("query-id", "corpus-id", "score")


class BeirRowError(ValueError):
    """One row of a BEIR file breaks the format; the message names the problem, not the file or line."""


@dataclass(frozen=True)
class IdText:
    """One corpus or query record: its id, its title ("" when it has none) and its text."""

    id: str
    title: str
    text: str


# ---- corpus.jsonl / queries.jsonl ---------------------------------------------------------------------
def record_id(record: dict[str, Any]) -> str:
    """`_id` as a string: a non-empty string or an integer (qrels name ids as text, so 7 is "7")."""
    raw_id = record.get("_id")
    if not isinstance(raw_id, str | int) or str(raw_id) == "":
        raise BeirRowError('missing "_id"')
    return str(raw_id)


def record_text(record: dict[str, Any]) -> str:
    """`text`, which must be a string (possibly empty: whether an empty text is an error is the caller's call)."""
    text = record.get("text")
    if not isinstance(text, str):
        raise BeirRowError('empty or missing "text"')  # never str() a number or list into a text
    return text


def record_title(record: dict[str, Any]) -> str:
    """`title`, "" when absent, null or empty; any other non-string is an error."""
    title = record.get("title") or ""
    if not isinstance(title, str):
        raise BeirRowError('"title" is not a string')
    return title


def parse_record(record: Any) -> IdText:
    """A corpus or query line's JSON value as an IdText (BeirRowError when it is not a valid record)."""
    if not isinstance(record, dict):
        raise BeirRowError("is not a JSON object")
    return IdText(record_id(record), record_title(record), record_text(record))


def joined_text(title: str, text: str) -> str:
    """The text a model reads for a titled record: BEIR's (and mteb's) `f"{title} {text}"`, stripped.

    Without a title the text is returned as it is (not stripped), as mteb does.
    """
    return f"{title} {text}".strip() if title else text


# ---- qrels/*.tsv -----------------------------------------------------------------------------------------
def qrels_path(folder: Path, split: str) -> Path:
    """The judgements of one split: qrels/{split}.tsv."""
    return Path(folder) / QRELS_DIR / f"{split}.tsv"


def all_qrels_paths(folder: Path) -> list[Path]:
    """The judgements of every split, qrels/*.tsv, in name order."""
    return sorted((Path(folder) / QRELS_DIR).glob("*.tsv"))


def is_qrel_header(cells: list[str]) -> bool:
    """Whether a qrels row is the header line (its first cell is `query-id`)."""
    return bool(cells) and cells[0] == QREL_COLUMNS[0]


def qrel_score(value: str) -> float:
    """A judgement's score cell as a finite number."""
    try:
        score = float(value)
    except ValueError:
        raise BeirRowError(f"score {value!r} is not a number") from None
    if not math.isfinite(score):
        raise BeirRowError(f"score {value!r} is not a finite number")
    return score


def is_relevant(score: float) -> bool:
    """BEIR's relevance rule: a judged document is relevant when its score is above 0."""
    return score > 0
