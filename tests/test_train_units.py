"""Fast unit tests of the training pieces (no Ray): streams, data, tasks + DHNM, checkpoints, metrics."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import write_candidates_for, write_finetune, write_pairs

from conan_core.io.dataset import read_dataset
from conan_core.mining.candidates import CandidateLists
from conan_core.mining.config import DHNMConfig
from conan_core.mining.dhnm import DynamicNegatives
from conan_core.testing import tiny_model
from conan_core.train.batching import BatchStream, TrainDataError, negatives_slice
from conan_core.train.checkpoint import (
    CheckpointError,
    TrainState,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from conan_core.train.config import FinetuneConfig, LayoutConfig, PretrainConfig
from conan_core.train.data import TokenBank, classification_as_retrieval, finetune_tasks
from conan_core.train.loop import lr_at
from conan_core.train.metrics import MetricsLog, plot_losses, read_metrics
from conan_core.train.objective import StepEncoder
from conan_core.train.workload import FinetuneWorkload, PretrainWorkload


def _stream(**kw) -> BatchStream:
    lengths = np.array([random.Random(i).randint(1, 60) for i in range(100)])
    groups = [np.arange(0, 70), np.arange(70, 100)]
    return BatchStream("t", groups, lengths, batch_size=8, **kw)


def test_stream_resume_repeats_and_skips_nothing():
    full = _stream(seed=3)
    expected = [full.next().tolist() for _ in range(30)]  # crosses an epoch boundary (13 batches/epoch)
    first = _stream(seed=3)
    seen = [first.next().tolist() for _ in range(17)]
    resumed = _stream(seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    seen += [resumed.next().tolist() for _ in range(13)]
    assert seen == expected
    assert full.state_dict()["epoch"] == 2
    # every example appears in an epoch (the last batch is topped up from the start)
    epoch = _stream(seed=3).epoch_plan(0)
    assert set(np.concatenate(epoch).tolist()) == set(range(100))


def test_stream_buckets_by_length_and_honours_weights():
    stream = _stream(seed=0, bucket_batches=4)
    plan = stream.epoch_plan(0)
    spread = np.mean([np.ptp(stream.lengths[b]) for b in plan])
    rng = np.random.default_rng(0)
    random_spread = np.mean([np.ptp(stream.lengths[rng.choice(100, 8)]) for _ in range(200)])
    assert spread < 0.5 * random_spread
    weighted = _stream(seed=0, weights=[0.2, 0.8]).epoch_plan(0)
    drawn = np.concatenate(weighted)
    assert abs(np.mean(drawn >= 70) - 0.8) < 0.05  # the small source is upsampled to 80 %
    single = _stream(seed=0, one_group_per_batch=True).epoch_plan(0)
    assert all(len({int(i >= 70) for i in b}) == 1 for b in single)


def test_stream_rejects_empty_task():
    with pytest.raises(TrainDataError, match="no examples"):
        BatchStream("sts", [np.zeros(0)], np.zeros(0), batch_size=4)


def test_negatives_slice_gives_each_group_rank_its_own():
    negs = [f"n{i}" for i in range(6)]
    assert negatives_slice(negs, 0, 3) == ["n0", "n1", "n2"]
    assert negatives_slice(negs, 1, 3) == ["n3", "n4", "n5"]
    assert negatives_slice(negs[:4], 1, 3) == ["n3", None, None]  # empty slots, never a repeated text
    assert negatives_slice(["n0"], 0, 3) == ["n0", None, None]


def test_classification_becomes_retrieval():
    rows = [{"id": f"r{i}", "query": f"text {i}", "label": "ab"[i % 2], "source": "s"} for i in range(6)]
    rows.append({"id": "lonely", "query": "alone", "label": "c", "source": "t"})  # one label only: dropped
    out = classification_as_retrieval(rows, n_negatives=2, seed=0)
    label = {r["query"]: r["label"] for r in rows}
    assert len(out) == 6
    for q, p, negs in zip(out.queries, out.positives, out.negatives, strict=True):
        assert p != q and label[p] == label[q]
        assert len(negs) == 2 and all(label[n] != label[q] for n in negs)


def test_finetune_tasks_split_by_kind(tmp_path: Path):
    table = read_dataset(write_finetune(tmp_path / "d", 10, 7, 9))
    retrieval, sts, counts = finetune_tasks(table, classification_negatives=3)
    assert counts["retrieval"] == 10 and counts["sts"] == 7 and len(sts) == 7
    assert counts["classification_as_retrieval"] + counts["skipped_classification"] == 9
    assert len(retrieval) == 10 + counts["classification_as_retrieval"]


def test_token_bank_pads_to_the_longest_only():
    model = tiny_model()
    bank = TokenBank(model.tokenizer, max_length=16)
    feats = bank.features(["a cat", "the big old dog is good"])
    assert feats["input_ids"].shape[1] == int(feats["attention_mask"].sum(1).max())
    long = bank.features(["cat " * 40])
    assert long["input_ids"].shape[1] == 16


def test_lr_schedule():
    cfg = PretrainConfig(lr=1.0, warmup_ratio=0.1)
    assert lr_at(5, 100, cfg) == pytest.approx(0.5)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0)
    assert 0 < lr_at(100, 100, cfg) < lr_at(50, 100, cfg) < 1.0


def _encoder(model) -> StepEncoder:
    return StepEncoder(model, TokenBank(model.tokenizer, 32), torch.device("cpu"))


def test_pretrain_task_steps_through_weighted_sources(tmp_path: Path):
    a = write_pairs(tmp_path / "a", 30, "srcA")
    b = write_pairs(tmp_path / "b", 10, "srcB")
    model = tiny_model()
    cfg = PretrainConfig(batch_size=4, source_weights={"srcB": 0.5}, one_source_per_step=True)
    task = PretrainWorkload(cfg, [a, b], _encoder(model).bank, _encoder(model))
    result = task.step(1)
    result.objective.backward()
    assert torch.isfinite(result.objective) and len(result.batch_ids) == 4
    with pytest.raises(TrainDataError, match="not in the data"):
        PretrainWorkload(PretrainConfig(source_weights={"nope": 1.0}), [a], _encoder(model).bank, _encoder(model))


def test_finetune_task_with_dhnm_and_vanilla(tmp_path: Path):
    data = write_finetune(tmp_path / "d", 12, 20)
    cands = write_candidates_for(tmp_path / "c", data)
    model = tiny_model()
    encode = _encoder(model)
    cfg = FinetuneConfig(layout=LayoutConfig(retrieval_group=2, sts_workers=1), negatives_per_rank=2,
                         retrieval_batch=3, sts_batch=4)
    dyn = DynamicNegatives(CandidateLists.load(cands), 4, DHNMConfig(check_every=2))
    task = FinetuneWorkload(cfg, [data], encode.bank, encode, dyn=dyn)
    checks = []
    for step in (1, 2):
        result = task.step(step)
        result.objective.backward()
        assert result.losses["loss_retrieval"] is not None and result.losses["loss_sts"] is not None
        assert result.info["neg_scores"].shape == (3, 4)
        checks.append(task.after_step(step, result))
    assert checks[0] == {} and "dhnm_stale_fraction" in checks[1]
    state = task.state_dict()
    assert state["queries"] and all(s["current"][0] is not None for s in state["queries"].values())
    vanilla = FinetuneWorkload(cfg.model_copy(update={"mode": "vanilla"}), [data], encode.bank, encode)
    picked = [vanilla.tasks_for(step) for step in range(1, 30)]
    assert set(picked) == {("retrieval",), ("sts",)}
    assert picked == [vanilla.tasks_for(step) for step in range(1, 30)]  # same draw on every worker
    result = vanilla.step(1)
    assert sum(v is not None for v in result.losses.values()) == 1


def test_finetune_task_needs_sts_data_for_an_sts_rank(tmp_path: Path):
    data = write_finetune(tmp_path / "d", 5, 0)
    model = tiny_model()
    with pytest.raises(TrainDataError, match="sts_workers: 0"):
        FinetuneWorkload(FinetuneConfig(), [data], _encoder(model).bank, _encoder(model))


def test_checkpoint_roundtrip(tmp_path: Path):
    model = tiny_model(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(model.tokenize(["a cat"])).sum().backward()
    opt.step()
    torch.manual_seed(5)
    state = TrainState(step=7, streams={"pairs": {"epoch": 1, "index": 3}}, rng=[rng_state()], dhnm={"x": 1})
    expected_draw = torch.rand(3)
    save_checkpoint(tmp_path / "ck", model, opt, state)
    other = tiny_model(seed=2)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    loaded = load_checkpoint(tmp_path / "ck", other, other_opt)
    assert loaded.step == 7 and loaded.streams == state.streams and loaded.dhnm == {"x": 1}
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert other_opt.state_dict()["state"][0]["step"] == 1
    set_rng_state(loaded.rng[0])
    torch.testing.assert_close(torch.rand(3), expected_draw)
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(tmp_path / "nothing", other, None)


def test_metrics_log_truncates_redone_steps_and_plots(tmp_path: Path):
    log = MetricsLog(tmp_path, tensorboard=True)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step, "loss_sts": 0.5})
    log.close()
    again = MetricsLog(tmp_path, resume_step=3)  # a restart from the step-3 checkpoint
    again.write({"step": 4, "loss": 0.2})
    again.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
