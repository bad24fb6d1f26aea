"""Bad input (issue 13, items 5, 6, 8): explicit reading rules or quarantine with a reason, never a guess;
one-line CLI errors instead of tracebacks; encoding and long-line sniffing; shards fsynced before the manifest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conan_core.clean.config import CleanConfig
from conan_core.clean.stage import run_clean
from conan_core.errors import DatasetIntegrityError
from conan_core.io import dataset as dataset_module
from conan_core.io.catalog import TRAIN_FILES, read_file
from conan_core.io.dataset import read_dataset, read_manifest, read_quarantine, write_dataset
from conan_core.io.readers import FieldMap, ReaderError, ReadSpec, sniff_spec
from conan_core.schema import make_record, quarantine_table, records_table

CONFIG = CleanConfig(decontaminate=False, near_dedup=False)


def _reasons(result) -> Counter:
    return Counter(row["reason"] for row in result.quarantine)


def _pairs(result) -> list[tuple]:
    return [(r["query"], r["positive"], r["score"]) for r in result.records]


def _one_line_error(result) -> str:
    """The CLI failed with exactly one line, `error: ...`, and no traceback."""
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def _cli(*args: str):
    from conan_cli.main import app

    return CliRunner().invoke(app, list(args))


def _clean(source: Path, output: Path):
    return _cli("clean", "--input", str(source), "--output", str(output), "--workers", "0", "--no-progress",
                "--no-decontaminate")


# ---------------------------------------------------------------- item 5: rules, not guesses

def test_sniffed_table_rows_with_another_column_count_are_malformed(tmp_path: Path) -> None:
    scored = tmp_path / "scored.tsv"
    scored.write_text("a\tb\t0.3\nc\td\t0.5\textra\ne\tf\ng\th\t1\n")
    result = read_file(scored)
    assert _pairs(result) == [("a", "b", 0.3), ("g", "h", 1.0)]  # the good rows of the same file
    assert _reasons(result) == {"malformed_row": 2}
    assert [q["raw"] for q in result.quarantine] == ["c\td\t0.5\textra", "e\tf"]
    plain = tmp_path / "plain.csv"
    plain.write_text("a,b\nc,d,0.3\ne,f\n")
    result = read_file(plain)
    assert _pairs(result) == [("a", "b", None), ("e", "f", None)]  # the 3-cell row is not cut to a pair
    assert _reasons(result) == {"malformed_row": 1}


def test_sniffed_header_row_is_quarantined_as_header(tmp_path: Path) -> None:
    named = tmp_path / "named.csv"
    named.write_text("Sentence1,sentence2\nhello there,general greeting\n")
    result = read_file(named)
    assert _pairs(result) == [("hello there", "general greeting", None)]  # the header is not a pair
    assert _reasons(result) == {"header": 1} and result.quarantine[0]["raw"] == "Sentence1,sentence2"
    unnamed = tmp_path / "unnamed.tsv"  # unknown names, but a non-numeric score above numeric ones
    unnamed.write_text("left\tright\tsim\nx\ty\t0.5\n")
    result = read_file(unnamed)
    assert _pairs(result) == [("x", "y", 0.5)] and _reasons(result) == {"header": 1}
    data_only = tmp_path / "data.tsv"  # no header: nothing is taken away
    data_only.write_text("query text\tanswer text\nx\ty\n")
    assert len(read_file(data_only).records) == 2 and not read_file(data_only).quarantine


def test_header_is_counted_in_the_clean_manifest(tmp_path: Path) -> None:
    source = tmp_path / "pairs.csv"
    source.write_text("query,positive\nwhat is a cat,a small animal\nwhere is the city,on the map\n")
    manifest = run_clean([source], tmp_path / "out", CONFIG, workers=0, progress=False)
    assert manifest["counts"]["kept"] == 2 and manifest["counts"]["dropped_by_reason"] == {"header": 1}
    assert read_quarantine(tmp_path / "out").column("reason").to_pylist() == ["header"]
    assert "query" not in read_dataset(tmp_path / "out").column("query").to_pylist()


def test_numbers_are_not_turned_into_text(tmp_path: Path) -> None:
    bge = tmp_path / "bge.jsonl"
    rows = [{"query": "q1", "pos": [123]}, {"query": 7, "pos": ["p"]}, {"query": "q3", "pos": ["p3"], "neg": [4.5]},
            {"query": "q4", "pos": ["p4"], "neg": ["n4"]}]
    bge.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = read_file(bge)
    assert [(r["query"], r["positive"], r["negatives"]) for r in result.records] == [("q4", "p4", ["n4"])]
    assert _reasons(result) == {"wrong_type": 3}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"text1": 2024, "text2": "a year"}\n{"text1": "ok", "text2": "fine"}\n')
    result = read_file(pairs)
    assert _pairs(result) == [("ok", "fine", None)] and _reasons(result) == {"wrong_type": 1}
    labels = tmp_path / "labels.jsonl"  # the documented exception: an integer label is its decimal text
    labels.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0.5}\n{"text": "x", "label": true}\n')
    result = read_file(labels)
    assert [r["label"] for r in result.records] == ["1"] and _reasons(result) == {"wrong_type": 2}


def test_a_string_where_a_list_belongs_is_not_wrapped(tmp_path: Path) -> None:
    bge = tmp_path / "bge.jsonl"
    rows = [{"query": "q1", "pos": ["p1"], "neg": "n1"}, {"query": "q2", "pos": "p2"},
            {"query": "q3", "pos": ["p3"], "neg": ["n3"]}, {"query": "q4", "pos": ["p4"]}]
    bge.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = read_file(bge)
    assert [(r["kind"], r["query"], r["negatives"]) for r in result.records] == [
        ("retrieval", "q3", ["n3"]), ("pair", "q4", [])]
    assert _reasons(result) == {"wrong_type": 2}
    assert [q["query"] for q in result.quarantine] == ["q1", "q2"]


def test_single_string_negative_only_where_the_catalog_says_so(tmp_path: Path) -> None:
    spec = TRAIN_FILES["pairs/simclue_train/train_rank_1w.json"]
    assert spec.fields.single_negative
    path = tmp_path / "rank.json"
    path.write_text('{"query": "q", "title": "t", "neg_title": "n"}\n'
                    '{"query": "q2", "title": "t2", "neg_title": ["n"]}\n')
    result = read_file(path, spec)
    assert [r["negatives"] for r in result.records] == [["n"]] and _reasons(result) == {"wrong_type": 1}
    as_list = ReadSpec("jsonl", "s", "zh", FieldMap(kind="retrieval", query="query", positive="title",
                                                    negatives="neg_title"))
    result = read_file(path, as_list)
    assert [r["negatives"] for r in result.records] == [["n"]] and _reasons(result) == {"wrong_type": 1}


# ---------------------------------------------------------------- item 8: encoding, long lines, fsync

def test_only_invalid_utf8_names_the_encoding(tmp_path: Path) -> None:
    for name in ("latin.tsv", "latin.jsonl", "latin.csv"):
        (tmp_path / name).write_bytes(b"caf\xe9\tna\xefve\n\xff\xfe\xfd\n")
        with pytest.raises(ReaderError, match="not UTF-8 text.*re-encode the file as UTF-8"):
            sniff_spec(tmp_path / name)
    (tmp_path / "utf16.tsv").write_bytes("a\tb\n".encode("utf-16"))
    with pytest.raises(ReaderError, match="UTF-16"):
        sniff_spec(tmp_path / "utf16.tsv")
    line = _one_line_error(_clean(tmp_path / "latin.tsv", tmp_path / "o"))
    assert "not UTF-8" in line and "column" not in line


def test_a_bad_first_line_does_not_lose_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mixed.tsv"
    path.write_bytes(b"\xe9t\xe9\t\xfd\t1\nqueries\tanswers\t0.5\n")
    result = read_file(path)
    assert _pairs(result) == [("queries", "answers", 0.5)] and _reasons(result) == {"invalid_utf8": 1}


def test_a_long_first_line_is_sniffed_whole(tmp_path: Path) -> None:
    long_text = "长" * 300_000  # 900 KB of UTF-8: far past any fixed sniffing window
    jsonl = tmp_path / "long.jsonl"
    jsonl.write_text(json.dumps({"query": long_text, "pos": ["p"], "neg": ["n"]}, ensure_ascii=False) + "\n"
                     + json.dumps({"query": "q", "pos": ["p2"]}) + "\n", encoding="utf-8")
    assert sniff_spec(jsonl).format == "bge"
    assert [r["positive"] for r in read_file(jsonl).records] == ["p", "p2"]
    tsv = tmp_path / "long.tsv"
    tsv.write_text(f"{long_text}\tb\t0.5\nc\td\t1\n", encoding="utf-8")
    spec = sniff_spec(tsv)
    assert spec.fields.kind == "sts" and spec.columns == 3 and spec.header_line is None
    assert [r["score"] for r in read_file(tsv).records] == [0.5, 1.0]


def test_shards_are_fsynced_before_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(dataset_module.os, "fsync", recording_fsync)
    records = [make_record(kind="pair", query=f"q{i}", positive=f"p{i}", source="s", lang="en") for i in range(5)]
    quarantine = quarantine_table([])
    manifest = write_dataset(tmp_path / "ds", records_table(records), quarantine, config={}, inputs=[], counts={},
                             shard_rows=2)
    names = [Path(p).name for p in synced]
    manifest_at = next(i for i, name in enumerate(names) if name.startswith(".manifest.json.tmp"))
    shard_files = [s["path"] for s in manifest["shards"] + manifest["quarantine_shards"]]
    assert len(shard_files) == 4
    for shard in shard_files:
        tmp_name = f".{Path(shard).name}.tmp-{os.getpid()}"
        assert [p for p in synced[:manifest_at] if p.endswith(f"{Path(shard).parent}/{tmp_name}")], (shard, synced)
    for folder in ("data", "quarantine"):  # the renames too
        assert str(tmp_path / "ds" / folder) in synced[:manifest_at]
    assert str(tmp_path / "ds") in synced[manifest_at:]  # and the manifest's rename


# ---------------------------------------------------------------- item 6: one-line errors

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conan_core.testing import tiny_model

    return tiny_model().save(tmp_path_factory.mktemp("model") / "tiny")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_broken_safetensors_is_one_line(tmp_path: Path, tiny_model_dir: Path, damage: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    line = _one_line_error(_cli("model", "init", "--base", str(broken), "--out", str(tmp_path / "new")))
    assert str(weights) in line and "truncated or corrupt" in line
    line = _one_line_error(_cli("eval", "--model", str(broken), "--output", str(tmp_path / "r.json"),
                                "--tasks", "STSBenchmark"))
    assert str(weights) in line


def _run_as_nobody() -> list[str] | None:
    """A command prefix that drops root (root reads a chmod-000 file), or [] when not root."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"] if setpriv else None


