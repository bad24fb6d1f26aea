"""Config composition, overrides, and the train CLI's validation (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conan_cli.main import app
from conan_core.config import ConfigError, load_config, load_section
from conan_core.train.config import FinetuneConfig, PretrainConfig


def test_pipeline_config_defaults_are_the_papers():
    config = load_config(None)
    assert (config.pretrain.lr, config.pretrain.warmup_ratio, config.pretrain.weight_decay) == (1e-5, 0.05, 0.001)
    assert (config.finetune.retrieval_batch, config.finetune.sts_batch, config.finetune.beta) == (32, 32, 0.8)
    assert config.finetune.in_batch_negatives  # >= 32 candidates per query, as MNRL at batch 32


def test_yaml_and_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  lr: 0.001\n  steps: 10\nfinetune:\n  layout: {retrieval_group: 3}\n")
    config = load_config(path, ["pretrain.steps=20", "finetune.mode=vanilla", "data.pretrain=[a, b]"])
    assert config.pretrain.lr == 1e-3 and config.pretrain.steps == 20
    assert config.finetune.layout.retrieval_group == 3 and config.finetune.mode == "vanilla"
    assert config.data.pretrain == ["a", "b"]
    section = load_section(FinetuneConfig, "finetune", path, {"beta": 0.5})
    assert section.layout.retrieval_group == 3 and section.beta == 0.5
    alone = tmp_path / "p.yaml"
    alone.write_text("batch_size: 16\n")
    assert load_section(PretrainConfig, "pretrain", alone).batch_size == 16


@pytest.mark.parametrize("override, message", [
    (["pretrain.lrr=1"], "pretrain.lrr: Extra inputs"),
    (["finetune.mode=sometimes"], "finetune.mode"),
    (["pretrain.batch_size=0"], "pretrain.batch_size"),
    (["nonsense"], "not of the form"),
])
def test_bad_config_is_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, override)
    assert "\n" not in str(info.value)


def test_cli_reports_bad_input_in_one_line(tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "pretrain", "--data", str(tmp_path), "--model", "all-MiniLM-L6-v2",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no manifest.json" in result.output
    result = runner.invoke(app, ["train", "finetune", "--data", str(tmp_path), "--model", "x", "--out",
                                 str(tmp_path / "o"), "--set", "layout.sts_workers=-1"])
    assert result.exit_code == 2 and "layout.sts_workers" in result.output


def test_train_spec_is_typed_and_checks_its_stage(tmp_path: Path):
    """The driver's one validated hand-off to the Ray Train workers (train/spec.py)."""
    import pickle

    from pydantic import ValidationError

    from conan_core.mining.config import MiningConfig
    from conan_core.train.spec import TrainSpec

    paths = {"data_dirs": [tmp_path / "data"], "model_path": tmp_path / "model", "out_dir": tmp_path / "out"}
    finetune = FinetuneConfig(steps=3, lr=2e-5)
    spec = TrainSpec(stage="finetune", config=finetune, mining=MiningConfig(top_k=7),
                     candidates_dir=tmp_path / "cands", **paths)
    assert spec.config is finetune  # handed on as it is, not re-parsed
    again = pickle.loads(pickle.dumps({"spec": spec}))["spec"]  # what Ray does to train_loop_config
    assert again == spec and isinstance(again.config, FinetuneConfig) and again.mining_config.top_k == 7
    assert TrainSpec(stage="pretrain", config=PretrainConfig(), **paths).mining_config == MiningConfig()
    # a dict config is parsed as the stage's model, whatever a plain union would pick
    parsed = TrainSpec.model_validate({"stage": "finetune", "config": {"steps": 2}, **paths})
    assert type(parsed.config) is FinetuneConfig
    with pytest.raises(ValidationError, match="a pretrain spec needs a PretrainConfig"):
        TrainSpec(stage="pretrain", config=finetune, **paths)
    with pytest.raises(ValidationError, match="finetuning inputs"):
        TrainSpec(stage="pretrain", config=PretrainConfig(), candidates_dir=tmp_path, **paths)
    with pytest.raises(ValidationError):
        TrainSpec(stage="finetune", config=finetune, extra_key=1, **paths)


def test_default_workers_one_per_gpu_else_one_per_node(monkeypatch) -> None:
    import ray

    from conan_core.train.trainer import default_workers

    node = {"Alive": True, "Resources": {"CPU": 2.0}}
    monkeypatch.setattr(ray, "nodes", lambda: [node, node, {"Alive": False, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    assert default_workers(PretrainConfig()) == 2  # two live CPU nodes: one worker each, all its threads
    monkeypatch.setattr(ray, "nodes", lambda: [node])
    assert default_workers(PretrainConfig()) == 1  # this machine: one 2-thread worker, not two 1-thread ones
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    assert default_workers(PretrainConfig()) == 8
    assert default_workers(FinetuneConfig()) == 3  # at most the layout's logical ranks
