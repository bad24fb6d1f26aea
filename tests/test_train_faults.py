"""Training faults: what the driver checks before Ray starts, what a failed worker's error says, when
checkpoints are written, and what the console says about resuming. The Ray runs are slow-marked."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from train_fixtures import save_tiny_model, write_pairs
from typer.testing import CliRunner

import conan_core.train.trainer as trainer
from conan_cli.main import app
from conan_core.errors import DatasetIntegrityError
from conan_core.train.checkpoint import CheckpointSchedule, checkpoint_interval
from conan_core.train.config import PretrainConfig
from conan_core.train.metrics import METRICS_FILE, STARTS_FILE, read_metrics

# ---- before Ray: datasets and the model are checked in the driver ----------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    return {"data": write_pairs(root / "data", 24, "srcA"), "model": save_tiny_model(root / "model")}


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _shard(dataset: Path) -> Path:
    return next((dataset / "data").glob("*.parquet"))


@pytest.mark.parametrize("damage, message", [
    ("flip_shard_byte", "sha256 does not match the manifest"),
    ("delete_shard", "shard listed in the manifest is missing"),
    ("truncate_manifest", "unreadable manifest"),
    ("truncate_model", "truncated safetensors file"),
    ("model_bad_json", "not valid JSON"),
])
def test_broken_inputs_fail_in_one_line_before_ray_starts(tmp_path: Path, inputs, monkeypatch, damage, message):
    data, model = _copy(inputs["data"], tmp_path / "data"), _copy(inputs["model"], tmp_path / "model")
    if damage == "flip_shard_byte":
        _flip_byte(_shard(data))
    elif damage == "delete_shard":
        _shard(data).unlink()
    elif damage == "truncate_manifest":
        _truncate(data / "manifest.json")
    elif damage == "truncate_model":
        _truncate(model / "model.safetensors")
    else:
        (model / "tokenizer_config.json").write_text('{"do_lower_case": tr')

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for inputs the driver can check")

    monkeypatch.setattr(trainer, "ray_session", no_ray)
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["train", "pretrain", "--data", str(data), "--model", str(model),
                                      "--out", str(tmp_path / "out"), "--steps", "2"])
    elapsed = time.perf_counter() - started
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.startswith("error: ")
    assert result.output.strip().count("\n") == 0  # one line
    assert elapsed < 5


def test_candidates_and_their_corpus_are_checked_before_ray(tmp_path: Path, inputs, monkeypatch):
    from train_fixtures import write_candidates_for, write_finetune

    from conan_core.train.config import FinetuneConfig

    data = write_finetune(tmp_path / "ft", 8, 8)
    cands = write_candidates_for(tmp_path / "cand", data, list_length=5)
    _flip_byte(_shard(tmp_path / "cand" / "corpus"))
    monkeypatch.setattr(trainer, "ray_session", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(DatasetIntegrityError, match="corpus.*sha256 does not match"):
        trainer.run_finetune(FinetuneConfig(steps=2), [data], inputs["model"], tmp_path / "out",
                             candidates_dir=cands)


# ---- a failed worker's own error --------------------------------------------------------------------------


def _worker_group_error(failures: dict[int, Exception]) -> Exception:
    from ray.train.v2.api.exceptions import WorkerGroupError

    return WorkerGroupError("\n".join(f"[Rank {r}]\n{e}" for r, e in failures.items()), failures)


def test_worker_error_line_names_the_worker_exception():
    err = _worker_group_error({0: RuntimeError("[gloo] Connection closed by peer\nmore detail"),
                               1: DatasetIntegrityError("/d/part-0.parquet: sha256 does not match")})
    assert trainer.worker_error_line(err) == ("worker 1: /d/part-0.parquet: sha256 does not match "
                                              "(and 1 other worker)")
    err = _worker_group_error({0: RuntimeError("[gloo] Connection closed by peer"), 1: ValueError("bad value\nline 2")})
    assert trainer.worker_error_line(err) == "worker 1: ValueError: bad value (and 1 other worker)"


class _FakeTrainer:
    """Stands in for TorchTrainer: writes what rank 0's loop writes, then returns or raises."""

    def __init__(self, out: Path, starts: list[dict], rows: list[int], error: Exception | None = None):
        self.out, self.starts, self.rows, self.error = out, starts, rows, error

    def fit(self):
        with open(self.out / STARTS_FILE, "a") as handle:
            for entry in self.starts:
                handle.write(json.dumps(entry) + "\n")
        with open(self.out / METRICS_FILE, "w") as handle:
            for step in self.rows:
                handle.write(json.dumps({"step": step, "total_steps": 40, "loss": 1.0, "lr": 0.1}) + "\n")
        if self.error is not None:
            raise self.error
        return "result"


def test_training_failure_message_is_the_worker_error(tmp_path: Path):
    from conan_core.train.batching import TrainDataError

    error = _worker_group_error({0: TrainDataError("no (query, positive) pairs in the data")})
    with pytest.raises(trainer.TrainingError) as info:
        trainer._fit_with_progress(_FakeTrainer(tmp_path, [], [], error), tmp_path, None)
    assert str(info.value) == "training failed: worker 0: no (query, positive) pairs in the data"


