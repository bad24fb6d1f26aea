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
    CBBLayout,
    MatryoshkaLoss,
    cbb_loss,
    distributed_cbb_terms,
    distributed_in_batch_infonce,
    in_batch_infonce,
    make_cbb_groups,
)

FEATURES, WIDTH = 6, 5
TEMPERATURE, BETA, SCALE = 0.05, 0.8, 20.0
TOLERANCE = 1e-5


@dataclass(frozen=True)
class CBBScenario:
    layout: CBBLayout
    queries: int  # B per retrieval group
    negatives: int  # K per retrieval rank
    sts_pairs: int  # pairs per STS rank
    margin: float | None = None
    mrl_dims: tuple[int, ...] = ()


CBB_SCENARIOS = {
    # Two ranks share queries and positives, each brings its own negatives; text mask and score guard on.
    "cbb_group_of_2": CBBScenario(CBBLayout(((0, 1),)), queries=3, negatives=2, sts_pairs=0, margin=0.0),
    # The paper's layout in small: one retrieval rank, one STS rank; Matryoshka on both terms.
    "cbb_retrieval_and_sts": CBBScenario(
        CBBLayout(((0,),), (1,)), queries=3, negatives=3, sts_pairs=4, mrl_dims=(2, WIDTH)
    ),
    # Two retrieval groups of different sizes plus an STS rank: W=4, R=2, N=(2, 1), S=1.
    "cbb_two_groups_and_sts": CBBScenario(CBBLayout(((0, 1), (2,)), (3,)), queries=2, negatives=2, sts_pairs=4),
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
    """Raw features: per retrieval group (q, p), per rank (negatives, mask, STS pairs)."""
    generator = torch.Generator().manual_seed(2)
    groups, world = len(scenario.layout.retrieval_groups), scenario.layout.world_size
    b, k, s = scenario.queries, scenario.negatives, scenario.sts_pairs
    return {
        "q": randn(generator, groups, b, FEATURES),
        "p": randn(generator, groups, b, FEATURES),
        "negs": randn(generator, world, b, k, FEATURES),
        "mask": torch.rand(world, b, k, generator=generator) < 0.25,
        "sts_a": randn(generator, world, s, FEATURES),
        "sts_b": randn(generator, world, s, FEATURES),
        "sts_scores": torch.randint(0, 6, (world, s), generator=generator).double(),
    }


def matryoshka_of(scenario: CBBScenario) -> MatryoshkaLoss:
    return MatryoshkaLoss(scenario.mrl_dims or None)


# ---------------------------------------------------------------- single-process references


def reference_in_batch(encoder: torch.nn.Module, world: int) -> torch.Tensor:
    data = in_batch_data(world)
    return in_batch_infonce(embed(encoder, data["q"]), embed(encoder, data["p"]), TEMPERATURE)


def reference_cbb(encoder: torch.nn.Module, scenario: CBBScenario) -> torch.Tensor:
    """L = mean over groups of the retrieval term + beta * CoSENT over all STS pairs, via cbb_loss."""
    data, layout = cbb_data(scenario), scenario.layout
    kwargs = dict(temperature=TEMPERATURE, beta=BETA, scale=SCALE, margin=scenario.margin)
    retrieval_terms = []
    for g, group in enumerate(layout.retrieval_groups):
        negs = torch.cat([embed(encoder, data["negs"][r]) for r in group], dim=1)
        mask = torch.cat([data["mask"][r] for r in group], dim=1)
        q, p = embed(encoder, data["q"][g]), embed(encoder, data["p"][g])
        loss, _ = cbb_loss(q, p, negs, None, None, None, neg_mask=mask, matryoshka=matryoshka_of(scenario), **kwargs)
        retrieval_terms.append(loss)
    total = torch.stack(retrieval_terms).mean()
    if layout.sts_ranks:
        a = torch.cat([embed(encoder, data["sts_a"][r]) for r in layout.sts_ranks])
        b = torch.cat([embed(encoder, data["sts_b"][r]) for r in layout.sts_ranks])
        scores = torch.cat([data["sts_scores"][r] for r in layout.sts_ranks])
        sts, _ = cbb_loss(None, None, None, a, b, scores, matryoshka=matryoshka_of(scenario), **kwargs)
        total = total + sts  # cbb_loss already applied beta
    return total


# ---------------------------------------------------------------- per-rank objectives (run in workers)


def naive_gather(t: torch.Tensor) -> torch.Tensor:
    """The common bug: dist.all_gather, then put the local tensor (with grad) back in its slot."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts)


def in_batch_objective(encoder: torch.nn.Module, rank: int, world: int, naive: bool) -> torch.Tensor:
    data = in_batch_data(world)
    rows = slice(rank * IN_BATCH_QUERIES, (rank + 1) * IN_BATCH_QUERIES)
    q, p = embed(encoder, data["q"][rows]), embed(encoder, data["p"][rows])
    if naive:
        return in_batch_infonce(q, naive_gather(p), TEMPERATURE, positive_offset=rank * IN_BATCH_QUERIES)
    return distributed_in_batch_infonce(q, p, TEMPERATURE)


def cbb_objective(encoder: torch.nn.Module, rank: int, scenario: CBBScenario) -> torch.Tensor:
    data, layout = cbb_data(scenario), scenario.layout
    groups = make_cbb_groups(layout)
    kwargs = dict(
        temperature=TEMPERATURE, beta=BETA, scale=SCALE, margin=scenario.margin, matryoshka=matryoshka_of(scenario)
    )
    if layout.role(rank) == "sts":
        objective, _ = distributed_cbb_terms(
            groups,
            sts_a=embed(encoder, data["sts_a"][rank]),
            sts_b=embed(encoder, data["sts_b"][rank]),
            sts_scores=data["sts_scores"][rank],
            **kwargs,
        )
        return objective
    g = layout.group_index(rank)
    objective, _ = distributed_cbb_terms(
        groups,
        q=embed(encoder, data["q"][g]),
        p=embed(encoder, data["p"][g]),
        negs=embed(encoder, data["negs"][rank]),
        neg_mask=data["mask"][rank],
        **kwargs,
    )
    return objective


def rank_objective(name: str, encoder: torch.nn.Module, rank: int, world: int) -> torch.Tensor:
    if name in ("in_batch", "naive_in_batch"):
        return in_batch_objective(encoder, rank, world, naive=name == "naive_in_batch")
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
    else:
        loss = reference_cbb(encoder, CBB_SCENARIOS[name])
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in encoder.named_parameters()}}


def max_grad_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max((got[name] - want[name]).abs().max().item() for name in want)


TWO_RANKS = ["in_batch", "naive_in_batch", "cbb_group_of_2", "cbb_retrieval_and_sts"]
FOUR_RANKS = ["in_batch", "cbb_two_groups_and_sts"]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return run_ranks(2, TWO_RANKS, tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def four_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return run_ranks(4, FOUR_RANKS, tmp_path_factory.mktemp("four_ranks"))


@pytest.mark.parametrize("name", ["in_batch", "cbb_group_of_2", "cbb_retrieval_and_sts"])
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
def test_four_ranks_two_groups_match_single_process(four_rank_results: dict[str, dict], name: str) -> None:
    want, got = reference(name, 4), four_rank_results[name]
    assert got["loss"].item() == pytest.approx(want["loss"].item(), abs=TOLERANCE)
    assert max_grad_difference(got["grads"], want["grads"]) < TOLERANCE


def test_gather_with_grad_is_identity_on_one_process() -> None:
    x = torch.ones(2, 3, requires_grad=True)
    assert gather_with_grad(x, dim=1) is x
