"""The CBB step's loss and gradients are the same on 1 process, emulated, and on 2 gloo workers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conan_core.losses.cbb import cbb_loss
from conan_core.losses.matryoshka import MatryoshkaLoss
from conan_core.testing import tiny_model
from conan_core.train.batching import assign_roles
from conan_core.train.config import LayoutConfig
from conan_core.train.data import TokenBank
from conan_core.train.objective import CbbShape, CbbWorkerBatch, StepEncoder, average_gradients, cbb_objective

LAYOUT = LayoutConfig(retrieval_group=2, sts_workers=1)
B, N_PER_RANK, STS = 3, 2, 4
QUERIES = ["what is a cat", "how big is the city", "why is water good"]
POSITIVES = ["a cat is small", "the city is big", "water is good for a tree"]
NEGATIVES = {0: [["a dog", "the car"], ["a book", "old house"], ["bad food", "new music"]],
             1: [["big tree", "the city"], ["what music", "small car"], ["a good book", "the dog"]]}
STS_PAIRS = (["a cat", "the dog", "new car", "old book"], ["a small cat", "a dog", "a tree", "old books"],
             [5.0, 3.0, 0.0, 4.0])
MRL = MatryoshkaLoss([8, 32])


def _batch_for(roles) -> CbbWorkerBatch:
    batch = CbbWorkerBatch()
    if roles.retrieval_ranks:
        batch.queries, batch.positives = QUERIES, POSITIVES
        batch.negatives = {g: NEGATIVES[g] for g in roles.retrieval_ranks}
    batch.sts = {s: STS_PAIRS for s in roles.sts_ranks}
    return batch


def _objective(world: int, rank: int, share: bool = True, tasks=("retrieval", "sts"), neg_scores: bool = False):
    model = tiny_model(seed=0)
    roles = tuple(assign_roles(LAYOUT, world))
    encode = StepEncoder(model, TokenBank(model.tokenizer, 32), torch.device("cpu"))
    shape = CbbShape(roles, B, N_PER_RANK, STS, model.dim)
    out = cbb_objective(encode, _batch_for(roles[rank]), shape, temperature=0.05, beta=0.8, scale=20.0,
                        in_batch=False, matryoshka=MRL, share_negatives=share, tasks=tasks,
                        neg_scores=neg_scores)
    out.objective.backward()
    params = list(model.parameters())
    average_gradients(params)
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def _reference():
    """Eq. 3 on one process over the whole global batch, with the losses package's cbb_loss."""
    model = tiny_model(seed=0)

    def enc(texts):
        return F.normalize(model.embed(texts), dim=-1)

    q, p = enc(QUERIES), enc(POSITIVES)
    flat = [t for g in (0, 1) for row in NEGATIVES[g] for t in row]
    negs = enc(flat).view(2, B, N_PER_RANK, -1).permute(1, 0, 2, 3).reshape(B, 2 * N_PER_RANK, -1)
    a, b = enc(STS_PAIRS[0]), enc(STS_PAIRS[1])
    total, terms = cbb_loss(q, p, negs, a, b, torch.tensor(STS_PAIRS[2]), temperature=0.05, beta=0.8,
                            scale=20.0, matryoshka=MRL)
    total.backward()
    return total.detach(), {name: prm.grad.clone() for name, prm in model.named_parameters()}


def _worker(rank: int, world: int, init_file: str, out_dir: str, vanilla_tasks=None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if vanilla_tasks is None:
            out, grads = _objective(world, rank)
        else:
            out, grads = _objective(world, rank, share=False, tasks=vanilla_tasks, neg_scores=True)
        total = out.objective.detach().clone()
        dist.all_reduce(total)
        torch.save({"loss": total / world, "grads": grads, "ret": out.retrieval_loss, "sts": out.sts_loss},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _assert_grads_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_emulated_single_worker_equals_reference():
    ref_loss, ref_grads = _reference()
    out, grads = _objective(world=1, rank=0)
    torch.testing.assert_close(out.objective.detach(), ref_loss)
    _assert_grads_close(grads, ref_grads)
    assert out.neg_scores.shape == (B, 2 * N_PER_RANK)
    assert out.retrieval_loss is not None and out.sts_loss is not None


def test_two_gloo_workers_equal_reference():
    ref_loss, ref_grads = _reference()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True,
                           start_method="spawn")
        results = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in results:  # after averaging, every worker holds the same (exact) gradient
        torch.testing.assert_close(result["loss"], ref_loss)
        _assert_grads_close(result["grads"], ref_grads)
    # worker 0 hosts retrieval rank 0 and the STS rank, worker 1 retrieval rank 1
    assert results[0]["sts"] is not None and results[1]["sts"] is None
    torch.testing.assert_close(results[0]["ret"], results[1]["ret"])


def test_vanilla_uses_each_ranks_own_negatives_only():
    out, _ = _objective(world=1, rank=0, share=False, tasks=("retrieval",))
    model = tiny_model(seed=0)
    with torch.no_grad():
        q, p = (F.normalize(model.embed(t), dim=-1) for t in (QUERIES, POSITIVES))
        per_rank = []
        for g in (0, 1):
            negs = F.normalize(model.embed([t for row in NEGATIVES[g] for t in row]), dim=-1).view(B, N_PER_RANK, -1)
            per_rank.append(MRL(lambda q_, p_, n_: cbb_loss(q_, p_, n_, None, None, None)[0], q, p, negs))
    torch.testing.assert_close(out.retrieval_loss, sum(per_rank) / 2)
    assert out.sts_loss is None


@pytest.mark.parametrize("tasks", [("sts",), ("retrieval",)])
def test_vanilla_two_gloo_workers_equal_one_worker(tasks):
    """A vanilla step that leaves one worker idle (STS only: worker 1 hosts no STS rank) still runs the
    collectives on every worker, and the averaged gradient equals the one-worker computation."""
    want, want_grads = _objective(world=1, rank=0, share=False, tasks=tasks, neg_scores=True)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(2, os.path.join(tmp, "init"), tmp, tasks), nprocs=2, join=True,
                           start_method="spawn")
        results = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in results:
        torch.testing.assert_close(result["loss"], want.objective.detach())
        _assert_grads_close(result["grads"], want_grads)


def test_vanilla_reports_the_same_negative_scores_as_cbb_for_dhnm():
    cbb, _ = _objective(world=1, rank=0)
    vanilla, _ = _objective(world=1, rank=0, share=False, tasks=("retrieval",), neg_scores=True)
    assert vanilla.neg_scores.shape == (B, 2 * N_PER_RANK)
    torch.testing.assert_close(vanilla.neg_scores, cbb.neg_scores)
    without, _ = _objective(world=1, rank=0, share=False, tasks=("retrieval",))
    assert without.neg_scores is None


def test_layout_refuses_idle_workers():
    from conan_core.train.batching import LayoutError

    with pytest.raises(LayoutError, match="only 3 ranks"):
        assign_roles(LAYOUT, 4)