def test_console_says_where_a_run_resumed_and_progress_restarts_there(tmp_path: Path):
    # The case: an earlier attempt logged steps 1..29 and was killed; the checkpoint is at step 20.
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps({"step": s, "total_steps": 40}) + "\n"
                                                 for s in range(1, 30)))
    (tmp_path / STARTS_FILE).write_text(json.dumps({"start_step": 0, "total_steps": 40, "checkpoint": None,
                                                    "checkpoints": "every 20 steps"}) + "\n")
    start = {"start_step": 20, "total_steps": 40, "checkpoint": "/ck/checkpoint_x",
             "checkpoints": "every 20 steps or 600 s"}
    notices, progress = [], []
    fake = _FakeTrainer(tmp_path, [start], list(range(1, 41)))
    trainer._fit_with_progress(fake, tmp_path, lambda s, t, m: progress.append(s), notices.append)
    assert notices == ["resumed from step 20/40 (checkpoint /ck/checkpoint_x); checkpoints every 20 steps or 600 s"]
    assert progress == list(range(21, 41))
    # A fresh start says so, and progress starts at step 1 although the old log went further.
    (tmp_path / STARTS_FILE).unlink()
    notices, progress = [], []
    fresh = {"start_step": 0, "total_steps": 40, "checkpoint": None, "checkpoints": "every 20 steps"}
    trainer._fit_with_progress(_FakeTrainer(tmp_path, [fresh], list(range(1, 41))), tmp_path,
                               lambda s, t, m: progress.append(s), notices.append)
    assert notices == ["starting at step 0/40 (no checkpoint); checkpoints every 20 steps"]
    assert progress == list(range(1, 41))


# ---- when checkpoints are written ------------------------------------------------------------------------


def test_checkpoint_interval_fits_the_run():
    assert checkpoint_interval(60, 40) == 20  # the case: no checkpoint before the end before
    assert checkpoint_interval(10, 40) == 10
    assert checkpoint_interval(50, 1) == 1 and checkpoint_interval(50, 3) == 2
    for every, total in [(60, 40), (50, 7), (1000, 2), (3, 5)]:
        interval = checkpoint_interval(every, total)
        assert [s for s in range(1, total) if s % interval == 0], (every, total)


def test_time_based_checkpoints():
    now = [0.0]
    schedule = CheckpointSchedule(100, 10.0, 1000, clock=lambda: now[0])
    assert schedule.interval == 100
    assert not schedule.due(1)
    now[0] = 10.0
    assert not schedule.due(2, timed=False)  # only checked at logged steps
    assert schedule.due(3)
    schedule.done()
    now[0] = 15.0
    assert not schedule.due(4) and schedule.due(100) and schedule.due(1000)
    assert not CheckpointSchedule(100, None, 1000, clock=lambda: 1e9).due(5)
    assert schedule.describe() == "every 100 steps or 10 s"


# ---- real Ray Train runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    from conan_core.raysession import ray_session

    with ray_session():
        yield


def _losses(path: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(path)}


@pytest.mark.slow
def test_crashed_run_resumes_below_the_configured_interval_exactly(tmp_path: Path, inputs, ray_cluster):
    """checkpoint_every (50) above the run's 6 steps: a checkpoint at step 3 all the same. A run killed at
    step 5 and rerun resumes from it (and says so), a second crash restarts from it under FailureConfig,
    and every loss equals the uninterrupted run's."""
    data, model = inputs["data"], inputs["model"]
    config = PretrainConfig(steps=6, batch_size=4, lr=1e-3, checkpoint_every=50, max_failures=0)
    crash = {"step": 5, "marker": str(tmp_path / "crashed-1")}
    with pytest.raises(trainer.TrainingError, match=r"training failed: worker 1: ") as info:
        trainer.run_pretrain(config, [data], model, tmp_path / "out", workers=2, fault_injection=crash,
                             notice_callback=lambda m: None)
    assert "\n" not in str(info.value) and "process has died" in str(info.value)
    assert (tmp_path / "crashed-1").is_file()

    notices, progress = [], []
    again = {"step": 5, "marker": str(tmp_path / "crashed-2")}
    result = trainer.run_pretrain(config.model_copy(update={"max_failures": 1}), [data], model, tmp_path / "out",
                                  workers=2, fault_injection=again, notice_callback=notices.append,
                                  progress_callback=lambda s, t, m: progress.append(s))
    assert (tmp_path / "crashed-2").is_file()
    assert notices[0].startswith("resumed from step 3/6 (checkpoint "), notices
    assert notices[1].startswith("restarted after a worker failure: resumed from step 3/6 (checkpoint "), notices
    assert len(notices) == 2 and "every 3 steps or 600 s" in notices[0]
    assert progress[0] == 4 and progress[-3:] == [4, 5, 6]

    # Uninterrupted, with a time-based checkpoint at every step (keep them all to count them).
    reference_notices = []
    reference = trainer.run_pretrain(config.model_copy(update={"checkpoint_every_s": 1e-6, "keep_checkpoints": 10}),
                                     [data], model, tmp_path / "ref", workers=2,
                                     notice_callback=reference_notices.append)
    assert reference_notices == ["starting at step 0/6 (no checkpoint); checkpoints every 3 steps or 1e-06 s"]
    assert len([d for d in (tmp_path / "ref" / "checkpoints" / "pretrain").glob("checkpoint_*") if d.is_dir()]) == 6
    assert [r["step"] for r in read_metrics(result.metrics_path)] == list(range(1, 7))
    assert _losses(result.metrics_path) == _losses(reference.metrics_path)


@pytest.mark.slow
def test_a_failing_worker_shows_its_own_error(tmp_path: Path, inputs, ray_cluster):
    config = PretrainConfig(steps=2, batch_size=4, max_failures=0, source_weights={"nosuchsource": 1.0})
    with pytest.raises(trainer.TrainingError) as info:
        trainer.run_pretrain(config, [inputs["data"]], inputs["model"], tmp_path / "out", workers=1)
    assert "worker 0: source_weights names sources not in the data: nosuchsource" in str(info.value)
    assert "\n" not in str(info.value)
