"""`conan run` checks every path and name of its config before a Prefect server or Ray starts (no server,
no Ray here: a start fails the test)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import conan_core.eval.run  # noqa: F401 - imported here, so the timings below are the checks only
import conan_core.model  # noqa: F401
import flows.server
from conan_cli.main import app
from conan_core.config import load_config
from flows.plan import PreflightError, preflight


@pytest.fixture()
def good(tmp_path: Path) -> dict[str, Any]:
    """A config whose every path resolves: small input files, the shipped model, a task folder."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n", encoding="utf-8")
    sts = tmp_path / "sts.tsv"
    sts.write_text("a\tb\t3\n", encoding="utf-8")
    instruct = tmp_path / "chat.jsonl"
    instruct.write_text(json.dumps({"instruction": "say hi", "input": "", "output": "hi"}) + "\n", encoding="utf-8")
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.json").write_text(json.dumps({"name": "TinySTS", "type": "STS", "lang": "zh", "split": "test"}))
    (task / "test.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t1\n", encoding="utf-8")
    return {"data": {"pretrain": [str(pairs)], "finetune": [str(pairs), str(sts)], "instruct": [str(instruct)]},
            "model": {"base": "all-MiniLM-L6-v2", "extend_vocab_from": [str(sts)]},
            "eval": {"task_dirs": [str(task)]}}


def _write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_a_config_whose_paths_resolve_passes(tmp_path: Path, good):
    preflight(load_config(_write(tmp_path, good)))


@pytest.mark.parametrize("change, message", [
    ({"data.pretrain": ["/no/such/pairs.jsonl"]}, "data.pretrain: input '/no/such/pairs.jsonl' not found"),
    ({"data.finetune": ["shared:pairs/no_such_file.jsonl"]},
     "data.finetune: input 'shared:pairs/no_such_file.jsonl' ("),
    ({"data.instruct": ["group:no_such_group"]}, "unknown data group 'no_such_group'"),
    ({"model.extend_vocab_from": ["/no/such/texts.txt"]}, "model.extend_vocab_from: input '/no/such/texts.txt'"),
    ({"model.base": "/no/such/model"}, "model.base: '/no/such/model': model directory not found"),
    ({"eval.tasks": ["NoSuchTask"]}, "eval.tasks: unknown task 'NoSuchTask'"),
    ({"eval.task_dirs": ["<empty dir>"]}, "a task folder needs task.json"),
    ({"eval.task_dirs": ["/no/such/task"]}, "eval.task_dirs: '/no/such/task': task folder not found"),
])
def test_conan_run_rejects_a_bad_path_or_name_before_starting_anything(tmp_path: Path, good, monkeypatch,
                                                                       change, message):
    def no_server(*args, **kwargs):
        raise AssertionError("a Prefect server was started for a config that cannot run")

    monkeypatch.setattr(flows.server, "prefect_api", no_server)
    monkeypatch.setattr(flows.server, "connect_or_start", no_server)
    config = json.loads(json.dumps(good))
    for dotted, value in change.items():
        section, key = dotted.split(".")
        if value == ["<empty dir>"]:
            value = [str(tmp_path / "not_a_task")]
            Path(value[0]).mkdir()
        config[section][key] = value
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["run", "--config", str(_write(tmp_path, config))])
    elapsed = time.perf_counter() - started
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output, result.output
    assert result.output.strip().count("\n") == 0 and "Prefect" not in result.output
    assert elapsed < 5


def test_missing_data_of_a_builtin_eval_task_is_found_first(tmp_path: Path, good, monkeypatch):
    monkeypatch.setenv("CONAN_DATA_DIR", str(tmp_path / "empty"))
    config = {**good, "eval": {"tasks": ["ATEC"]}}
    with pytest.raises(PreflightError, match=r"eval.tasks: data of task 'ATEC' not found"):
        preflight(load_config(_write(tmp_path, config)))


def test_the_flow_runs_the_preflight_before_ray(tmp_path: Path, good, monkeypatch):
    """The flow body (a deployment run does not pass through `conan run`) fails on the same check."""
    import flows.pipeline as pipeline

    monkeypatch.setattr(pipeline, "ray_for_flow", lambda *a, **k: pytest.fail("Ray started"))
    config = {**good, "eval": {"tasks": ["NoSuchTask"]}}
    with pytest.raises(PreflightError, match="unknown task 'NoSuchTask'"):
        pipeline.conan_pipeline.fn(config=str(_write(tmp_path, config)), out_dir=str(tmp_path / "out"))
