"""The clean stage: normalisation, rule filters, dedup, teacher filter, quarantine counts, Ray fan-out."""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH
from datasketch.lsh import _optimal_param

from conan_core.clean import dedup
from conan_core.clean.config import CleanConfig
from conan_core.clean.decontaminate import eval_match_keys, overlap_key
from conan_core.clean.dedup import (
    NearDuplicateIndex,
    band_hashes,
    char_ngrams,
    dedup_text,
    exact_key,
    lsh_bands,
    signatures,
)
from conan_core.clean.normalise import approx_token_count, detect_lang, normalise_text
from conan_core.clean.stage import OrderedDedup, UnitOutput, filter_records, pack_unit, run_clean
from conan_core.errors import ConanError
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


def _index_decisions(texts: list[str], config: CleanConfig) -> list[bool]:
    sigs = signatures(texts, config)
    index = NearDuplicateIndex(config)
    first = index.add_signatures(sigs)
    bands = band_hashes(sigs, *lsh_bands(config.minhash_threshold, config.minhash_num_perm)).tolist()
    return [index.is_new(first + row, row_bands) for row, row_bands in enumerate(bands)]


def _datasketch_decisions(texts: list[str], config: CleanConfig) -> list[bool]:
    """The dedup as it was written with datasketch: one MinHash per text, MinHashLSH candidates, then the
    signatures' agreement against the threshold."""
    lsh = MinHashLSH(threshold=config.minhash_threshold, num_perm=config.minhash_num_perm)
    kept: list[np.ndarray] = []
    decisions = []
    for text in texts:
        minhash = MinHash(num_perm=config.minhash_num_perm, seed=config.minhash_seed, hashfunc=zlib.crc32)
        minhash.update_batch([g.encode("utf-8") for g in char_ngrams(text, config.minhash_ngram)])
        new = not any(float(np.mean(kept[int(key)] == minhash.hashvalues)) >= config.minhash_threshold
                      for key in lsh.query(minhash))
        if new:
            lsh.insert(str(len(kept)), minhash, check_duplication=False)
            kept.append(minhash.hashvalues)
        decisions.append(new)
    return decisions


def _perturbed_texts(count: int) -> list[str]:
    """Short and long texts and their one-character variants: near-duplicates and clear non-duplicates."""
    rng = random.Random(3)
    base = ["", "短", "两个", "今天天气很好", "A man is eating.", LONG_GOOD] + [
        "".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(rng.randrange(4, 80))) for _ in range(40)]
    texts = []
    for _ in range(count):
        text = rng.choice(base)
        if text and rng.random() < 0.6:
            i = rng.randrange(len(text))
            text = text[:i] + rng.choice(["", "的", "x", text[i] * 2]) + text[i + 1:]
        texts.append(text)
    return texts


def test_minhash_index_keeps_first_and_flags_near_duplicates() -> None:
    config = CleanConfig(minhash_threshold=0.8)
    texts = [LONG_GOOD, LONG_GOOD.replace("检测", "检查", 1), "完全不同的另一句话，没有任何重叠的内容"]
    assert _index_decisions(texts, config) == [True, False, True]


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9])
def test_signatures_and_dedup_decisions_are_datasketchs(threshold: float) -> None:
    """Vectorised signatures, our band choice and index drop exactly the rows datasketch's would."""
    config = CleanConfig(minhash_threshold=threshold)
    texts = _perturbed_texts(600)
    reference = np.empty((len(texts), config.minhash_num_perm), dtype=np.uint64)
    for row, text in enumerate(texts):
        minhash = MinHash(num_perm=config.minhash_num_perm, seed=config.minhash_seed, hashfunc=zlib.crc32)
        minhash.update_batch([g.encode("utf-8") for g in char_ngrams(text, config.minhash_ngram)])
        reference[row] = minhash.hashvalues
    assert np.array_equal(signatures(texts, config).astype(np.uint64), reference)
    decisions = _index_decisions(texts, config)
    assert decisions == _datasketch_decisions(texts, config)
    assert 50 < decisions.count(False) < 550  # the texts do exercise both answers