def test_unreadable_input_is_one_line_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file system refuses to read the input (what a chmod-000 file does to a non-root user): simulated
    in-process, so this runs in any checkout and as any user."""
    import builtins

    locked = tmp_path / "locked.tsv"
    locked.write_text("a\tb\n")
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(locked):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    monkeypatch.setattr(Path, "read_bytes", lambda self: refusing_open(self, "rb").read())
    result = _cli("clean", "--input", str(locked), "--output", str(tmp_path / "out"), "--workers", "0",
                  "--no-progress", "--no-decontaminate")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and lines == [f"error: {locked}: cannot read (Permission denied)"], result.output


def test_unreadable_input_is_one_line() -> None:
    prefix = _run_as_nobody()
    if prefix is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    probe = subprocess.run([*prefix, sys.executable, "-c", "import conan_cli"], capture_output=True, cwd="/")
    if probe.returncode != 0:
        pytest.skip("the unprivileged user cannot read this checkout (e.g. a clone in a 0700 temp dir); "
                    "test_unreadable_input_is_one_line_in_process covers the same error")
    shared = Path(tempfile.mkdtemp(prefix="conan-unreadable-"))
    try:
        shared.chmod(0o777)
        locked = shared / "locked.tsv"
        locked.write_text("a\tb\n")
        locked.chmod(0)
        env = {**os.environ, "CONAN_WORK_DIR": str(shared / "work"), "HOME": str(shared)}
        for key in ("HF_HOME", "PREFECT_HOME", "MPLCONFIGDIR", "MTEB_CACHE"):
            env.pop(key, None)
        done = subprocess.run([*prefix, sys.executable, "-m", "conan_cli", "clean", "--input", str(locked),
                               "--output", str(shared / "out"), "--workers", "0", "--no-progress",
                               "--no-decontaminate"],
                              capture_output=True, text=True, env=env, cwd=shared, timeout=300)
        lines = (done.stdout + done.stderr).strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
        assert lines[0] == f"error: {locked}: cannot read (Permission denied)"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_directory_where_a_file_belongs_is_one_line(tmp_path: Path) -> None:
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").mkdir()  # a directory where the corpus file belongs
    (beir / "queries.jsonl").write_text('{"_id": "q", "text": "x"}\n')
    line = _one_line_error(_clean(beir, tmp_path / "o"))
    assert line == f"error: {beir / 'corpus.jsonl'}: cannot read (Is a directory)"
    link = tmp_path / "gone.jsonl"
    link.symlink_to(tmp_path / "nowhere.jsonl")
    line = _one_line_error(_clean(link, tmp_path / "o"))
    assert str(link) in line and "broken symbolic link" in line


def test_unwritable_output_is_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    source = tmp_path / "pairs.tsv"
    source.write_text("what is a cat\ta small animal\n")
    for output in (source, source / "sub"):  # a file where the dir belongs; a dir under a file
        line = _one_line_error(_clean(source, output))
        assert str(output) in line and "cannot write the dataset" in line
    # any OSError of any command: one line
    line = _one_line_error(_cli("model", "init", "--base", str(tiny_model_dir), "--out", str(source / "model")))
    assert str(source) in line and "Not a directory" in line


@pytest.mark.parametrize(("manifest", "message"), [
    ({"schema_version": 1}, "'shards' is missing"),
    ([1, 2], "not a manifest"),
    ({"schema_version": 1, "shards": {}, "quarantine_shards": []}, "'shards' is a JSON object, expected an array"),
    ({"schema_version": 1, "shards": [{"rows": 1, "sha256": "x"}], "quarantine_shards": []}, "'path'"),
    ({"schema_version": 1, "shards": [{"path": "../../x", "rows": 1, "sha256": "x"}], "quarantine_shards": []},
     "inside the dataset"),
    ({"schema_version": 1, "shards": ["data/part-00000.parquet"], "quarantine_shards": []}, "not an object"),
])
def test_malformed_manifest_is_an_integrity_error(tmp_path: Path, manifest: object, message: str) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetIntegrityError, match=message):
        read_manifest(tmp_path)
    with pytest.raises(DatasetIntegrityError):
        read_dataset(tmp_path)


def test_malformed_manifest_is_one_line_in_the_cli(tmp_path: Path, tiny_model_dir: Path) -> None:
    for name, manifest in (("no_shards", {"schema_version": 1}), ("a_list", [])):
        data = tmp_path / name
        data.mkdir()
        (data / "manifest.json").write_text(json.dumps(manifest))
        line = _one_line_error(_cli("mine", "--model", str(tiny_model_dir), "--data", str(data),
                                    "--out", str(tmp_path / f"mined_{name}"), "--workers", "1"))
        assert str(data / "manifest.json") in line
