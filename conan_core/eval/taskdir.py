"""Drop-in task folders (`conan eval --task-dir DIR`), and the BEIR reader the built-in tasks share.

A folder holds `task.json` {"name", "type", "lang", "split"} plus data by type:

- STS, PairClassification: `{split}.tsv` with header `sentence1<TAB>sentence2<TAB>score`
  (pair classification scores are 0/1 labels).
- Retrieval: BEIR layout, `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`),
  `qrels/{split}.tsv` (`query-id<TAB>corpus-id<TAB>score`, with header).
- Reranking: `{split}.jsonl`, one query a line: {"query": str, "positive": [str], "negative": [str]}
  (the MTEB / C-MTEB reranking layout; every listed text is a candidate of that query only).
- Classification: `train.tsv` and `{split}.tsv` with header `text<TAB>label`.
- Clustering: `{split}.tsv` with header `text<TAB>label`.

`load_task_dir` checks task.json at once; `TaskSpec.load()` reads the data and raises a one-line
`TaskDataError` naming the file (and line) of the first problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from conan_core.eval.data import ClassificationData, LabelledTexts, PairData, RetrievalData
from conan_core.eval.readers import (
    TaskDataError,
    parse_float,
    read_jsonl,
    read_lines,
    read_tsv_with_header,
    require_text,
)
from conan_core.eval.spec import LANG_CODES, TASK_TYPES, TaskSpec
from conan_core.io import beir

TASK_FILE = "task.json"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_T = TypeVar("_T")


# ---- pairs, labelled texts --------------------------------------------------------------------------
def read_pairs(path: Path, binary: bool) -> PairData:
    """`sentence1<TAB>sentence2<TAB>score` with header; `binary`: scores must be 0 or 1, both present."""
    data = PairData([], [], [])
    for number, row in read_tsv_with_header(path, ("sentence1", "sentence2", "score")):
        data.sentence1.append(require_text(path, number, row["sentence1"], "sentence1"))
        data.sentence2.append(require_text(path, number, row["sentence2"], "sentence2"))
        score = parse_float(path, number, row["score"])
        if binary and score not in (0.0, 1.0):
            raise TaskDataError(f"{path}: line {number}: pair classification label {row['score']!r} is not 0 or 1")
        data.scores.append(score)
    check_pairs(path, data, binary)
    return data


def check_pairs(path: Path, data: PairData, binary: bool) -> None:
    if not data.scores:
        raise TaskDataError(f"{path}: no pairs")
    if binary and set(data.scores) != {0.0, 1.0}:
        raise TaskDataError(f"{path}: pair classification needs both 0 and 1 labels, found only {set(data.scores)}")
    if len(set(data.scores)) < 2:
        raise TaskDataError(f"{path}: all scores are equal ({data.scores[0]}): no correlation can be measured")


def read_labelled_texts(path: Path) -> LabelledTexts:
    """`text<TAB>label` with header."""
    data = LabelledTexts([], [])
    for number, row in read_tsv_with_header(path, ("text", "label")):
        data.texts.append(require_text(path, number, row["text"], "text"))
        data.labels.append(require_text(path, number, row["label"], "label").strip())
    check_labelled(path, data)
    return data


def check_labelled(path: Path, data: LabelledTexts) -> None:
    if len(set(data.labels)) < 2:
        raise TaskDataError(f"{path}: needs at least 2 different labels, found {len(set(data.labels))}")


def check_classification(train_path: Path, test_path: Path, data: ClassificationData) -> None:
    unseen = sorted(set(data.test.labels) - set(data.train.labels))
    if unseen:
        raise TaskDataError(f"{test_path}: label(s) {unseen[:5]} never occur in {train_path.name}")


# ---- retrieval (BEIR) ---------------------------------------------------------------------------------
# The format is conan_core.io.beir's. Eval's policy (unlike ingest, conan_core.io.readers): the first bad
# row fails the task, a repeated _id is an error, only qrels/{split}.tsv is read, relevance must be an
# integer (mteb scores graded judgements), and a query's title is checked but not used (BEIR queries have
# none; ingest joins it).
def _row(path: Path, number: int, parse: Callable[[Any], _T], value: Any) -> _T:
    """`parse(value)` (a conan_core.io.beir row function); its BeirRowError becomes this line's TaskDataError."""
    try:
        return parse(value)
    except beir.BeirRowError as err:
        raise TaskDataError(f"{path}: line {number}: {err}") from None


