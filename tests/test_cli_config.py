"""The stage commands build their settings with the config loader: `--config FILE` (a pipeline YAML or the
section alone), `--set key=value` (relative to the section), then the shortcut options the user gave.
No training, mining or evaluation runs here: the section builders are called directly, and the CLI tests
stub the stage's entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conan_cli.data_cmd import clean_section, data_workers, extract_section
from conan_cli.eval_cmd import default_output, eval_section
from conan_cli.main import app
from conan_cli.mine_cmd import mining_section
from conan_cli.train_cmd import finetune_sections
from conan_core.config import ConfigError


@pytest.fixture
def pipeline_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text("data: {workers: 3}\n"
                    "clean: {max_chars: 500, minhash_threshold: 0.8}\n"
                    "extract: {context_turns: 2, clean: {max_chars: 900}}\n"
                    "mining: {top_k: 40, workers: 2, dhnm: {check_every: 7, factor: 1.3}}\n"
                    "finetune: {steps: 11, layout: {retrieval_group: 4}}\n"
                    "eval: {max_pairs: 300, tasks: [ATEC]}\n")
    return path


def test_defaults_are_the_models(tmp_path: Path):
    from conan_core.clean.config import CleanConfig, ExtractConfig
    from conan_core.eval.config import EvalConfig
    from conan_core.mining.config import MiningConfig

    assert mining_section() == MiningConfig()
    assert clean_section() == CleanConfig()
    assert extract_section() == ExtractConfig()
    assert eval_section() == EvalConfig()
    assert data_workers(None, None) == 2


def test_mine_config_set_and_shortcuts(pipeline_yaml: Path, tmp_path: Path):
    cfg = mining_section(pipeline_yaml, ["dhnm.check_every=20", "index=ivf"])
    assert (cfg.top_k, cfg.workers, cfg.index) == (40, 2, "ivf")
    assert (cfg.dhnm.check_every, cfg.dhnm.factor) == (20, 1.3)  # a dotted --set keeps the YAML's siblings
    # An explicit shortcut wins over --set and the YAML; --no-margin is margin=null.
    cfg = mining_section(pipeline_yaml, ["top_k=5"], top_k=9, workers=1, no_margin=True)
    assert (cfg.top_k, cfg.workers, cfg.margin) == (9, 1, None)
    alone = tmp_path / "mining.yaml"
    alone.write_text("skip_ranks: 3\n")
    assert mining_section(alone).skip_ranks == 3


def test_clean_and_extract_config_set_and_shortcuts(pipeline_yaml: Path, tmp_path: Path):
    cfg = clean_section(pipeline_yaml, ["near_dedup=false", "langs=[zh]"])
    assert (cfg.max_chars, cfg.minhash_threshold, cfg.near_dedup, cfg.langs) == (500, 0.8, False, ["zh"])
    cfg = clean_section(pipeline_yaml, ["max_chars=100"], max_chars=200, lang=["en"], t2s=True,
                        no_decontaminate=True, min_score=0.5)
    assert (cfg.max_chars, cfg.langs, cfg.traditional_to_simplified) == (200, ["en"], True)
    assert (cfg.decontaminate, cfg.min_teacher_score) == (False, 0.5)
    assert data_workers(pipeline_yaml, None) == 3 and data_workers(pipeline_yaml, 0) == 0
    cfg = extract_section(pipeline_yaml, ["clean.max_tokens=77"], keep_refusals=True)
    assert (cfg.context_turns, cfg.clean.max_chars, cfg.clean.max_tokens, cfg.drop_refusals) == (2, 900, 77, False)
    alone = tmp_path / "clean.yaml"
    alone.write_text("max_tokens: 64\n")
    assert clean_section(alone).max_tokens == 64 and data_workers(alone, None) == 2


def test_eval_config_set_and_shortcuts(pipeline_yaml: Path, tmp_path: Path):
    cfg = eval_section(pipeline_yaml, ["max_docs=50", "seed=3"])
    assert (cfg.max_pairs, cfg.max_docs, cfg.seed, cfg.tasks) == (300, 50, 3, ["ATEC"])
    cfg = eval_section(pipeline_yaml, ["max_pairs=10"], max_pairs=20, tasks=["STSB,quick"], task_dir=[tmp_path])
    assert (cfg.max_pairs, cfg.tasks, cfg.task_dirs) == (20, ["STSB", "quick"], [tmp_path])


def test_finetune_mining_override_reaches_the_spec(pipeline_yaml: Path, tmp_path: Path, monkeypatch):
    import conan_core.train.trainer as trainer
    from tests.train_fixtures import save_tiny_model, write_finetune

    cfg, mining = finetune_sections(pipeline_yaml, ["layout.sts_workers=0"], ["dhnm.check_every=20"], steps=12)
    assert (cfg.steps, cfg.layout.retrieval_group, cfg.layout.sts_workers) == (12, 4, 0)
    assert (mining.top_k, mining.dhnm.check_every, mining.dhnm.factor) == (40, 20, 1.3)
    alone = tmp_path / "finetune.yaml"
    alone.write_text("lr: 0.001\n")  # a finetune-only YAML: mining keeps its defaults
    cfg, mining = finetune_sections(alone, None, ["top_k=8"])
    assert cfg.lr == 1e-3 and mining.top_k == 8 and mining.dhnm.check_every == 100

    seen = {}
    monkeypatch.setattr(trainer, "_run", lambda spec, *args, **kw: seen.setdefault("spec", spec))
    monkeypatch.setattr("conan_cli.train_cmd._report", lambda result: None)
    data = write_finetune(tmp_path / "data", 4, 0)
    model = save_tiny_model(tmp_path / "model")
    result = CliRunner().invoke(app, ["train", "finetune", "--data", str(data), "--model", str(model), "--out",
                                      str(tmp_path / "out"), "--config", str(pipeline_yaml),
                                      "--mining-set", "dhnm.check_every=20", "--set", "steps=5"])
    assert result.exit_code == 0, result.output
    spec = seen["spec"]  # the typed TrainSpec the Ray Train workers get
    assert spec.mining.dhnm.check_every == 20 and spec.mining.top_k == 40
    assert spec.config.steps == 5


@pytest.mark.parametrize("argv, key", [
    (["mine", "--model", "m", "--data", "d", "--out", "o", "--set", "topk=3"], "[mining]: topk"),
    (["clean", "--input", "x.jsonl", "--output", "o", "--set", "max_char=3"], "[clean]: max_char"),
    (["extract", "--input", "x.jsonl", "--output", "o", "--set", "clean.nope=1"], "[extract]: clean.nope"),
    (["eval", "--model", "m", "--set", "max_pair=3"], "[eval]: max_pair"),
    (["train", "finetune", "--data", "d", "--model", "m", "--out", "o", "--mining-set", "dhnm.nope=1"],
     "[mining]: dhnm.nope"),
])
def test_unknown_set_key_is_one_line(argv: list[str], key: str):
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0] and "Extra inputs" in lines[0]


def test_unknown_set_key_direct():
    with pytest.raises(ConfigError, match=r"\[mining\]: nope: Extra inputs"):
        mining_section(None, ["nope=1"])


def test_bad_shortcut_value_names_the_key():
    with pytest.raises(ConfigError, match=r"\[mining\]: index"):
        mining_section(None, index="hnsw")


def test_eval_without_output_writes_under_the_work_dir(tmp_path: Path, monkeypatch, pipeline_yaml: Path):
    import conan_core.eval.run as run

    monkeypatch.setenv("CONAN_WORK_DIR", str(tmp_path / "work"))
    calls = {}

    def fake_run_eval(model, *, tasks, task_dirs, output, config, on_task):
        calls.update(model=model, output=output, config=config)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps({"tasks": []}))
        return {"tasks": []}

    monkeypatch.setattr(run, "run_eval", fake_run_eval)
    monkeypatch.setattr(run, "format_table", lambda result: "| task |")
    model = tmp_path / "runs" / "finetune" / "model"
    result = CliRunner().invoke(app, ["eval", "--model", str(model), "--config", str(pipeline_yaml),
                                      "--set", "seed=5", "--max-pairs", "9"])
    assert result.exit_code == 0, result.output
    expected = (tmp_path / "work").resolve() / "eval" / "finetune-model.json"
    assert calls["output"] == expected and expected.is_file()
    assert "| task |" in result.output and f"results written to {expected}" in result.output
    assert (calls["config"].seed, calls["config"].max_pairs, calls["config"].tasks) == (5, 9, ["ATEC"])
    assert default_output(tmp_path / "mini") == (tmp_path / "work").resolve() / "eval" / "mini.json"
