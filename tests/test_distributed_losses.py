"""Distributed losses equal the single-process loss over the global batch: value and gradient.

Real gloo process groups on CPU (torch.multiprocessing spawn, 127.0.0.1, a free port; no Ray). Each
process builds the same tiny linear encoder (same seed), computes its rank's objective, calls backward,
then all-reduce-averages the parameter gradients exactly as DDP does. The parent process compares that
averaged gradient (and the rank-averaged objective) with the gradient of the single-process loss over
the concatenated batch. Every scenario of one world size runs in one spawn to keep the test fast.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conan_core.distributed import gather_with_grad, mean_over_ranks, world_info
from conan_core.losses import (
    CbbEmbeddings,
    CbbShape,
    MatryoshkaLoss,
    WorkerRoles,
    cbb_loss,
    distributed_cbb_loss,
    distributed_in_batch_infonce,
    in_batch_infonce,
)

FEATURES, WIDTH = 6, 5
TEMPERATURE, BETA, SCALE = 0.05, 0.8, 20.0
TOLERANCE = 1e-5


@dataclass(frozen=True)
class CBBScenario:
    """roles[w]: the logical ranks worker w hosts (retrieval group ranks, STS ranks), as training's
    `assign_roles` hands them out; the loss is the one training runs (`distributed_cbb_loss`)."""

    roles: tuple[WorkerRoles, ...]
    queries: int  # B, shared by the group
    negatives: int  # n per query per group rank
    sts_pairs: int  # pairs per STS rank
    in_batch: bool = False
    mrl_dims: tuple[int, ...] = ()

    @property
    def group(self) -> int:
        return sum(len(r.retrieval_ranks) for r in self.roles)

    @property
    def sts_ranks(self) -> int:
        return sum(len(r.sts_ranks) for r in self.roles)


def roles(*spec: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[WorkerRoles, ...]:
    return tuple(WorkerRoles(r, s) for r, s in spec)


CBB_SCENARIOS = {
    # Two workers share queries and positives, each brings its own negatives; in-batch negatives on.
    "cbb_group_of_2": CBBScenario(roles(((0,), ()), ((1,), ())), queries=3, negatives=2, sts_pairs=0,
                                  in_batch=True),
    # The paper's layout in small: one retrieval rank, one STS rank; Matryoshka on both terms.
    "cbb_retrieval_and_sts": CBBScenario(roles(((0,), ()), ((), (0,))), queries=3, negatives=3, sts_pairs=4,
                                         mrl_dims=(2, WIDTH)),
    # Fewer workers than logical ranks: worker 0 hosts group rank 0 and the STS rank, worker 1 group rank 1.
    "cbb_emulated_ranks": CBBScenario(roles(((0,), (0,)), ((1,), ())), queries=2, negatives=2, sts_pairs=3),
    # The paper's Fig. 3 in small: a retrieval group of 3 workers plus an STS worker, W=4.
    "cbb_group_of_3_and_sts": CBBScenario(roles(((0,), ()), ((1,), ()), ((2,), ()), ((), (0,))), queries=2,
                                          negatives=2, sts_pairs=4, in_batch=True),
}
IN_BATCH_QUERIES = 3


def make_encoder() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, WIDTH, dtype=torch.float64)


def embed(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(encoder(x), dim=-1)


def randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def in_batch_data(world: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    total = world * IN_BATCH_QUERIES
    return {"q": randn(generator, total, FEATURES), "p": randn(generator, total, FEATURES)}


def cbb_data(scenario: CBBScenario) -> dict[str, torch.Tensor]:
    """Raw features: the group's (q, p, mask over all its slots), per group rank negatives, per STS rank pairs."""
    generator = torch.Generator().manual_seed(2)
    b, n, s, g = scenario.queries, scenario.negatives, scenario.sts_pairs, scenario.group
    return {
        "q": randn(generator, b, FEATURES),
        "p": randn(generator, b, FEATURES),
        "negs": randn(generator, g, b, n, FEATURES),
        "mask": torch.rand(b, g * n, generator=generator) < 0.25,
        "sts_a": randn(generator, max(1, scenario.sts_ranks), s, FEATURES),
        "sts_b": randn(generator, max(1, scenario.sts_ranks), s, FEATURES),
        # float32 as in training: the score gather pads with float32 zeros on workers without STS
        "sts_scores": torch.randint(0, 6, (max(1, scenario.sts_ranks), s), generator=generator).float(),
    }