def _read_id_texts(path: Path, with_title: bool, skip_empty: bool = False) -> dict[str, Any]:
    """`_id` -> text (or (title, text)); `skip_empty` drops records with an empty text instead of failing."""
    records: dict[str, Any] = {}
    for number, record in read_jsonl(path):
        doc_id = _row(path, number, beir.record_id, record)
        if doc_id in records:
            raise TaskDataError(f"{path}: line {number}: duplicate _id {doc_id!r}")
        if skip_empty and not str(record.get("text") or "").strip():
            continue
        text = require_text(path, number, _row(path, number, beir.record_text, record), "\"text\"")
        title = _row(path, number, beir.record_title, record)
        records[doc_id] = (title, text) if with_title else text
    if not records:
        raise TaskDataError(f"{path}: no records")
    return records


def _qrel_rows(path: Path, require_header: bool) -> list[tuple[int, dict[str, str]]]:
    lines = read_lines(path)
    if lines and beir.is_qrel_header(lines[0].split("\t")):
        return list(read_tsv_with_header(path, beir.QREL_COLUMNS))
    if require_header:
        raise TaskDataError(f"{path}: missing header {'<TAB>'.join(beir.QREL_COLUMNS)}")
    rows = []
    for number, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise TaskDataError(f"{path}: line {number} has {len(fields)} tab-separated fields, expected 3")
        rows.append((number, dict(zip(beir.QREL_COLUMNS, fields, strict=True))))
    return rows


def read_qrels(path: Path, queries: dict[str, str], corpus: dict[str, Any], require_header: bool = True,
               skipped: set[str] = frozenset()) -> dict[str, dict[str, int]]:
    """Judgements; ids in `skipped` (records dropped for an empty text) are passed over."""
    qrels: dict[str, dict[str, int]] = {}
    for number, row in _qrel_rows(path, require_header):
        query_id, doc_id = row["query-id"], row["corpus-id"]
        if query_id in skipped or doc_id in skipped:
            continue
        if query_id not in queries:
            raise TaskDataError(f"{path}: line {number}: query-id {query_id!r} is not in queries.jsonl")
        if doc_id not in corpus:
            raise TaskDataError(f"{path}: line {number}: corpus-id {doc_id!r} is not in corpus.jsonl")
        score = _row(path, number, beir.qrel_score, row["score"])
        if score != int(score):
            raise TaskDataError(f"{path}: line {number}: relevance {row['score']!r} is not an integer")
        qrels.setdefault(query_id, {})[doc_id] = int(score)
    if not any(beir.is_relevant(score) for judged in qrels.values() for score in judged.values()):
        raise TaskDataError(f"{path}: no query has a relevant document (score > 0)")
    return qrels


def read_beir(folder: Path, split: str, strict: bool = True) -> RetrievalData:
    """corpus.jsonl + queries.jsonl + qrels/{split}.tsv; queries without judgements are dropped (as in BEIR).

    `strict=False` (the shared data): the qrels header is optional and records with an empty text are
    dropped with their judgements (CMRC2018 trial has two empty questions).
    """
    corpus_path, queries_path = folder / beir.CORPUS_FILE, folder / beir.QUERIES_FILE
    corpus = _read_id_texts(corpus_path, with_title=True, skip_empty=not strict)
    queries = _read_id_texts(queries_path, with_title=False, skip_empty=not strict)
    skipped = set() if strict else _all_ids(corpus_path) - set(corpus) | (_all_ids(queries_path) - set(queries))
    qrels = read_qrels(beir.qrels_path(folder, split), queries, corpus, require_header=strict, skipped=skipped)
    judged = {q: text for q, text in queries.items() if any(beir.is_relevant(s) for s in qrels.get(q, {}).values())}
    return RetrievalData(corpus, judged, {q: qrels[q] for q in judged})


def _all_ids(path: Path) -> set[str]:
    return {str(record.get("_id")) for _, record in read_jsonl(path)}