def test_band_hash_collisions_are_no_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every band hash equal, every kept row is looked at; only an equal band makes it a candidate."""
    config = CleanConfig(minhash_threshold=0.5)
    texts = _perturbed_texts(300)
    monkeypatch.setattr(dedup, "band_hashes", lambda sigs, bands, rows: np.zeros((len(sigs), bands), np.uint64))
    sigs = signatures(texts, config)
    index = NearDuplicateIndex(config)
    first = index.add_signatures(sigs)
    bands = dedup.band_hashes(sigs, *lsh_bands(config.minhash_threshold, config.minhash_num_perm)).tolist()
    decisions = [index.is_new(first + row, row_bands) for row, row_bands in enumerate(bands)]
    assert decisions == _datasketch_decisions(texts, config)


def _reference_reasons(records: list[dict], config: CleanConfig) -> list[str | None]:
    """The ordered dedup as it was written before (exact key set, then datasketch near-dedup)."""
    seen: set[bytes] = set()
    lsh = MinHashLSH(threshold=config.minhash_threshold, num_perm=config.minhash_num_perm)
    kept: list[np.ndarray] = []
    reasons: list[str | None] = []
    for record in records:
        key = exact_key(record)
        if key in seen:
            reasons.append("duplicate")
            continue
        if record["kind"] in config.near_dedup_kinds:
            minhash = MinHash(num_perm=config.minhash_num_perm, seed=config.minhash_seed, hashfunc=zlib.crc32)
            minhash.update_batch([g.encode("utf-8") for g in char_ngrams(dedup_text(record), config.minhash_ngram)])
            if any(float(np.mean(kept[int(k)] == minhash.hashvalues)) >= config.minhash_threshold
                   for k in lsh.query(minhash)):
                reasons.append("near_duplicate")
                continue
            lsh.insert(str(len(kept)), minhash, check_duplication=False)
            kept.append(minhash.hashvalues)
        seen.add(key)
        reasons.append(None)
    return reasons


def test_ordered_dedup_over_units_decides_as_one_pass_in_order() -> None:
    """Bulk-kept fresh rows and the row-by-row rest give the decisions of one plain pass, across units."""
    config = CleanConfig(minhash_threshold=0.8)
    rng = random.Random(5)
    texts = _perturbed_texts(900)
    records = [make_record(kind=rng.choice(["pair", "pair", "sts"]), query=text or "空", positive=rng.choice("ab"),
                           score=1.0, source="s", lang="zh") for text in texts]
    records += [rng.choice(records) for _ in range(200)]  # exact duplicates, within and across units
    rng.shuffle(records)
    dedup = OrderedDedup(config)
    reasons = []
    for start in range(0, len(records), 250):
        unit = pack_unit(UnitOutput(records=records[start:start + 250]), config)
        reasons += dedup._reasons(unit.keys)
    assert reasons == _reference_reasons(records, config)
    assert {"duplicate", "near_duplicate", None} == set(reasons)


def test_lsh_bands_are_datasketchs_choice() -> None:
    for num_perm in (16, 64, 128):
        for threshold in (0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95):
            expected = _optimal_param(threshold, num_perm, 0.5, 0.5)
            if expected[0] < 2:  # MinHashLSH refuses a single band, and so do we
                with pytest.raises(ConanError, match="single LSH band"):
                    lsh_bands(threshold, num_perm)
            else:
                assert lsh_bands(threshold, num_perm) == expected, (threshold, num_perm)


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


def _dataset_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.parquet")}


def test_small_inputs_run_in_process_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    from conan_core import raymap

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for backend, workers, on_ray in (("processes", 2, False), ("one_process", 1, False), ("ray", 2, True)):
        monkeypatch.setattr(raymap, "uses_ray", lambda on_ray=on_ray: on_ray)
        threshold = raymap.FANOUT_MIN_BYTES[backend]
        assert raymap.fanout_workers(workers, threshold - 1, 10) == 0
        assert raymap.fanout_workers(workers, threshold, 10) == workers
        assert raymap.fanout_workers(workers, threshold, 1) == 0  # one unit: nothing to spread
    assert raymap.fanout_workers(2, 1, 1, min_bytes=0) == 2 and raymap.fanout_workers(0, 1 << 40, 10) == 0


def test_a_cluster_named_by_ray_address_gets_small_inputs_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user pointed the run at a cluster: the work goes there whatever its size (two units or more)."""
    from conan_core import raymap

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert raymap.fanout_workers(2, 1, 2) == 2
    assert raymap.fanout_workers(2, 1 << 30, 1) == 0  # one unit: still nothing to spread
    assert raymap.fanout_workers(0, 1 << 30, 10) == 0  # workers=0 stays in this process
    monkeypatch.delenv("RAY_ADDRESS")
    assert raymap.fanout_workers(2, 1, 2) == 0