def matryoshka_of(scenario: CBBScenario) -> MatryoshkaLoss:
    return MatryoshkaLoss(scenario.mrl_dims or None)


# ---------------------------------------------------------------- single-process references


def reference_in_batch(encoder: torch.nn.Module, world: int) -> torch.Tensor:
    data = in_batch_data(world)
    return in_batch_infonce(embed(encoder, data["q"]), embed(encoder, data["p"]), TEMPERATURE)


def reference_symmetric(encoder: torch.nn.Module, world: int) -> torch.Tensor:
    """Both directions over the global batch, written out: rows of q p^T / tau, then its columns."""
    data = in_batch_data(world)
    logits = embed(encoder, data["q"]) @ embed(encoder, data["p"]).T / TEMPERATURE
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def reference_cbb(encoder: torch.nn.Module, scenario: CBBScenario) -> torch.Tensor:
    """Eq. 3 on one process over the global batch: the group's negatives side by side, all STS pairs."""
    data = cbb_data(scenario)
    negs = torch.cat([embed(encoder, data["negs"][r]) for r in range(scenario.group)], dim=1)
    sts = [None, None, None]
    if scenario.sts_ranks:
        sts = [torch.cat([embed(encoder, data[k][r]) for r in range(scenario.sts_ranks)]) for k in ("sts_a", "sts_b")]
        sts.append(data["sts_scores"][: scenario.sts_ranks].reshape(-1))
    total, _ = cbb_loss(embed(encoder, data["q"]), embed(encoder, data["p"]), negs, *sts, temperature=TEMPERATURE,
                        beta=BETA, scale=SCALE, neg_mask=data["mask"], in_batch=scenario.in_batch,
                        matryoshka=matryoshka_of(scenario))
    return total


# ---------------------------------------------------------------- per-rank objectives (run in workers)


def naive_gather(t: torch.Tensor) -> torch.Tensor:
    """The common bug: dist.all_gather, then put the local tensor (with grad) back in its slot."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts)


def in_batch_objective(encoder: torch.nn.Module, rank: int, world: int, naive: bool,
                       symmetric: bool = False) -> torch.Tensor:
    data = in_batch_data(world)
    rows = slice(rank * IN_BATCH_QUERIES, (rank + 1) * IN_BATCH_QUERIES)
    q, p = embed(encoder, data["q"][rows]), embed(encoder, data["p"][rows])
    if naive:
        return in_batch_infonce(q, naive_gather(p), TEMPERATURE, positive_offset=rank * IN_BATCH_QUERIES)
    return distributed_in_batch_infonce(q, p, TEMPERATURE, symmetric=symmetric)


def cbb_objective(encoder: torch.nn.Module, rank: int, scenario: CBBScenario) -> torch.Tensor:
    """What training's `cbb_objective` does after encoding: this worker's embeddings into the loss."""
    data, mine = cbb_data(scenario), scenario.roles[rank]
    emb = CbbEmbeddings(neg_mask=data["mask"])
    if mine.retrieval_ranks:
        emb.q, emb.p = embed(encoder, data["q"]), embed(encoder, data["p"])
        emb.negs = torch.cat([embed(encoder, data["negs"][g]).reshape(-1, WIDTH) for g in mine.retrieval_ranks])
    if mine.sts_ranks:
        emb.sts_a = torch.cat([embed(encoder, data["sts_a"][s]) for s in mine.sts_ranks])
        emb.sts_b = torch.cat([embed(encoder, data["sts_b"][s]) for s in mine.sts_ranks])
        emb.sts_scores = torch.cat([data["sts_scores"][s] for s in mine.sts_ranks])
    shape = CbbShape(scenario.roles, scenario.queries, scenario.negatives, scenario.sts_pairs, WIDTH)
    tasks = ("retrieval", "sts") if scenario.sts_ranks else ("retrieval",)
    return distributed_cbb_loss(emb, shape, temperature=TEMPERATURE, beta=BETA, scale=SCALE,
                                in_batch=scenario.in_batch, matryoshka=matryoshka_of(scenario), tasks=tasks).objective


def rank_objective(name: str, encoder: torch.nn.Module, rank: int, world: int) -> torch.Tensor:
    if name in ("in_batch", "naive_in_batch", "symmetric_in_batch"):
        return in_batch_objective(encoder, rank, world, naive=name == "naive_in_batch",
                                  symmetric=name == "symmetric_in_batch")
    return cbb_objective(encoder, rank, CBB_SCENARIOS[name])


def ddp_step(name: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """One rank's objective, backward, then the DDP gradient average over all ranks."""
    encoder = make_encoder()
    objective = rank_objective(name, encoder, rank, world)
    objective.backward()
    grads = {}
    for param_name, param in encoder.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)
        grads[param_name] = grad / world
    return {"loss": mean_over_ranks(objective), "grads": grads}


