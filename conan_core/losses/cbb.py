"""Cross-GPU Batch Balance (CBB) loss, Conan-embedding Eq. 3 (arXiv 2408.15710, §2.2):

    L_CBB = -(1/n) sum_i log( exp(s(x_i, y_i+)/tau)
                              / (exp(s(x_i, y_i+)/tau) + sum_{k=1..N} sum_{j=1..n} exp(s(x_i, y_kj-)/tau)) )
            + beta * L_cos

N workers of a retrieval group hold the same queries and positives and different hard negatives; each
query's denominator holds its positive and the negatives of all N workers. STS workers hold their own
scored pairs; L_cos is CoSENT over the pairs of all STS workers. Both tasks in every step, one backward.

Two forms, both here: `cbb_loss` on one process (the reference), and `distributed_cbb_loss`, what
training runs: one worker's objective over the embeddings it computed, for a layout of logical ranks
spread over the workers (a worker may host several, so 1 worker and 8 compute the same loss), scaled so
that averaging the workers' gradients (`train.objective.average_gradients`, what DDP does) gives exactly
the gradient of `cbb_loss` over the global batch. The equivalence tests run both on 1, 2 and 4 gloo
processes (tests/test_distributed_losses.py, tests/test_train_objective.py).

Scaling (W workers, M of them hosting retrieval ranks, M_s hosting STS ranks): every retrieval worker
computes the same L_ret and every STS worker the same CoSENT; a gathered tensor's gradient sums over the
workers that used it, and q, p (encoded by every retrieval worker from the same texts) are counted once
per retrieval worker, so the objective W/M * L_ret + beta * W/M_s * L_sts, averaged over the W workers,
gives dL/dtheta exactly, and its average over workers is the value of L.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from conan_core.distributed import Segment, gather_segments, world_info
from conan_core.losses.checks import LossInputError
from conan_core.losses.cosent import cosent_loss
from conan_core.losses.infonce import hard_negative_infonce, query_negative_scores
from conan_core.losses.matryoshka import MatryoshkaLoss


def retrieval_term(
    q: torch.Tensor,
    p: torch.Tensor,
    negs: torch.Tensor,
    *,
    temperature: float,
    neg_mask: torch.Tensor | None = None,
    margin: float | None = None,
    in_batch: bool = False,
    matryoshka: MatryoshkaLoss | None = None,
) -> torch.Tensor:
    """The first term of Eq. 3 (hard-negative InfoNCE), through the Matryoshka wrapper when given."""
    mrl = matryoshka or MatryoshkaLoss(None)
    return mrl(
        hard_negative_infonce,
        q,
        p,
        negs,
        temperature=temperature,
        in_batch=in_batch,
        neg_mask=neg_mask,
        margin=margin,
    )


def sts_term(
    a: torch.Tensor,
    b: torch.Tensor,
    scores: torch.Tensor,
    *,
    scale: float,
    matryoshka: MatryoshkaLoss | None = None,
) -> torch.Tensor:
    """L_cos of Eq. 3 (CoSENT), through the Matryoshka wrapper when given."""
    mrl = matryoshka or MatryoshkaLoss(None)
    return mrl(cosent_loss, a, b, scores=scores, scale=scale)


def cbb_loss(
    q: torch.Tensor | None,
    p: torch.Tensor | None,
    negs: torch.Tensor | None,
    sts_a: torch.Tensor | None,
    sts_b: torch.Tensor | None,
    sts_scores: torch.Tensor | None,
    *,
    temperature: float = 0.05,
    beta: float = 0.8,
    scale: float = 20.0,
    neg_mask: torch.Tensor | None = None,
    margin: float | None = None,
    in_batch: bool = False,
    matryoshka: MatryoshkaLoss | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Eq. 3 on one process: total = L_ret + beta * L_sts, and the detached terms for logging.

    q [B, d], p [B, d], negs [B, N*K, d] (the negatives of all N group workers side by side);
    sts_a, sts_b [S, d], sts_scores [S]. Pass None for all three of a task's tensors to leave that task
    out (its term is then None in the dict). neg_mask / margin: the false-negative guard
    (guards.false_negative_mask); in_batch: also use the other queries' positives as negatives (not in
    the literal Eq. 3, so off by default); matryoshka: applied to each term.
    """
    retrieval = _optional_part("retrieval", q, p, negs)
    sts = _optional_part("sts", sts_a, sts_b, sts_scores)
    if retrieval is None and sts is None:
        raise LossInputError("cbb_loss needs the retrieval tensors, the STS tensors, or both")
    terms: dict[str, torch.Tensor | None] = {"retrieval": None, "sts": None}
    total = None
    if retrieval is not None:
        loss_ret = retrieval_term(
            *retrieval,
            temperature=temperature,
            neg_mask=neg_mask,
            margin=margin,
            in_batch=in_batch,
            matryoshka=matryoshka,
        )
        terms["retrieval"] = loss_ret.detach()
        total = loss_ret
    if sts is not None:
        loss_sts = sts_term(*sts, scale=scale, matryoshka=matryoshka)
        terms["sts"] = loss_sts.detach()
        total = beta * loss_sts if total is None else total + beta * loss_sts
    return total, terms


