"""Gradient caching (`train/grad_cache.py`) gives the plain step's loss and every parameter's gradient.

Pretraining (in-batch InfoNCE) and the CBB step (in-batch and hard negatives with an empty, masked slot,
and STS), Matryoshka on, the tiny BERT in train mode with dropout on; one process, two gloo workers, and
through the loop's `train_step`. Tolerance 1e-5 throughout.

With dropout on, a plain step over the whole batch draws other masks than a forward split into chunks, so
the multi-chunk comparisons are against the plain step whose forward is split into the same chunks
(`ChunkedGraph`: one graph, one backward; the same RNG draws as GradCache's first pass). The one-chunk
case and the dropout-free case are compared with the unmodified plain `StepEncoder`.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import ValidationError
from train_fixtures import write_finetune, write_pairs

from conan_core.losses.matryoshka import MatryoshkaLoss
from conan_core.testing import tiny_model
from conan_core.train import grad_cache
from conan_core.train.batching import assign_roles
from conan_core.train.config import FinetuneConfig, LayoutConfig, PretrainConfig
from conan_core.train.data import TokenBank
from conan_core.train.loop import make_encoder, make_optimizer, train_step
from conan_core.train.objective import (
    CbbShape,
    CbbWorkerBatch,
    StepEncoder,
    average_gradients,
    cbb_objective,
    pretrain_objective,
)
from conan_core.train.workload import FinetuneWorkload, PretrainWorkload

TOL = {"rtol": 1e-5, "atol": 1e-5}
DROPOUT, SEED = 0.1, 123
MRL = MatryoshkaLoss([8, 32])
QUERIES = ["what is a cat", "how big is the city", "why is water good", "who has a new car", "the old book"]
POSITIVES = ["a cat is small", "the city is big", "water is good for a tree", "a new car for the dog",
             "an old book of music"]
LAYOUT = LayoutConfig(retrieval_group=2, sts_workers=1)
B, N_PER_RANK, STS = 3, 2, 4
# Group rank 1's last slot of query 2 is empty (its list was short): "" is encoded there and masked.
NEGATIVES = {0: [["a dog", "the car"], ["a book", "old house"], ["bad food", "new music"]],
             1: [["big tree", "the city"], ["what music", "small car"], ["a good book", ""]]}
NEG_MASK = torch.tensor([[False] * 4, [False] * 4, [False, False, False, True]])
STS_PAIRS = (["a cat", "the dog", "new car", "old book"], ["a small cat", "a dog", "a tree", "old books"],
             [5.0, 3.0, 0.0, 4.0])


@dataclass
class ChunkedGraph(StepEncoder):
    """The plain step (one graph over the whole batch, one backward) with its forward split into chunks
    of `chunk` texts: the same dropout masks as GradCache's, so the reference when dropout is on."""

    chunk: int = 2

    def __call__(self, texts):
        return torch.cat([self.forward(self.features(texts[i:i + self.chunk]))
                          for i in range(0, len(texts), self.chunk)])


@dataclass
class Step:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor | None]
    rng_after: torch.Tensor  # the next draws of the RNG after the step
    tokens: int
    terms: dict[str, torch.Tensor | None]


def _model(dropout: float = DROPOUT):
    model = tiny_model(seed=0, dropout=dropout)
    model.train()
    return model


def _encoder(model, chunk: int | None = None, reference_chunk: int | None = None) -> StepEncoder:
    bank = TokenBank(model.tokenizer, 32)
    if reference_chunk is not None:
        return ChunkedGraph(model, bank, torch.device("cpu"), chunk=reference_chunk)
    return StepEncoder(model, bank, torch.device("cpu"), grad_cache_chunk=chunk)


