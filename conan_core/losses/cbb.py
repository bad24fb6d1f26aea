"""Cross-GPU Batch Balance (CBB) loss, Conan-embedding Eq. 3 (arXiv 2408.15710, §2.2):

    L_CBB = -(1/n) sum_i log( exp(s(x_i, y_i+)/tau)
                              / (exp(s(x_i, y_i+)/tau) + sum_{k=1..N} sum_{j=1..n} exp(s(x_i, y_kj-)/tau)) )
            + beta * L_cos

N workers of a retrieval group hold the same queries and positives and different hard negatives; each
query's denominator holds its positive and the negatives of all N workers. STS workers hold their own
scored pairs; L_cos is CoSENT over the pairs of all STS workers. Both tasks in every step, one backward.

Two forms: `cbb_loss` on one process (the reference, and what a single worker runs), and
`distributed_cbb_terms`, the per-rank objective inside a DDP worker (Ray Train), scaled so that DDP's
gradient averaging gives exactly the gradient of the single-process loss over the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from conan_core.distributed import gather_no_grad, gather_with_grad, world_info
from conan_core.losses.checks import LossInputError
from conan_core.losses.cosent import cosent_loss
from conan_core.losses.infonce import hard_negative_infonce
from conan_core.losses.matryoshka import MatryoshkaLoss

Role = Literal["retrieval", "sts"]


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
class CBBLayout:
    """Which world rank does what: retrieval groups (ranks sharing queries and positives) and STS ranks.

    Every rank 0..W-1 appears exactly once. The paper's 5-GPU figure is
    CBBLayout(retrieval_groups=((0, 1, 2, 3),), sts_ranks=(4,)).
    """

    retrieval_groups: tuple[tuple[int, ...], ...]
    sts_ranks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        ranks = [r for group in self.retrieval_groups for r in group] + list(self.sts_ranks)
        if sorted(ranks) != list(range(len(ranks))) or not ranks:
            raise LossInputError(f"CBB layout must use each rank 0..W-1 exactly once, got {self}")
        if any(not group for group in self.retrieval_groups):
            raise LossInputError("CBB layout has an empty retrieval group")

    @classmethod
    def consecutive(cls, group_sizes: Sequence[int], sts_workers: int) -> CBBLayout:
        """Retrieval groups of the given sizes on the first ranks, then `sts_workers` STS ranks."""
        groups, start = [], 0
        for size in group_sizes:
            groups.append(tuple(range(start, start + size)))
            start += size
        return cls(tuple(groups), tuple(range(start, start + sts_workers)))

    @property
    def world_size(self) -> int:
        return sum(len(g) for g in self.retrieval_groups) + len(self.sts_ranks)

    def role(self, rank: int) -> Role:
        return "sts" if rank in self.sts_ranks else "retrieval"

    def group_index(self, rank: int) -> int:
        for index, group in enumerate(self.retrieval_groups):
            if rank in group:
                return index
        raise LossInputError(f"rank {rank} is not in a retrieval group of {self}")

    def retrieval_weight(self, rank: int) -> float:
        """W / (N_g * R): see distributed_cbb_terms."""
        group = self.retrieval_groups[self.group_index(rank)]
        return self.world_size / (len(group) * len(self.retrieval_groups))

    def sts_weight(self, beta: float) -> float:
        """beta * W / S: see distributed_cbb_terms."""
        return beta * self.world_size / len(self.sts_ranks)


@dataclass(frozen=True)
class CBBGroups:
    """A layout plus its torch.distributed subgroups (None when running as a single process)."""

    layout: CBBLayout
    retrieval: tuple[dist.ProcessGroup | None, ...]
    sts: dist.ProcessGroup | None


def make_cbb_groups(layout: CBBLayout) -> CBBGroups:
    """Create the subgroups. Collective: every rank must call it, with the same layout, in the same order."""
    info = world_info()
    if info.size != layout.world_size:
        raise LossInputError(f"CBB layout is for {layout.world_size} ranks but the world has {info.size}")
    if not info.initialized:
        return CBBGroups(layout, tuple(None for _ in layout.retrieval_groups), None)
    # dist.new_group must run on all ranks for every group, members or not.
    retrieval = tuple(dist.new_group(list(group)) for group in layout.retrieval_groups)
    sts = dist.new_group(list(layout.sts_ranks)) if layout.sts_ranks else None
    return CBBGroups(layout, retrieval, sts)


def distributed_cbb_terms(
    groups: CBBGroups,
    *,
    q: torch.Tensor | None = None,
    p: torch.Tensor | None = None,
    negs: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    sts_a: torch.Tensor | None = None,
    sts_b: torch.Tensor | None = None,
    sts_scores: torch.Tensor | None = None,
    temperature: float = 0.05,
    beta: float = 0.8,
    scale: float = 20.0,
    margin: float | None = None,
    in_batch: bool = False,
    matryoshka: MatryoshkaLoss | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """This rank's share of Eq. 3, to call .backward() on inside a DDP worker.

    The rank's role comes from the layout. A retrieval rank passes q, p [B, d] (identical on every rank
    of its group: same texts, same weights) and its OWN negatives negs [B, K, d] (+ optional neg_mask
    [B, K]); the negatives of its group are gathered with gradient (group-rank order) into [B, N*K, d].
    An STS rank passes its own sts_a, sts_b [S, d], sts_scores [S]; the pairs of all STS ranks are
    gathered with gradient and CoSENT runs over all of them. Shapes must match across the ranks of a
    group. Returns (objective, {"retrieval": L_ret^g or None, "sts": L_sts or None}) with detached terms.

    Target (W ranks, R retrieval groups of sizes N_g, S STS ranks, equal B in every group):
        L = (1/R) sum_g L_ret^g + beta * L_sts          (L_ret = mean over all R*B queries)
    Scaling, derived from: every rank of group g computes the same L_ret^g; the gather's backward is a
    reduce-scatter(SUM), so each of the N_g ranks' negatives receives N_g * dL_ret^g/dn, and q, p (the
    same tensors on every rank) get their gradient once per rank, i.e. N_g times in the sum over ranks;
    so the group's ranks together contribute N_g * c_g * dL_ret^g/dtheta, and DDP divides by W:
        retrieval rank of group g: objective = W / (N_g * R) * L_ret^g   -> (1/R) dL_ret^g/dtheta
        STS rank:                  objective = beta * W / S * L_sts       -> beta * dL_sts/dtheta
    Summed over the world and divided by W, the objectives also give the value of L, so
    `mean_over_ranks(objective)` is the global loss for logging.
    """
    if beta < 0:
        raise LossInputError(f"beta must be >= 0, got {beta}")
    rank = world_info().rank
    layout = groups.layout
    if layout.role(rank) == "retrieval":
        if q is None or p is None or negs is None:
            raise LossInputError(f"rank {rank} is a retrieval rank: q, p and negs are required")
        group = groups.retrieval[layout.group_index(rank)]
        all_negs = gather_with_grad(negs, group, dim=1)
        # Always gather a mask so that every rank of the group runs the same collectives.
        local_mask = neg_mask if neg_mask is not None else torch.zeros(negs.shape[:2], dtype=torch.bool)
        all_mask = gather_no_grad(local_mask.to(negs.device), group, dim=1)
        loss = retrieval_term(
            q,
            p,
            all_negs,
            temperature=temperature,
            neg_mask=all_mask,
            margin=margin,
            in_batch=in_batch,
            matryoshka=matryoshka,
        )
        return layout.retrieval_weight(rank) * loss, {"retrieval": loss.detach(), "sts": None}
    if sts_a is None or sts_b is None or sts_scores is None:
        raise LossInputError(f"rank {rank} is an STS rank: sts_a, sts_b and sts_scores are required")
    all_a = gather_with_grad(sts_a, groups.sts)
    all_b = gather_with_grad(sts_b, groups.sts)
    all_scores = gather_no_grad(sts_scores, groups.sts)
    loss = sts_term(all_a, all_b, all_scores, scale=scale, matryoshka=matryoshka)
    return layout.sts_weight(beta) * loss, {"retrieval": None, "sts": loss.detach()}