def _optional_part(name: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
    given = [t is not None for t in tensors]
    if not any(given):
        return None
    if not all(given):
        raise LossInputError(f"the {name} part needs all of its tensors or none of them")
    return tensors  # type: ignore[return-value]


@dataclass(frozen=True)
class WorkerRoles:
    """The logical CBB ranks one physical worker computes: retrieval group ranks 0..G-1, STS ranks."""

    retrieval_ranks: tuple[int, ...]
    sts_ranks: tuple[int, ...]


@dataclass(frozen=True)
class CbbShape:
    """Sizes every worker must agree on so the gathers line up: each worker's roles, queries per step
    (shared by the group), negatives per query per group rank, pairs per STS rank, embedding width."""

    roles: tuple[WorkerRoles, ...]
    retrieval_batch: int
    negatives_per_rank: int
    sts_batch: int
    dim: int

    @property
    def group_size(self) -> int:
        return sum(len(r.retrieval_ranks) for r in self.roles)


@dataclass
class CbbEmbeddings:
    """What one worker encoded this step (L2-normalised), None for what it does not host.

    q, p [B, d]: the group's shared queries and positives; negs [R*B*n, d]: for each hosted group rank in
    order, each query's n negatives; neg_mask [B, G*n]: True on empty slots (a short negative list), in
    group-rank order, None when all are filled; sts_a, sts_b [S*k, d], sts_scores [S*k]: the pairs of the
    k hosted STS ranks in order.
    """

    q: torch.Tensor | None = None
    p: torch.Tensor | None = None
    negs: torch.Tensor | None = None
    neg_mask: torch.Tensor | None = None
    sts_a: torch.Tensor | None = None
    sts_b: torch.Tensor | None = None
    sts_scores: torch.Tensor | None = None


@dataclass
class CbbTerms:
    objective: torch.Tensor  # this worker's share, to call backward() on
    retrieval_loss: torch.Tensor | None  # the global L_ret (same on every retrieval worker), detached
    sts_loss: torch.Tensor | None
    neg_scores: torch.Tensor | None  # [B, G*n] cosines of each query to its negatives (for DHNM), detached


def distributed_cbb_loss(emb: CbbEmbeddings, shape: CbbShape, *, temperature: float, beta: float,
                         scale: float, in_batch: bool, matryoshka: MatryoshkaLoss | None = None,
                         tasks: tuple[str, ...] = ("retrieval", "sts"), share_negatives: bool = True,
                         neg_scores: bool = False) -> CbbTerms:
    """This worker's CBB objective (Eq. 3) over its embeddings; see the module docstring for the scaling.

    tasks: which terms this step carries (CBB: both; the vanilla baseline: one). share_negatives=False is
    the vanilla retrieval loss: each group rank's queries see only that rank's negatives. neg_scores=True:
    in vanilla mode too, return every query's cosines to the negatives of all group ranks (gathered
    without gradient) for DHNM; with shared negatives they are always returned. Every worker must call
    this with the same `tasks` and flags (the gathers are collective).
    """
    if beta < 0:
        raise LossInputError(f"beta must be >= 0, got {beta}")
    info = world_info()
    own_roles = shape.roles[info.rank]
    use_ret, use_sts = "retrieval" in tasks, "sts" in tasks
    if use_ret and own_roles.retrieval_ranks and (emb.q is None or emb.p is None or emb.negs is None):
        raise LossInputError(f"worker {info.rank} hosts retrieval ranks: q, p and negs are required")
    if use_sts and own_roles.sts_ranks and (emb.sts_a is None or emb.sts_b is None or emb.sts_scores is None):
        raise LossInputError(f"worker {info.rank} hosts STS ranks: sts_a, sts_b and sts_scores are required")
    rows, n, dim = shape.retrieval_batch, shape.negatives_per_rank, shape.dim
    # One gather per step for everything shared: a single collective keeps every worker's backward
    # (a reduce-scatter) in the same order, whatever each worker computed.
    segments = []
    if use_ret and share_negatives:
        segments.append(Segment(emb.negs if own_roles.retrieval_ranks else None,
                                tuple(r.retrieval_ranks for r in shape.roles), rows * n))
    sts_blocks = tuple(r.sts_ranks for r in shape.roles)
    if use_sts:
        local = bool(own_roles.sts_ranks)
        segments += [Segment(emb.sts_a if local else None, sts_blocks, shape.sts_batch),
                     Segment(emb.sts_b if local else None, sts_blocks, shape.sts_batch)]
    gathered, keep_alive = gather_segments(segments, dim, _device(emb))
    out = CbbTerms(keep_alive, None, None, None)
    if use_ret and share_negatives:
        all_negs = gathered.pop(0)
        if own_roles.retrieval_ranks:
            all_negs = _per_query(all_negs, rows, n, dim)
            loss = retrieval_term(emb.q, emb.p, all_negs, temperature=temperature, in_batch=in_batch,
                                  neg_mask=emb.neg_mask, matryoshka=matryoshka)
            hosts = sum(1 for r in shape.roles if r.retrieval_ranks)
            out.objective = out.objective + info.size / hosts * loss
            out.retrieval_loss = loss.detach()
            out.neg_scores = _masked_nan(query_negative_scores(emb.q, all_negs).detach(), emb.neg_mask)
    elif use_ret:
        out.retrieval_loss, term = _vanilla_retrieval(emb, shape, own_roles, temperature=temperature,
                                                      in_batch=in_batch, matryoshka=matryoshka)
        if term is not None:
            out.objective = out.objective + info.size * term
        if neg_scores:
            out.neg_scores = _masked_nan(_vanilla_negative_scores(emb, shape), emb.neg_mask)
    if use_sts:
        all_a, all_b = gathered
        scores = Segment(emb.sts_scores if own_roles.sts_ranks else None, sts_blocks, shape.sts_batch)
        all_scores = gather_segments([scores], None, _device(emb), grad=False)[0][0]
        if own_roles.sts_ranks:
            loss = sts_term(all_a, all_b, all_scores, scale=scale, matryoshka=matryoshka)
            hosts = sum(1 for r in shape.roles if r.sts_ranks)
            out.objective = out.objective + (beta if use_ret else 1.0) * info.size / hosts * loss
            out.sts_loss = loss.detach()
    return out


def _device(emb: CbbEmbeddings) -> torch.device | None:
    for t in (emb.q, emb.negs, emb.sts_a):
        if t is not None:
            return t.device
    return torch.device("cpu")


def _per_query(negs: torch.Tensor, rows: int, n: int, dim: int) -> torch.Tensor:
    """[G*B*n, d] in (group rank, query, slot) order -> [B, G*n, d], each query's negatives of all ranks."""
    group = negs.shape[0] // (rows * n)
    return negs.view(group, rows, n, dim).permute(1, 0, 2, 3).reshape(rows, group * n, dim)


def _masked_nan(scores: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Empty slots as NaN: DHNM skips them instead of taking the score of "" as a negative's."""
    if scores is None or mask is None:
        return scores
    return scores.masked_fill(mask, float("nan"))


def _vanilla_negative_scores(emb: CbbEmbeddings, shape: CbbShape) -> torch.Tensor | None:
    """[B, G*n] cosines of each query to the negatives of every group rank, for DHNM in vanilla mode.
    The negatives are gathered detached: scores are observations, not part of the loss."""
    rows, n, dim = shape.retrieval_batch, shape.negatives_per_rank, shape.dim
    negs = emb.negs.detach() if emb.negs is not None else None
    segment = Segment(negs, tuple(r.retrieval_ranks for r in shape.roles), rows * n)
    all_negs = gather_segments([segment], dim, _device(emb), grad=False)[0][0]
    if emb.q is None:
        return None
    return query_negative_scores(emb.q.detach(), _per_query(all_negs, rows, n, dim))


def _vanilla_retrieval(emb: CbbEmbeddings, shape: CbbShape, own_roles: WorkerRoles, *, temperature: float,
                       in_batch: bool, matryoshka: MatryoshkaLoss | None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Vanilla: L_ret = (1/G) sum_g InfoNCE(q, p, negatives of rank g only); no gather.
    Returns (the global L_ret detached on workers with retrieval ranks, this worker's share)."""
    n, rows = shape.negatives_per_rank, shape.retrieval_batch
    term = None
    if own_roles.retrieval_ranks and emb.negs is not None:
        per_rank = emb.negs.view(len(own_roles.retrieval_ranks), rows, n, -1)
        mask = emb.neg_mask
        masks = [mask[:, g * n:(g + 1) * n] if mask is not None else None for g in own_roles.retrieval_ranks]
        losses = [retrieval_term(emb.q, emb.p, part, temperature=temperature, in_batch=in_batch,
                                 neg_mask=part_mask, matryoshka=matryoshka)
                  for part, part_mask in zip(per_rank, masks, strict=True)]
        term = torch.stack(losses).sum() / shape.group_size
    zero = torch.zeros((), device=_device(emb))
    total = _sum_over_workers(term.detach() if term is not None else zero)  # collective: every worker
    return (total if term is not None else None), term


def _sum_over_workers(value: torch.Tensor) -> torch.Tensor:
    if world_info().size > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value