def _run(encode: StepEncoder, objective: Callable[[StepEncoder], tuple[torch.Tensor, dict]], seed: int = SEED) -> Step:
    """One step's objective and backward from a fixed RNG state, the gradients averaged over workers."""
    torch.manual_seed(seed)
    loss, terms = objective(encode)
    encode.backward(loss)
    params = list(encode.model.parameters())
    average_gradients(params)
    grads = {name: (p.grad.clone() if p.grad is not None else None) for name, p in encode.model.named_parameters()}
    return Step(loss.detach(), grads, torch.rand(4), encode.tokens, terms)


def _pretrain(queries=QUERIES, positives=POSITIVES):
    def objective(encode: StepEncoder):
        return pretrain_objective(encode, queries, positives, temperature=0.05, matryoshka=MRL), {}
    return objective


def _cbb_batch(roles) -> CbbWorkerBatch:
    batch = CbbWorkerBatch(neg_mask=NEG_MASK)
    if roles.retrieval_ranks:
        batch.queries, batch.positives = QUERIES[:B], POSITIVES[:B]
        batch.negatives = {g: NEGATIVES[g] for g in roles.retrieval_ranks}
    batch.sts = {s: STS_PAIRS for s in roles.sts_ranks}
    return batch


def _cbb(world: int = 1, rank: int = 0):
    def objective(encode: StepEncoder):
        roles = tuple(assign_roles(LAYOUT, world))
        shape = CbbShape(roles, B, N_PER_RANK, STS, encode.model.dim)
        out = cbb_objective(encode, _cbb_batch(roles[rank]), shape, temperature=0.05, beta=0.8, scale=20.0,
                            in_batch=True, matryoshka=MRL)
        return out.objective, {"ret": out.retrieval_loss, "sts": out.sts_loss, "neg_scores": out.neg_scores}
    return objective


def _assert_same_step(got: Step, want: Step, *, rng: bool = True) -> None:
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    assert got.grads.keys() == want.grads.keys()
    for name, grad in want.grads.items():
        assert grad is not None and got.grads[name] is not None, name  # every parameter takes part
        torch.testing.assert_close(got.grads[name], grad, **TOL, msg=name)
    for name, term in want.terms.items():
        if term is None:
            assert got.terms[name] is None, name
        else:
            torch.testing.assert_close(got.terms[name], term, **TOL, equal_nan=True, msg=name)
    if rng:  # the step leaves the RNG where the plain step leaves it
        torch.testing.assert_close(got.rng_after, want.rng_after, rtol=0, atol=0)


def _count_forwards(model: torch.nn.Module) -> list[int]:
    """A list that grows by one at every forward pass of the model."""
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _max_grad_difference(a: Step, b: Step) -> float:
    return max(float((a.grads[n] - b.grads[n]).abs().max()) for n in a.grads)


def test_the_knob_is_validated_and_documented():
    assert PretrainConfig().grad_cache_chunk is None and FinetuneConfig(grad_cache_chunk=16).grad_cache_chunk == 16
    with pytest.raises(ValidationError):
        PretrainConfig(grad_cache_chunk=0)
    assert "GradCache" in PretrainConfig.model_fields["grad_cache_chunk"].description


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_pretrain_step_equals_the_plain_step_with_dropout(chunk):
    want = _run(_encoder(_model(), reference_chunk=chunk), _pretrain())
    got = _run(_encoder(_model(), chunk=chunk), _pretrain())
    _assert_same_step(got, want)
    assert got.tokens == want.tokens  # each text counted once, not again in the replay


def test_with_gradient_checkpointing_as_well():
    """The replay under gradient checkpointing (whose recomputation restores its own RNG state)."""
    models = [_model(), _model()]
    for model in models:
        model.encoder.gradient_checkpointing_enable()
    want = _run(_encoder(models[0], reference_chunk=2), _pretrain())
    got = _run(_encoder(models[1], chunk=2), _pretrain())
    _assert_same_step(got, want)