def test_worker_processes_give_the_same_dataset_as_in_process(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from conan_core import raymap

    monkeypatch.setattr(raymap, "uses_ray", lambda: False)  # local processes even if a test left Ray running
    source = _fuzz_file(tmp_path / "fuzz.jsonl")
    config = CONFIG.model_copy(update={"lines_per_unit": 4})  # several units, so order across workers matters
    local = run_clean([source, source], tmp_path / "local", config, workers=0, progress=False)
    for workers in (1, 2):
        fanned = run_clean([source, source], tmp_path / f"p{workers}", config, workers=workers, progress=False,
                           min_fanout_bytes=0)
        assert local["counts"] == fanned["counts"]
        assert _dataset_files(tmp_path / f"p{workers}") == _dataset_files(tmp_path / "local")


def test_a_failing_unit_fails_the_stage_with_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conan_core import raymap
    from conan_core.clean import stage

    monkeypatch.setattr(raymap, "uses_ray", lambda: False)
    source = _fuzz_file(tmp_path / "fuzz.jsonl")

    def broken(unit, config, eval_keys):  # forked workers inherit the patched module
        raise ConanError(f"cannot read {unit.path}")

    monkeypatch.setattr(stage, "process_unit", broken)
    with pytest.raises(ConanError, match="cannot read"):
        run_clean([source], tmp_path / "out", CONFIG, workers=2, progress=False, min_fanout_bytes=0)
    assert not (tmp_path / "out" / "manifest.json").exists()


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
    files = _dataset_files(tmp_path / "local")
    for workers in (1, 2):  # min_fanout_bytes=0: fan out however small the input
        ray_run = run_clean([source, source], tmp_path / f"ray{workers}", config, workers=workers, progress=False,
                            min_fanout_bytes=0)
        assert local["shards"] == ray_run["shards"] and local["counts"] == ray_run["counts"]
        assert _dataset_files(tmp_path / f"ray{workers}") == files  # byte for byte, manifest aside
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


def test_eval_keys_are_cached_by_the_splits_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conan_core.clean import decontaminate
    from conan_core.io.readers import FieldMap, ReadSpec

    split = tmp_path / "data" / "eval" / "pairs.jsonl"
    split.parent.mkdir(parents=True)
    split.write_text(json.dumps({"q": "评测 句子\u3000一", "p": "另一句"}, ensure_ascii=False) + "\n", encoding="utf-8")
    spec = ReadSpec("jsonl", "e", "zh", fields=FieldMap(kind="pair", query="q", positive="p"))
    monkeypatch.setattr(decontaminate, "EVAL_TEXT_FILES", ["eval/pairs.jsonl"])
    monkeypatch.setattr(decontaminate, "EVAL_FILES", {"eval/pairs.jsonl": spec})
    monkeypatch.setattr(decontaminate, "shared_data_dir", lambda: tmp_path / "data")
    monkeypatch.setenv("CONAN_WORK_DIR", str(tmp_path / "work"))
    fresh = decontaminate.load_eval_keys()
    assert fresh == {"t:评测句子一", "t:另一句", "p:评测句子一\x1f另一句"}
    assert len(list((tmp_path / "work" / "eval_keys").glob("*.txt"))) == 1
    monkeypatch.setattr(decontaminate, "_read_eval_keys", lambda paths: pytest.fail("read again"))
    assert decontaminate.load_eval_keys() == fresh  # from the key file
    split.write_text(json.dumps({"q": "新的", "p": "句子"}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(pytest.fail.Exception, match="read again"):  # changed contents: another key file
        decontaminate.load_eval_keys()
