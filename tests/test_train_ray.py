"""End-to-end training on Ray Train (2 CPU workers, gloo, tiny model): fault tolerance, exact resume,
DHNM in the loop, outputs. Slow (~30 s per fit), so each run carries many assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_fixtures import save_tiny_model, write_candidates_for, write_finetune, write_pairs

from conan_core.mining.config import DHNMConfig, MiningConfig
from conan_core.model import ConanEmbedder
from conan_core.testing import tiny_model
from conan_core.train.config import FinetuneConfig, LayoutConfig, PretrainConfig
from conan_core.train.data import TokenBank
from conan_core.train.metrics import read_metrics
from conan_core.train.objective import StepEncoder
from conan_core.train.trainer import ray_session, run_finetune, run_pretrain
from conan_core.train.workload import FinetuneWorkload, PretrainWorkload

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    with ray_session():
        yield


def _finetune_ids(config: FinetuneConfig, data: Path, steps: int) -> list[list[str]]:
    model = tiny_model()
    encode = StepEncoder(model, TokenBank(model.tokenizer, config.max_length), torch.device("cpu"))
    task = FinetuneWorkload(config, [data], encode.bank, encode)
    out = []
    for _ in range(steps):
        ids = [task.retrieval.ids[i] for i in task.streams["retrieval"].next()]
        out.append(ids + [task.sts.ids[i] for i in task.streams["sts"].next()])
    return out


def test_finetune_survives_a_worker_crash_and_resumes_exactly(tmp_path: Path, ray_cluster):
    data = write_finetune(tmp_path / "data", 16, 24)
    cands = write_candidates_for(tmp_path / "cand", data)
    model = save_tiny_model(tmp_path / "model")
    config = FinetuneConfig(steps=8, checkpoint_every=2, log_batch_ids=True, retrieval_batch=4, sts_batch=4,
                            negatives_per_rank=2, lr=1e-3, max_failures=1,
                            layout=LayoutConfig(retrieval_group=2, sts_workers=1))
    # 16 queries / batch 4: an epoch ends after step 4, then all lists are re-mined (not after the last step).
    # margin=None: the tiny random model scores every candidate within 5% of the positive, so the default
    # positive-aware guard would re-mine empty lists and steps 5.. would have no hard negatives to track.
    mining = MiningConfig(skip_ranks=2, top_k=20, margin=None,
                          dhnm=DHNMConfig(check_every=2, remine_between_epochs="all"))
    marker = tmp_path / "crashed"
    progress = []
    result = run_finetune(config, [data], model, tmp_path / "out", candidates_dir=cands, mining=mining, workers=2,
                          progress_callback=lambda step, total, m: progress.append((step, total)),
                          fault_injection={"step": 5, "marker": str(marker)})
    assert marker.is_file(), "the worker did not crash: the fault path was not exercised"
    rows = read_metrics(result.metrics_path)
    assert [r["step"] for r in rows] == list(range(1, 9))  # steps 5.. redone once, none twice in the log
    assert [r["batch_ids"] for r in rows] == _finetune_ids(config, data, 8)
    assert result.steps == 8 and progress[-1] == (8, 8)
    assert all(r["loss"] == pytest.approx(r["loss_retrieval"] + 0.8 * r["loss_sts"], rel=1e-4) for r in rows)
    assert any("dhnm_stale_fraction" in r for r in rows)  # DHNM checked every 2 steps
    hardness = [json.loads(line) for line in result.hardness_path.read_text().splitlines()]
    assert {h["kind"] for h in hardness} == {"step", "check"} and result.hardness_plot.is_file()
    assert sorted({h["step"] for h in hardness if h["kind"] == "step"}) == list(range(1, 9))
    assert [r["step"] for r in rows if "dhnm_remined_queries" in r] == [4]
    assert (tmp_path / "out" / "remine" / "step-4" / "candidates" / "manifest.json").is_file()
    trained = ConanEmbedder.load(result.model_dir)
    assert trained.config.stages[-1]["steps"] == 8 and trained.config.stages[-1]["dhnm"] is True
    assert result.plot_path.is_file() and list((tmp_path / "out" / "tensorboard").iterdir())
    assert result.checkpoint is not None


def test_pretrain_rerun_resumes_from_last_checkpoint(tmp_path: Path, ray_cluster):
    a = write_pairs(tmp_path / "a", 24, "srcA")
    b = write_pairs(tmp_path / "b", 16, "srcB", seed=1)
    model = save_tiny_model(tmp_path / "model")
    config = PretrainConfig(steps=4, batch_size=4, checkpoint_every=2, log_batch_ids=True, lr=1e-3,
                            source_weights={"srcB": 0.5})
    first = run_pretrain(config, [a, b], model, tmp_path / "out", workers=2)
    assert first.steps == 4
    progress = []
    second = run_pretrain(config.model_copy(update={"steps": 6}), [a, b], model, tmp_path / "out", workers=2,
                          progress_callback=lambda step, total, m: progress.append(step))
    assert progress == [5, 6]  # resumed after step 4: only new steps reported
    rows = read_metrics(second.metrics_path)
    assert [r["step"] for r in rows] == list(range(1, 7))
    tiny = tiny_model()
    encode = StepEncoder(tiny, TokenBank(tiny.tokenizer, config.max_length), torch.device("cpu"))
    # the plan of 2 workers = one stream with a global batch of 2 * batch_size
    reference = PretrainWorkload(config.model_copy(update={"batch_size": 8}), [a, b], encode.bank, encode)
    expected = [[reference.pairs.ids[i] for i in reference.streams["pairs"].next()] for _ in range(6)]
    assert [r["batch_ids"] for r in rows] == expected
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