def test_cbb_step_equals_the_plain_step_with_dropout():
    want = _run(_encoder(_model(), reference_chunk=2), _cbb())
    got = _run(_encoder(_model(), chunk=2), _cbb())
    _assert_same_step(got, want)
    assert got.terms["ret"] is not None and got.terms["sts"] is not None
    assert torch.isnan(got.terms["neg_scores"][2, 3])  # the masked slot


@pytest.mark.parametrize("objective", [_pretrain(), _cbb()], ids=["pretrain", "cbb"])
def test_one_chunk_per_call_is_exactly_the_unmodified_plain_step(objective):
    """A chunk at least as large as every encode call: the same batches and RNG draws as the plain
    StepEncoder, so with dropout on it matches the unmodified plain step."""
    want = _run(_encoder(_model()), objective)
    got = _run(_encoder(_model(), chunk=64), objective)
    _assert_same_step(got, want)


@pytest.mark.parametrize("objective", [_pretrain(), _cbb()], ids=["pretrain", "cbb"])
def test_without_dropout_chunks_equal_the_unmodified_plain_step(objective):
    """Chunks pad to their own longest text; without dropout that changes nothing."""
    want = _run(_encoder(_model(dropout=0.0)), objective)
    got = _run(_encoder(_model(dropout=0.0), chunk=2), objective)
    _assert_same_step(got, want)


def test_the_comparisons_see_dropout_and_need_the_saved_rng_state(monkeypatch):
    """Guards against a vacuous pass: dropout changes the gradients, and a replay that does not restore
    each chunk's RNG state gets other masks and other gradients."""
    want = _run(_encoder(_model(), reference_chunk=2), _pretrain())
    other_seed = _run(_encoder(_model(), reference_chunk=2), _pretrain(), seed=SEED + 1)
    assert _max_grad_difference(want, other_seed) > 1e-3

    @contextmanager
    def not_restored(self):
        yield

    monkeypatch.setattr(grad_cache.RngState, "replayed", not_restored)
    unrestored = _run(_encoder(_model(), chunk=2), _pretrain())
    assert _max_grad_difference(unrestored, want) > 1e-3


def test_encoding_keeps_no_graph_and_an_objective_without_grad_replays_nothing():
    model = _model()
    forwards = _count_forwards(model)
    encode = _encoder(model, chunk=2)
    embeddings = encode(QUERIES)  # 5 texts: 3 chunks
    assert len(forwards) == 3 and embeddings.requires_grad and embeddings.grad_fn is None
    encode.backward(torch.zeros(()))  # a worker with no part in the step
    assert len(forwards) == 3 and all(p.grad is None for p in model.parameters())


# --- two gloo workers -----------------------------------------------------------------------------------

