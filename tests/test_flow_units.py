"""Fast checks of the orchestration helpers (no Prefect server, no Ray)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conan_core.errors import ConanError
from flows.server import api_is_healthy, free_port
from tasks.artifacts import artifact_key, points_table_markdown
from tasks.cache import (
    StageOutputError,
    fingerprint_path,
    fingerprint_paths,
    output_is_intact,
    retry_unless_bad_input,
    stage_output,
)
from tasks.clean import counts_by_reason


def _model_dir(root: Path) -> Path:
    (root / "1_Pooling").mkdir(parents=True)
    (root / "config.json").write_text('{"hidden": 32}')
    (root / "1_Pooling" / "config.json").write_text('{"mode": "mean"}')
    return root


def test_dataset_dir_is_fingerprinted_by_its_manifest(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "part-00000.parquet").write_bytes(b"shard bytes")
    manifest = json.dumps({"shards": [{"sha256": "abc"}]}).encode()
    (tmp_path / "manifest.json").write_bytes(manifest)
    assert fingerprint_path(tmp_path) == hashlib.sha256(manifest).hexdigest()


def test_model_dir_fingerprint_follows_every_file(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "model")
    before = fingerprint_path(model)
    assert fingerprint_path(model) == before
    (model / "1_Pooling" / "config.json").write_text('{"mode": "cls"}')
    assert fingerprint_path(model) != before
    (model / "1_Pooling" / "config.json").write_text('{"mode": "mean"}')
    assert fingerprint_path(model) == before
    (model / "config.json").rename(model / "config2.json")  # same bytes, other name
    assert fingerprint_path(model) != before


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StageOutputError, match="does not exist"):
        fingerprint_path(tmp_path / "nope")


def test_fingerprint_paths_depends_on_order_and_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one")
    b.write_text("two")
    assert fingerprint_paths([a, b]) != fingerprint_paths([b, a])
    first = fingerprint_paths([a, b])
    b.write_text("three")
    assert fingerprint_paths([a, b]) != first


def test_output_is_intact_detects_deleted_and_changed_outputs(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "model")
    result = stage_output(model, steps=3)
    assert result["steps"] == 3 and Path(result["path"]).is_absolute()
    assert output_is_intact(result)
    (model / "config.json").write_text('{"hidden": 64}')
    assert not output_is_intact(result)
    result = stage_output(model)
    for file in sorted(model.rglob("*"), reverse=True):
        file.unlink() if file.is_file() else file.rmdir()
    model.rmdir()
    assert not output_is_intact(result)
    assert not output_is_intact(None)


def test_counts_by_reason_lists_every_source_and_reason() -> None:
    counts = {"kept": 5, "dropped": 3, "dropped_by_reason": {"duplicate": 2, "empty_side": 1}, "skipped": 0,
              "sources": {"afqmc": {"kept": 5, "skipped": 0, "dropped": {"duplicate": 2}},
                          "csl": {"kept": 0, "skipped": 4, "dropped": {"empty_side": 1}}}}
    rows = {(r["source"], r["outcome"]): r["count"] for r in counts_by_reason(counts)}
    assert rows == {("afqmc", "kept"): 5, ("afqmc", "dropped: duplicate"): 2, ("csl", "kept"): 0,
                    ("csl", "skipped"): 4, ("csl", "dropped: empty_side"): 1, ("ALL", "kept"): 5,
                    ("ALL", "dropped: duplicate"): 2, ("ALL", "dropped: empty_side"): 1}


def test_counts_without_sources_fall_back_to_flat_rows() -> None:
    rows = counts_by_reason({"queries": 4, "actors": {"restarts": 1}})
    assert {(r.get("level_1", ""), r["name"], r["count"]) for r in rows} == {("", "queries", 4),
                                                                           ("actors", "restarts", 1)}


def test_points_table_keeps_first_and_last_point() -> None:
    rows = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(100)]
    markdown = points_table_markdown("loss", rows, ["step", "loss"], max_rows=10)
    body = [line for line in markdown.splitlines() if line.startswith("| ") and "step" not in line]
    assert body[0].startswith("| 0 |") and body[-1].startswith("| 99 |")
    assert len(body) <= 11


def test_artifact_keys_are_lowercase_dashes() -> None:
    assert artifact_key("clean", "Pretrain_Pairs", "counts") == "clean-pretrain-pairs-counts"


def test_bad_input_is_not_retried_but_other_failures_are() -> None:
    assert not retry_unless_bad_input(None, None, SimpleNamespace(data=ConanError("missing task dir")))
    assert retry_unless_bad_input(None, None, SimpleNamespace(data=RuntimeError("node lost")))


def test_health_probe_of_a_closed_port_is_false() -> None:
    assert not api_is_healthy(f"http://127.0.0.1:{free_port()}/api", timeout_s=0.5)


def test_shared_inputs_resolve_against_the_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flows.plan import resolve_input

    monkeypatch.setenv("CONAN_DATA_DIR", str(tmp_path))
    assert resolve_input("shared:pairs/a.jsonl") == str(tmp_path.resolve() / "pairs" / "a.jsonl")
    assert resolve_input("group:finetune") == "group:finetune"
    assert resolve_input("/abs/file.tsv") == "/abs/file.tsv"


def test_missing_config_is_a_one_line_error(tmp_path: Path) -> None:
    from flows.pipeline import resolve_config_path

    with pytest.raises(ConanError, match="config file not found"):
        resolve_config_path(tmp_path / "nope.yaml")


def test_conan_run_rejects_a_bad_config_before_starting_anything(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from conan_cli.main import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  stpes: 3\n")
    result = CliRunner().invoke(app, ["run", "--config", str(bad)])
    assert result.exit_code == 2
    assert "pretrain.stpes" in result.output and "Prefect" not in result.output
