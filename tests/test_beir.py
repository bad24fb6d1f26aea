"""The BEIR format (conan_core/io/beir.py) and its two readers: ingest (io/readers) and eval (eval/taskdir)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conan_core.eval.taskdir import read_beir
from conan_core.io import beir
from conan_core.io.readers import ReadSpec, ReadUnit, read_unit


def _write_beir(folder: Path, corpus: list[object], queries: list[object], qrels: str) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (folder / "qrels" / "test.tsv").write_text(qrels)
    return folder


def _ingest(folder: Path):
    return read_unit(ReadUnit(str(folder), ReadSpec("beir", "beir_test", "en")))


def test_both_readers_give_the_same_query_positive_pairs(tmp_path: Path) -> None:
    folder = _write_beir(
        tmp_path / "b",
        corpus=[{"_id": "d1", "title": "Title", "text": "doc one"}, {"_id": "d2", "title": "", "text": "doc two"},
                {"_id": 3, "text": "doc three"}, {"_id": "d4", "title": None, "text": "doc four"}],
        queries=[{"_id": "q1", "text": "first query"}, {"_id": "q2", "text": "second query"},
                 {"_id": "q3", "text": "unjudged query"}],
        qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq1\t3\t2\nq2\td4\t1\nq3\td2\t0\n")
    ingested = sorted((r["query"], r["positive"]) for r in _ingest(folder).records)
    data = read_beir(folder, "test")
    evaluated = sorted((data.queries[q], beir.joined_text(*data.corpus[d]))
                       for q, judged in data.qrels.items() for d, score in judged.items() if beir.is_relevant(score))
    assert ingested == evaluated == [("first query", "Title doc one"), ("first query", "doc three"),
                                     ("second query", "doc four")]


def test_ingest_quarantines_a_record_that_is_not_an_object_or_has_non_string_fields(tmp_path: Path) -> None:
    # Eval rejects these rows with an error; ingest quarantines them (a list line used to raise AttributeError
    # and a numeric text or title used to be str()'d into a training text).
    folder = _write_beir(
        tmp_path / "b",
        corpus=[{"_id": "d1", "text": "doc"}, [1, 2], {"_id": "d2", "text": 7}, {"_id": "d3", "title": 5, "text": "x"},
                {"_id": None, "text": "no id"}],
        queries=[{"_id": "q1", "text": "query"}],
        qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    result = _ingest(folder)
    assert [(r["query"], r["positive"]) for r in result.records] == [("query", "doc")]
    assert [q["reason"] for q in result.quarantine] == ["malformed_json"] * 4


@pytest.mark.parametrize(("record", "problem"), [
    ({"text": "a"}, 'missing "_id"'), ({"_id": "", "text": "a"}, 'missing "_id"'),
    ({"_id": "d", "text": ["a"]}, 'empty or missing "text"'), ({"_id": "d", "title": 1, "text": "a"}, '"title"'),
    ([1, 2], "not a JSON object"),
])
def test_parse_record_names_the_problem(record: object, problem: str) -> None:
    with pytest.raises(beir.BeirRowError, match=problem):
        beir.parse_record(record)


def test_title_join_and_relevance() -> None:
    assert beir.parse_record({"_id": 7, "text": "t"}) == beir.IdText("7", "", "t")
    assert beir.joined_text("T", " body ") == "T  body"  # stripped at the ends only, as mteb does
    assert beir.joined_text("", " body ") == " body "
    assert beir.is_qrel_header(["query-id", "corpus-id", "score"]) and not beir.is_qrel_header(["q1", "d1", "1"])
    assert beir.is_relevant(beir.qrel_score("1")) and not beir.is_relevant(beir.qrel_score("0"))
    with pytest.raises(beir.BeirRowError, match="not a finite number"):
        beir.qrel_score("nan")