def worker(rank: int, world: int, port: int, names: list[str], out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        assert world_info().size == world
        results = {name: ddp_step(name, rank, world) for name in names}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- the tests (parent process)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, names: list[str], out_dir: Path) -> dict[str, dict]:
    mp.spawn(worker, args=(world, free_port(), names, str(out_dir)), nprocs=world, join=True)
    return torch.load(out_dir / "rank0.pt", weights_only=True)


def reference(name: str, world: int) -> dict[str, torch.Tensor]:
    encoder = make_encoder()
    if name in ("in_batch", "naive_in_batch"):
        loss = reference_in_batch(encoder, world)
    elif name == "symmetric_in_batch":
        loss = reference_symmetric(encoder, world)
    else:
        loss = reference_cbb(encoder, CBB_SCENARIOS[name])
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in encoder.named_parameters()}}


def max_grad_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max((got[name] - want[name]).abs().max().item() for name in want)


TWO_RANKS = ["in_batch", "naive_in_batch", "symmetric_in_batch", "cbb_group_of_2", "cbb_retrieval_and_sts",
             "cbb_emulated_ranks"]
FOUR_RANKS = ["in_batch", "symmetric_in_batch", "cbb_group_of_3_and_sts"]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return run_ranks(2, TWO_RANKS, tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def four_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return run_ranks(4, FOUR_RANKS, tmp_path_factory.mktemp("four_ranks"))


@pytest.mark.parametrize("name", ["in_batch", "symmetric_in_batch", "cbb_group_of_2", "cbb_retrieval_and_sts",
                                  "cbb_emulated_ranks"])
def test_two_ranks_match_single_process(two_rank_results: dict[str, dict], name: str) -> None:
    want, got = reference(name, 2), two_rank_results[name]
    assert got["loss"].item() == pytest.approx(want["loss"].item(), abs=TOLERANCE)
    assert max_grad_difference(got["grads"], want["grads"]) < TOLERANCE


def test_naive_gather_gives_a_wrong_gradient(two_rank_results: dict[str, dict]) -> None:
    want, got = reference("naive_in_batch", 2), two_rank_results["naive_in_batch"]
    # Same loss value, but the cross-rank gradient terms are missing.
    assert got["loss"].item() == pytest.approx(want["loss"].item(), abs=TOLERANCE)
    assert max_grad_difference(got["grads"], want["grads"]) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", FOUR_RANKS)
def test_four_ranks_match_single_process(four_rank_results: dict[str, dict], name: str) -> None:
    want, got = reference(name, 4), four_rank_results[name]
    assert got["loss"].item() == pytest.approx(want["loss"].item(), abs=TOLERANCE)
    assert max_grad_difference(got["grads"], want["grads"]) < TOLERANCE


def test_gather_with_grad_is_identity_on_one_process() -> None:
    x = torch.ones(2, 3, requires_grad=True)
    assert gather_with_grad(x, dim=1) is x