def read_reranking(path: Path) -> RetrievalData:
    """`{"query", "positive": [...], "negative": [...]}` lines -> retrieval data with per-query candidates."""
    data = RetrievalData({}, {}, {}, {})
    assert data.top_ranked is not None
    for number, record in read_jsonl(path):
        query_id = f"q{number}"
        data.queries[query_id] = require_text(path, number, record.get("query"), "\"query\"")
        candidates: list[str] = []
        for field, relevance in (("positive", 1), ("negative", 0)):
            texts = record.get(field)
            if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
                raise TaskDataError(f"{path}: line {number}: \"{field}\" must be a list of non-empty strings")
            for j, text in enumerate(texts):
                doc_id = f"{query_id}-{field[0]}{j}"
                data.corpus[doc_id] = ("", text)
                data.qrels.setdefault(query_id, {})[doc_id] = relevance
                candidates.append(doc_id)
        if not record["positive"]:
            raise TaskDataError(f"{path}: line {number}: no positive")
        data.top_ranked[query_id] = candidates
    if not data.queries:
        raise TaskDataError(f"{path}: no queries")
    return data


# ---- the folder ------------------------------------------------------------------------------------------
def _read_task_json(folder: Path) -> dict[str, Any]:
    path = folder / TASK_FILE
    if not folder.is_dir():
        raise TaskDataError(f"{folder}: task folder not found")
    if not path.is_file():
        raise TaskDataError(f"{path}: file not found (a task folder needs task.json)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TaskDataError(f"{path}: not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise TaskDataError(f"{path}: must be a JSON object")
    return meta


def _check_task_json(path: Path, meta: dict[str, Any]) -> tuple[str, str, str, str]:
    unknown = sorted(set(meta) - {"name", "type", "lang", "split", "description"})
    if unknown:
        raise TaskDataError(f"{path}: unknown key(s) {unknown} (allowed: name, type, lang, split, description)")
    name, task_type = meta.get("name"), meta.get("type")
    lang, split = meta.get("lang", "und"), meta.get("split", "test")
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise TaskDataError(f"{path}: \"name\" must be letters, digits, '.', '_' or '-' (got {name!r})")
    if task_type not in TASK_TYPES:
        raise TaskDataError(f"{path}: \"type\" must be one of {', '.join(TASK_TYPES)} (got {task_type!r})")
    if not isinstance(split, str) or not _NAME_PATTERN.match(split) or split == "train":
        raise TaskDataError(f"{path}: \"split\" must be a plain name other than 'train' (got {split!r})")
    if not isinstance(lang, str) or not _valid_lang(lang):
        raise TaskDataError(f"{path}: \"lang\" {lang!r} is not zh, en or an ISO 639-3 code like cmn-Hans / eng-Latn")
    return name, task_type, lang, split


def _valid_lang(lang: str) -> bool:
    from mteb.languages.check_language_code import check_language_code

    try:
        check_language_code(LANG_CODES.get(lang, lang))
    except ValueError:
        return False
    return True


def _data_files(folder: Path, task_type: str, split: str) -> list[Path]:
    if task_type == "Retrieval":
        return [folder / beir.CORPUS_FILE, folder / beir.QUERIES_FILE, beir.qrels_path(folder, split)]
    if task_type == "Reranking":
        return [folder / f"{split}.jsonl"]
    if task_type == "Classification":
        return [folder / "train.tsv", folder / f"{split}.tsv"]
    return [folder / f"{split}.tsv"]


def _loader(folder: Path, task_type: str, split: str) -> Any:
    files = _data_files(folder, task_type, split)
    if task_type in ("STS", "PairClassification"):
        return lambda: read_pairs(files[0], binary=task_type == "PairClassification")
    if task_type == "Retrieval":
        return lambda: read_beir(folder, split)
    if task_type == "Reranking":
        return lambda: read_reranking(files[0])
    if task_type == "Clustering":
        return lambda: read_labelled_texts(files[0])

    def load_classification() -> ClassificationData:
        data = ClassificationData(read_labelled_texts(files[0]), read_labelled_texts(files[1]))
        check_classification(files[0], files[1], data)
        return data

    return load_classification


def load_task_dir(folder: Path) -> TaskSpec:
    """The TaskSpec of a task folder; task.json and the presence of the data files are checked now."""
    folder = Path(folder)
    meta = _read_task_json(folder)
    name, task_type, lang, split = _check_task_json(folder / TASK_FILE, meta)
    for path in _data_files(folder, task_type, split):
        if not path.is_file():
            raise TaskDataError(f"{path}: file not found (a {task_type} task with split {split!r} needs it)")
    return TaskSpec(name=name, type=task_type, lang=lang, split=split, source=str(folder.resolve()),
                    load=_loader(folder, task_type, split), note=str(meta.get("description", "")))