PAIRS_PER_RANK = 2  # pretraining: 2 workers x 2 pairs (QUERIES[:4])


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Under GradCache (chunk 1 for pretraining, 2 for CBB), this worker's share of both steps."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mine = slice(rank * PAIRS_PER_RANK, (rank + 1) * PAIRS_PER_RANK)
        pretrain = _pretrain(QUERIES[mine], POSITIVES[mine])
        steps = {"pretrain": _run(_encoder(_model(dropout=0.0), chunk=1), pretrain),
                 "cbb": _run(_encoder(_model(dropout=0.0), chunk=2), _cbb(world, rank))}
        for step in steps.values():
            dist.all_reduce(step.loss)
            step.loss /= world  # the global loss is the workers' mean (see the losses' docstrings)
        torch.save({name: {"loss": s.loss, "grads": s.grads, "terms": s.terms} for name, s in steps.items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_with_grad_cache_equal_one_plain_process():
    """The plain step on one process over the global batch (dropout off: each worker draws its own
    masks) against GradCache on 2 workers, whose loss gathers embeddings with autograd."""
    want = {"pretrain": _run(_encoder(_model(dropout=0.0)), _pretrain(QUERIES[:4], POSITIVES[:4])),
            "cbb": _run(_encoder(_model(dropout=0.0)), _cbb())}
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_gloo_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True,
                           start_method="spawn")
        results = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank, result in enumerate(results):
        for name, step in want.items():
            got = Step(result[name]["loss"], result[name]["grads"], step.rng_after, 0, {})
            _assert_same_step(got, Step(step.loss, step.grads, step.rng_after, 0, {}), rng=False)
        # worker 0 hosts group rank 0 and the STS rank, worker 1 group rank 1: both see the global L_ret
        torch.testing.assert_close(result["cbb"]["terms"]["ret"], want["cbb"].terms["ret"], **TOL)
        assert (result["cbb"]["terms"]["sts"] is None) == (rank == 1)


# --- through the loop -----------------------------------------------------------------------------------

def _stage(stage: str, data: Path, chunk: int | None):
    if stage == "pretrain":
        config = PretrainConfig(batch_size=8, steps=2, lr=1e-3, grad_cache_chunk=chunk)
        return config, lambda encode: PretrainWorkload(config, [data], encode.bank, encode)
    config = FinetuneConfig(retrieval_batch=4, sts_batch=4, negatives_per_rank=2, steps=2, lr=1e-3,
                            grad_cache_chunk=chunk)
    return config, lambda encode: FinetuneWorkload(config, [data], encode.bank, encode)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_train_step_runs_grad_cache_when_the_knob_is_set(tmp_path: Path, stage: str):
    """Step 1 of `train_step` with the knob: the chunked path runs (every chunk is encoded twice) and
    its loss, gradient norm and (clipped) gradients are the plain step's."""
    data = (write_pairs(tmp_path / "d", 16, "src") if stage == "pretrain"
            else write_finetune(tmp_path / "d", 12, 20))
    runs = {}
    for chunk in (None, 3):
        config, build_task = _stage(stage, data, chunk)
        model = tiny_model(seed=0)
        model.train()
        encode = make_encoder(model, config, torch.device("cpu"))
        assert encode.grad_cache_chunk == chunk  # the config's knob reaches the step's encoder
        task = build_task(encode)
        forwards = _count_forwards(model)
        torch.manual_seed(SEED)
        metrics = train_step(1, config.steps, config, model, make_optimizer(model, config), task, encode)
        runs[chunk] = metrics, len(forwards), encode.tokens, {n: p.grad for n, p in model.named_parameters()}
    (plain, plain_forwards, plain_tokens, plain_grads) = runs[None]
    (cached, cached_forwards, cached_tokens, grads) = runs[3]
    assert math.isfinite(cached["loss"])
    assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-5)
    assert cached["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5, abs=1e-5)
    assert cached_forwards > 2 * plain_forwards and cached_tokens == plain_tokens
    for name, grad in plain_grads.items():  # train_step leaves the step's clipped gradients in .grad
        torch.testing.assert_close(grads[name], grad, **TOL, msg=name)


def test_cpu_bf16_knob_reaches_the_step_and_stays_close_to_fp32(tmp_path: Path):
    """`cpu_bf16`: the step's encoder autocasts to bf16 on the CPU; step 1's loss moves a little, not much."""
    data = write_pairs(tmp_path / "d", 16, "src")
    losses = {}
    for cpu_bf16 in (False, True):
        config = PretrainConfig(batch_size=8, steps=2, lr=1e-3, cpu_bf16=cpu_bf16)
        model = tiny_model(seed=0)
        model.train()
        encode = make_encoder(model, config, torch.device("cpu"))
        assert encode.bf16 is cpu_bf16
        task = PretrainWorkload(config, [data], encode.bank, encode)
        torch.manual_seed(SEED)
        losses[cpu_bf16] = train_step(1, config.steps, config, model, make_optimizer(model, config), task,
                                      encode)["loss"]
    assert math.isfinite(losses[True]) and losses[True] != losses[False]
    assert losses[True] == pytest.approx(losses[False], rel=0.05)
