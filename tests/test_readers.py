"""Readers (every format), sniffing, and the catalog's groups (no eval split in a training group)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conan_core.io.catalog import EVAL_FILES, GROUPS, catalog_entries, catalog_inputs, read_file, resolve_inputs
from conan_core.io.readers import (
    FieldMap,
    ReaderError,
    ReadSpec,
    plan_units,
    read_unit,
    sniff_spec,
    split_lines,
    unit_lines,
)
from conan_core.paths import shared_data_dir

# Splits `conan eval` scores (brief of the eval helper): none may feed training.
SCORED = ("eval/atec/", "eval/afqmc/", "eval/lcqmc_dev/", "eval/pawsx_zh_dev/", "eval/chinese_stsb/test",
          "eval/qbqtc/test", "eval/ocnli/", "eval/cmnli/", "eval/fewclue/tnews/test", "eval/fewclue/iflytek/test",
          "eval/waimai_10k/", "eval/online_shopping_10_cats/", "eval/csl_cls/", "eval/cmrc2018_trial_retrieval",
          "stsbenchmark.tsv#", "eval/en_sick2014/SICK_test", "eval/en_semeval_sts/2013", "eval/en_semeval_sts/2014",
          "eval/en_semeval_sts/2015", "eval/en_semeval_sts/2016", ".test.tsv", "eval/en_beir_")
needs_data = pytest.mark.skipif(not (shared_data_dir() / "pairs").exists(), reason="shared data not present")


def test_no_scored_eval_split_in_a_training_group() -> None:
    for group in ("pretrain_pairs", "finetune", "instruct"):
        for key in GROUPS[group]:
            assert key not in EVAL_FILES, key
            assert not any(marker in key for marker in SCORED), f"{key} in {group}"


@needs_data
def test_every_catalogued_file_exists() -> None:
    for group in GROUPS:
        for path in catalog_inputs(group):
            assert path.exists(), path


@needs_data
def test_real_files_read_with_exact_counts() -> None:
    stsb = dict(resolve_inputs([shared_data_dir() / "eval/chinese_stsb/train.txt"]))
    result = read_file(*next(iter(stsb.items())))
    assert len(result.records) == 5231 and not result.quarantine
    assert result.records[0]["query"] == "一架飞机要起飞了。" and result.records[0]["score"] == 5.0
    en_stsb = read_file(shared_data_dir() / "eval/en_stsbenchmark/stsbenchmark.tsv")
    assert len(en_stsb.records) == 5749 and en_stsb.skipped == 1500 + 1379  # dev and test deselected
    entries = {spec.source: (path, spec) for path, spec in catalog_entries("finetune")}
    bge = read_file(*entries["text2vec_bge_zh"])
    assert len(bge.records) == 2701 and all(r["kind"] == "retrieval" and r["negatives"] for r in bge.records)


def test_split_on_newline_only_and_bad_lines_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps({"query": "a\u2028b", "title": "c\u0085d"}, ensure_ascii=False).encode() + b"\n"
                     + b"\xff\n" + b'{"query": 1\n')
    result = read_file(path)
    assert [r["query"] for r in result.records] == ["a\u2028b"]
    assert [q["reason"] for q in result.quarantine] == ["invalid_utf8", "malformed_json"]


def test_bge_multiple_positives_and_no_negatives(tmp_path: Path) -> None:
    path = tmp_path / "bge.jsonl"
    rows = [{"query": "q", "pos": ["p1", "p2"], "neg": ["n"]}, {"query": "q2", "pos": ["p"], "neg": []},
            {"query": "q3", "pos": []}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = read_file(path)
    assert [(r["kind"], r["positive"]) for r in result.records] == [("retrieval", "p1"), ("retrieval", "p2"),
                                                                  ("pair", "p")]
    assert [q["reason"] for q in result.quarantine] == ["missing_field"]


def test_beir_dir(tmp_path: Path) -> None:
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "title": "T", "text": "doc one"}\n'
                                           '{"_id": "d2", "title": "", "text": "doc two"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "query"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq1\tdX\t1\n")
    result = read_file(tmp_path)
    assert [(r["query"], r["positive"]) for r in result.records] == [("query", "T doc one")]
    assert result.skipped == 1 and [q["reason"] for q in result.quarantine] == ["missing_field"]


def test_sniffing_user_files(tmp_path: Path) -> None:
    (tmp_path / "a.tsv").write_text("s1\ts2\t0.5\n")
    (tmp_path / "b.json").write_text('[{"instruction": "hi", "output": "hello there"}]')
    (tmp_path / "c.jsonl").write_text('{"text": "t", "label": "x"}\n')
    (tmp_path / "d.bin").write_text("?")
    assert sniff_spec(tmp_path / "a.tsv").fields.kind == "sts"
    assert sniff_spec(tmp_path / "b.json").format == "instruct_json"
    assert sniff_spec(tmp_path / "c.jsonl").fields.kind == "classification"
    with pytest.raises(ReaderError, match="unknown file type"):
        sniff_spec(tmp_path / "d.bin")
    with pytest.raises(ReaderError, match="no such file"):
        sniff_spec(tmp_path / "missing.jsonl")


def test_csv_with_quoted_fields(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text('label,review\n1,"good, ""very"" good"\n0,bad\n', encoding="utf-8")
    from conan_core.io.readers import FieldMap, ReadSpec

    spec = ReadSpec("csv", "r", "zh", FieldMap(kind="classification", query="review", label="label"),
                    header=True, delimiter=",")
    result = read_file(path, spec)
    assert [(r["query"], r["label"]) for r in result.records] == [('good, "very" good', "1"), ("bad", "0")]


@pytest.mark.parametrize("data", [b"", b"a\n", b"a", b"a\nb\r\n\nc", b"a\nb\nc\nd\n", b"\n\n\n", b"x\ny\nz\nw\nv"])
@pytest.mark.parametrize("lines_per_unit", [1, 2, 3, 100])
def test_units_read_their_own_byte_range_as_the_whole_file_split_would(tmp_path: Path, data: bytes,
                                                                       lines_per_unit: int) -> None:
    path = tmp_path / "lines.jsonl"
    path.write_bytes(data)
    units = plan_units(path, ReadSpec("jsonl", "s", "zh"), lines_per_unit=lines_per_unit)
    assert all(unit.byte_range is not None for unit in units)
    whole = split_lines(data)
    assert [unit_lines(unit) for unit in units] == [whole[u.start:u.stop] for u in units]
    assert [line for unit in units for line in unit_lines(unit)] == whole


def test_tsv_header_is_read_by_every_unit(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("query\tpos\n" + "".join(f"q{i}\tp{i}\n" for i in range(5)), encoding="utf-8")
    fields = FieldMap(kind="pair", query="query", positive="pos")
    spec = ReadSpec("tsv", "s", "zh", fields=fields, header=True)
    units = plan_units(path, spec, lines_per_unit=2)
    assert len(units) == 3
    assert [r["positive"] for u in units for r in read_unit(u).records] == [f"p{i}" for i in range(5)]
