"""The clean stage: normalisation, rule filters, dedup, teacher filter, quarantine counts, Ray fan-out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conan_core.clean.config import CleanConfig
from conan_core.clean.decontaminate import eval_match_keys, overlap_key
from conan_core.clean.dedup import NearDuplicateIndex, signatures
from conan_core.clean.normalise import approx_token_count, detect_lang, normalise_text
from conan_core.clean.stage import UnitOutput, filter_records, run_clean
from conan_core.io.dataset import read_dataset, read_quarantine
from conan_core.schema import make_record

# 200 distinct-ish CJK characters: one changed character leaves a character-trigram Jaccard of about 0.97,
# far enough above the 0.9 threshold that the 128-permutation estimate cannot fall below it.
LONG_GOOD = "测试，" + "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(200)) + "检测结束。"
# The fuzz rows are scored pairs (STS kind); near-dedup covers them here so one file exercises every reason.
CONFIG = CleanConfig(decontaminate=False, near_dedup_kinds=["pair", "retrieval", "sts"])


def _fuzz_file(path: Path) -> Path:
    rows: list[bytes] = [
        json.dumps({"sentence1": "今天天气很好", "sentence2": "今天天气不错", "label": "1"}).encode(),  # kept
        b'{"sentence1": "broken json", ',  # malformed_json
        b'{"sentence1": "\xff\xfe bad bytes", "sentence2": "x", "label": "1"}',  # invalid_utf8
        json.dumps({"sentence1": "只有一句", "label": "1"}).encode(),  # missing_field
        json.dumps({"sentence1": "   ", "sentence2": "有内容的句子", "label": "0"}).encode(),  # empty_side
        json.dumps({"sentence1": "同一句话", "sentence2": "同一句话", "label": "1"}).encode(),  # identical_sides
        json.dumps({"sentence1": "太长了", "sentence2": "长" * 5000, "label": "0"}).encode(),  # too_long
        json.dumps({"sentence1": "分数坏了", "sentence2": "分数是NaN", "label": "NaN"}).encode(),  # invalid_score
        # duplicate of the first row once HTML and the zero-width space are stripped
        json.dumps({"sentence1": "<b>今天天气很好</b>", "sentence2": "今天天气不错\u200b", "label": "1"}).encode(),
        b"",  # blank line: nothing
        json.dumps({"sentence1": "A man is eating.", "sentence2": "Someone eats food.", "label": 4.2}).encode(),  # kept
        json.dumps({"sentence1": LONG_GOOD, "sentence2": "近似重复测试", "label": "1"}).encode(),  # kept
        json.dumps({"sentence1": LONG_GOOD.replace("检测", "检查", 1), "sentence2": "近似重复测试",
                    "label": "1"}).encode(),  # near_duplicate
        # kept, after NFKC and control-character removal
        json.dumps({"sentence1": "ＦＵＬＬ　ｗｉｄｔｈ text\x07", "sentence2": "full width", "label": "1"}).encode(),
        json.dumps({"sentence1": "类型不对", "sentence2": ["a", "list"], "label": "1"}).encode(),  # wrong_type
    ]
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


EXPECTED_DROPS = {"malformed_json": 1, "invalid_utf8": 1, "missing_field": 1, "empty_side": 1,
                  "identical_sides": 1, "too_long": 1, "invalid_score": 1, "duplicate": 1,
                  "near_duplicate": 1, "wrong_type": 1}


def test_normalise_text_rules() -> None:
    config = CleanConfig()
    assert normalise_text("ＦＵＬＬ　ｗｉｄｔｈ", config) == "FULL width"
    assert normalise_text("<p>Hello&nbsp;<b>world</b></p>\x00\u200b", config) == "Hello world"
    assert normalise_text("CafÃ©  au\n\tlait", config) == "Café au lait"
    assert normalise_text("a < b > c", config) == "a < b > c"  # not a tag
    assert normalise_text("這是繁體中文", CleanConfig(traditional_to_simplified=True)) == "这是繁体中文"


def test_lang_and_tokens() -> None:
    assert detect_lang("今天天气很好") == "zh" and detect_lang("The weather is nice") == "en"
    assert detect_lang("12345 !!") == "other"
    assert approx_token_count("我爱 NLP models") == 4


def test_minhash_index_keeps_first_and_flags_near_duplicates() -> None:
    config = CleanConfig(minhash_threshold=0.8)
    texts = [LONG_GOOD, LONG_GOOD.replace("检测", "检查", 1), "完全不同的另一句话，没有任何重叠的内容"]
    sigs = signatures(texts, config)
    index = NearDuplicateIndex(config)
    assert [index.is_new(sig) for sig in sigs] == [True, False, True]


def test_fuzz_file_counts_both_sides_exactly(tmp_path: Path) -> None:
    source = _fuzz_file(tmp_path / "fuzz.jsonl")
    manifest = run_clean([source], tmp_path / "out", CONFIG, workers=0, progress=False)
    kept = read_dataset(tmp_path / "out")
    quarantine = read_quarantine(tmp_path / "out")
    assert kept.num_rows == 4 == manifest["counts"]["kept"]
    assert manifest["counts"]["dropped_by_reason"] == EXPECTED_DROPS
    assert sorted(quarantine.column("reason").to_pylist()) == sorted(
        reason for reason, n in EXPECTED_DROPS.items() for _ in range(n))
    long_good = normalise_text(LONG_GOOD, CONFIG)  # NFKC turns the full-width commas into ","
    assert kept.column("query").to_pylist() == ["今天天气很好", "A man is eating.", long_good, "FULL width text"]
    assert kept.column("lang").to_pylist() == ["zh", "en", "zh", "en"]
    assert kept.column("score").to_pylist() == [1.0, 4.2, 1.0, 1.0]
    raw = dict(zip(quarantine.column("reason").to_pylist(), quarantine.column("raw").to_pylist(), strict=True))
    assert raw["malformed_json"] == '{"sentence1": "broken json", '
    assert "bad bytes" in raw["invalid_utf8"]
    assert manifest["inputs"][0]["sha256"] and manifest["config"]["clean"]["minhash_threshold"] == 0.9


def test_rerun_is_identical(tmp_path: Path) -> None:
    source = _fuzz_file(tmp_path / "fuzz.jsonl")
    first = run_clean([source], tmp_path / "out", CONFIG, workers=0, progress=False)
    files = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    second = run_clean([source], tmp_path / "out", CONFIG, workers=0, progress=False)
    assert first == second
    assert files == {p.relative_to(tmp_path).as_posix(): p.read_bytes()
                     for p in (tmp_path / "out").rglob("*") if p.is_file()}


class _FakeTeacher:
    """Embeds a text by whether it mentions weather: weather/weather pairs score 1, others 0."""

    def encode(self, texts: list[str], batch_size: int = 64, normalize: bool = True) -> np.ndarray:
        return np.array([[1.0, 0.0] if "天气" in t else [0.0, 1.0] for t in texts]) * 3.0  # unnormalised


def test_teacher_filter_drops_low_scores_and_keeps_the_column(tmp_path: Path) -> None:
    source = tmp_path / "pairs.jsonl"
    source.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in [
        {"query": "今天天气", "title": "明天天气"}, {"query": "今天天气", "title": "股票价格"},
        {"query": "cats", "title": "dogs"}]) + "\n", encoding="utf-8")
    manifest = run_clean([source], tmp_path / "out", CONFIG, teacher=_FakeTeacher(), workers=0, progress=False)
    kept = read_dataset(tmp_path / "out")
    assert kept.column("teacher_score").to_pylist() == pytest.approx([1.0, 1.0])
    assert kept.column("positive").to_pylist() == ["明天天气", "dogs"]
    assert manifest["counts"]["dropped_by_reason"] == {"teacher_score_below_min": 1}
    assert read_quarantine(tmp_path / "out").column("teacher_score").to_pylist() == pytest.approx([0.0])


def test_decontamination_drops_eval_pairs_and_eval_texts() -> None:
    eval_pair = make_record(kind="sts", query="评测 集里的 句子", positive="另一句", score=1.0, source="e", lang="zh")
    eval_keys = frozenset(eval_match_keys(eval_pair)[:1] + ["t:" + overlap_key("评测分类文本")])
    records = [make_record(kind="pair", query="另一句", positive="评测集里的句子", source="s", lang="zh"),  # same pair
               make_record(kind="pair", query="评测集里的句子", positive="新的答案", source="s", lang="zh"),  # one text
               make_record(kind="classification", query="评测 分类文本", label="x", source="s", lang="zh")]
    out = UnitOutput()
    filter_records(records, CleanConfig(), eval_keys, out)
    assert [r["positive"] for r in out.records] == ["新的答案"]
    assert [q["reason"] for q in out.quarantine] == ["eval_overlap", "eval_overlap"]


def test_language_and_length_options(tmp_path: Path) -> None:
    source = tmp_path / "p.tsv"
    source.write_text("今天天气很好\t今天天气不错\nThe weather\tIs nice today\n短\t很长的一个句子\n", encoding="utf-8")
    config = CleanConfig(decontaminate=False, langs=["zh"], min_chars=2)
    manifest = run_clean([source], tmp_path / "out", config, workers=0, progress=False)
    assert manifest["counts"]["kept"] == 1
    assert manifest["counts"]["dropped_by_reason"] == {"language": 1, "too_short": 1}


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from conan_core.raysession import start_local_ray

    start_local_ray(num_cpus=2, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_workers_give_the_same_dataset_as_in_process(tmp_path: Path, ray_session: None) -> None:
    source = _fuzz_file(tmp_path / "fuzz.jsonl")
    config = CONFIG.model_copy(update={"lines_per_unit": 4})  # several units, so order across workers matters
    local = run_clean([source, source], tmp_path / "local", config, workers=0, progress=False)
    ray_run = run_clean([source, source], tmp_path / "ray", config, workers=2, progress=False)
    assert local["shards"] == ray_run["shards"] and local["counts"] == ray_run["counts"]
    # each copy has one duplicate row; the second copy also repeats the 4 rows the first copy kept
    assert local["counts"]["dropped_by_reason"]["duplicate"] == 2 + 4


def test_labelled_near_duplicates_are_kept_by_default(tmp_path: Path) -> None:
    """Two STS pairs one word apart with different scores are signal, not noise: only exact dedup."""
    rows = [{"sentence1": LONG_GOOD, "sentence2": "近似重复测试", "label": 4.0},
            {"sentence1": LONG_GOOD.replace("检测", "检查", 1), "sentence2": "近似重复测试", "label": 1.0},
            {"sentence1": LONG_GOOD, "sentence2": "近似重复测试", "label": 4.0}]
    source = tmp_path / "sts.jsonl"
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    manifest = run_clean([source], tmp_path / "out", CleanConfig(decontaminate=False), workers=0, progress=False)
    assert manifest["counts"]["kept"] == 2
    assert read_quarantine(tmp_path / "out").column("reason").to_pylist() == ["duplicate"]
