"""The per-worker training objective of one step, for pretraining and for CBB finetuning.

Gradients are averaged over workers after backward (`average_gradients`, what DDP does), so each worker's
objective is scaled such that the average of the workers' gradients is exactly the gradient of the
global loss. The CBB form also covers a worker that computes several logical ranks of the layout
(fewer workers than the layout asks for), so the loss and gradient are the same on 1 worker and on 8.

CBB global loss (paper Eq. 3), as `conan_core.losses.cbb.cbb_loss` computes it on one process:
    L = L_ret(q, p, [negatives of all G group ranks]) + beta * CoSENT(pairs of all S STS ranks)
A worker hosting retrieval ranks encodes the (shared) queries and positives once and its ranks' negatives;
negatives and STS pairs are all-gathered with gradient. With W workers, M of them hosting retrieval ranks
and M_s hosting STS ranks, every retrieval worker computes the same L_ret and every STS worker the same
CoSENT; a gathered tensor's gradient sums over the workers that used it and q, p are counted once per
retrieval worker, so the objective W/M * L_ret + beta * W/M_s * L_sts averaged over W workers gives
dL/dtheta exactly (the same derivation as `distributed_cbb_terms`, which assumes one rank per worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from conan_core.distributed import gather_no_grad, gather_with_grad, world_info
from conan_core.losses.cbb import retrieval_term, sts_term
from conan_core.losses.infonce import distributed_in_batch_infonce, query_negative_scores
from conan_core.losses.matryoshka import MatryoshkaLoss
from conan_core.train.batching import WorkerRoles
from conan_core.train.data import TokenBank


@dataclass
class Encoder:
    """Runs the model on token batches: moves them to the device, bf16 autocast on GPU, float32 out."""

    model: torch.nn.Module
    bank: TokenBank
    device: torch.device
    bf16: bool = False
    tokens: int = 0  # real (non-padding) tokens encoded so far, for tokens/s

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        features = self.bank.features(texts)
        self.tokens += int(features["attention_mask"].sum())  # counted on the CPU copy: no device sync
        features = {k: v.to(self.device, non_blocking=True) for k, v in features.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(features).float()


def pretrain_objective(encode: Encoder, queries: Sequence[str], positives: Sequence[str], *,
                       temperature: float, matryoshka: MatryoshkaLoss) -> torch.Tensor:
    """In-batch InfoNCE of this worker's queries against the positives of all workers (Eq. 1);
    scale 1 under gradient averaging (see `distributed_in_batch_infonce`)."""
    q = F.normalize(encode(queries), dim=-1)
    p = F.normalize(encode(positives), dim=-1)
    return distributed_in_batch_infonce(q, p, temperature, matryoshka=matryoshka)


@dataclass
class CbbWorkerBatch:
    """What one worker encodes in a CBB step.

    queries/positives: the group's shared batch (empty when the worker hosts no retrieval rank);
    negatives[g]: for hosted group rank g, one list of n negative texts per query;
    neg_mask: [B, G*n] True where a query's slot is empty (its list was short: "" is encoded there and
    left out of the softmax), in group-rank order; None: every slot is filled;
    sts[s]: for hosted STS rank s, (first texts, second texts, scores).
    """

    queries: list[str] = field(default_factory=list)
    positives: list[str] = field(default_factory=list)
    negatives: dict[int, list[list[str]]] = field(default_factory=dict)
    neg_mask: torch.Tensor | None = None
    sts: dict[int, tuple[list[str], list[str], list[float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class CbbShape:
    """Sizes every worker must agree on so the gathers line up."""

    roles: tuple[WorkerRoles, ...]
    retrieval_batch: int
    negatives_per_rank: int
    sts_batch: int
    dim: int


@dataclass
class CbbStepOutput:
    objective: torch.Tensor
    retrieval_loss: torch.Tensor | None  # this worker's L_ret (same on every retrieval worker), detached
    sts_loss: torch.Tensor | None
    neg_scores: torch.Tensor | None  # [B, G*n] cosines of each query to its negatives (for DHNM), detached


def cbb_objective(encode: Encoder, batch: CbbWorkerBatch, shape: CbbShape, *, temperature: float,
                  beta: float, scale: float, in_batch: bool, matryoshka: MatryoshkaLoss,
                  tasks: tuple[str, ...] = ("retrieval", "sts"), share_negatives: bool = True,
                  neg_scores: bool = False) -> CbbStepOutput:
    """This worker's objective for the step (see the module docstring for the scaling).

    tasks: which terms this step carries (CBB: both; vanilla: one). share_negatives=False gives the
    vanilla retrieval loss: each group rank's queries see only that rank's negatives.
    neg_scores=True: in vanilla mode too, return every query's cosines to the negatives of all group
    ranks (gathered without gradient), which DHNM needs; CBB mode always has them.
    Every worker must call this with the same `tasks` and flags (the gathers are collective).
    """
    info = world_info()
    mine = shape.roles[info.rank]
    use_ret, use_sts = "retrieval" in tasks, "sts" in tasks
    n, rows, dim = shape.negatives_per_rank, shape.retrieval_batch, shape.dim
    q = p = negs = a = b = scores = None
    if use_ret and mine.retrieval_ranks:
        q = F.normalize(encode(batch.queries), dim=-1)
        p = F.normalize(encode(batch.positives), dim=-1)
        negs = F.normalize(encode([t for g in mine.retrieval_ranks for row in batch.negatives[g] for t in row]),
                           dim=-1)
    if use_sts and mine.sts_ranks:
        a = F.normalize(encode([t for s in mine.sts_ranks for t in batch.sts[s][0]]), dim=-1)
        b = F.normalize(encode([t for s in mine.sts_ranks for t in batch.sts[s][1]]), dim=-1)
        scores = torch.tensor([x for s in mine.sts_ranks for x in batch.sts[s][2]], dtype=torch.float32,
                              device=encode.device)
    # One gather per step for everything shared: a single collective keeps every worker's backward
    # (a reduce-scatter) in the same order, whatever each worker computed.
    segments = []
    if use_ret and share_negatives:
        segments.append(Segment(negs, tuple(r.retrieval_ranks for r in shape.roles), rows * n))
    if use_sts:
        sts_blocks = tuple(r.sts_ranks for r in shape.roles)
        segments += [Segment(a, sts_blocks, shape.sts_batch), Segment(b, sts_blocks, shape.sts_batch)]
    gathered, keep_alive = gather_segments(segments, dim, encode.device)
    objective = keep_alive
    out = CbbStepOutput(objective, None, None, None)
    if use_ret and share_negatives:
        all_negs = gathered.pop(0)
        if q is not None:
            group = all_negs.shape[0] // (rows * n)
            all_negs = all_negs.view(group, rows, n, dim).permute(1, 0, 2, 3).reshape(rows, group * n, dim)
            loss = retrieval_term(q, p, all_negs, temperature=temperature, in_batch=in_batch,
                                  neg_mask=batch.neg_mask, matryoshka=matryoshka)
            hosts = sum(1 for r in shape.roles if r.retrieval_ranks)
            objective = objective + info.size / hosts * loss
            out.retrieval_loss = loss.detach()
            out.neg_scores = _masked_nan(query_negative_scores(q, all_negs).detach(), batch.neg_mask)
    elif use_ret:
        out.retrieval_loss, term = _vanilla_retrieval(q, p, negs, batch.neg_mask, shape, mine,
                                                      temperature=temperature, in_batch=in_batch,
                                                      matryoshka=matryoshka)
        if term is not None:
            objective = objective + info.size * term
        if neg_scores:
            out.neg_scores = _masked_nan(_vanilla_negative_scores(q, negs, shape, dim, encode.device),
                                         batch.neg_mask)
    if use_sts:
        all_a, all_b = gathered
        all_scores = gather_segments([Segment(scores, sts_blocks, shape.sts_batch)], None, encode.device,
                                     grad=False)[0][0]
        if a is not None:
            loss = sts_term(all_a, all_b, all_scores, scale=scale, matryoshka=matryoshka)
            hosts = sum(1 for r in shape.roles if r.sts_ranks)
            objective = objective + (beta if use_ret else 1.0) * info.size / hosts * loss
            out.sts_loss = loss.detach()
    out.objective = objective
    return out


def _masked_nan(scores: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Empty slots as NaN: DHNM skips them instead of taking the score of "" as a negative's."""
    if scores is None or mask is None:
        return scores
    return scores.masked_fill(mask, float("nan"))


def _vanilla_negative_scores(q, negs, shape: CbbShape, dim: int, device: torch.device) -> torch.Tensor | None:
    """[B, G*n] cosines of each query to the negatives of every group rank, for DHNM in vanilla mode.
    The negatives are gathered detached: scores are observations, not part of the loss."""
    rows, n = shape.retrieval_batch, shape.negatives_per_rank
    segment = Segment(negs.detach() if negs is not None else None, tuple(r.retrieval_ranks for r in shape.roles),
                      rows * n)
    all_negs = gather_segments([segment], dim, device, grad=False)[0][0]
    if q is None:
        return None
    group = all_negs.shape[0] // (rows * n)
    all_negs = all_negs.view(group, rows, n, dim).permute(1, 0, 2, 3).reshape(rows, group * n, dim)
    return query_negative_scores(q.detach(), all_negs)


def _vanilla_retrieval(q, p, negs, neg_mask, shape: CbbShape, mine: WorkerRoles, *, temperature: float,
                       in_batch: bool, matryoshka: MatryoshkaLoss) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Vanilla: L_ret = (1/G) sum_g InfoNCE(q, p, negatives of rank g only); no gather.
    Returns (the global L_ret detached on workers with retrieval ranks, this worker's share)."""
    n, rows = shape.negatives_per_rank, shape.retrieval_batch
    term = None
    if negs is not None:
        per_rank = negs.view(len(mine.retrieval_ranks), rows, n, -1)
        masks = [neg_mask[:, g * n:(g + 1) * n] if neg_mask is not None else None for g in mine.retrieval_ranks]
        losses = [retrieval_term(q, p, part, temperature=temperature, in_batch=in_batch, neg_mask=mask,
                                 matryoshka=matryoshka)
                  for part, mask in zip(per_rank, masks, strict=True)]
        term = torch.stack(losses).sum() / sum(len(r.retrieval_ranks) for r in shape.roles)
    zero = torch.zeros((), device=q.device if q is not None else None)
    total = _sum_over_workers(term.detach() if term is not None else zero)  # collective: every worker
    return (total if term is not None else None), term


@dataclass(frozen=True)
class Segment:
    """Per-logical-rank blocks of rows one worker contributes to a gather.

    blocks[w] lists the logical ranks worker w holds, in order; each block is `rows` rows; `local` is this
    worker's blocks stacked (None when it holds none)."""

    local: torch.Tensor | None
    blocks: tuple[tuple[int, ...], ...]
    rows: int

    @property
    def padded_rows(self) -> int:
        return self.rows * max(len(b) for b in self.blocks)


def gather_segments(segments: Sequence[Segment], dim: int | None, device: torch.device, grad: bool = True
                    ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """All-gather several segments in one collective; each comes back with its blocks in logical-rank
    order (the zero padding that equalises shapes dropped). Also returns a zero scalar that depends on
    the gathered tensor, to add to the objective so every worker runs the gather's backward."""
    if not segments:
        return [], torch.zeros((), device=device)
    rank = world_info().rank
    parts = []
    for seg in segments:
        tail = () if dim is None else (dim,)
        held = len(seg.blocks[rank]) * seg.rows
        padding = torch.zeros((seg.padded_rows - held, *tail), device=device)
        parts.append(padding if seg.local is None else torch.cat([seg.local, padding]))
    payload = torch.cat(parts)
    if grad and not payload.requires_grad:
        # This worker holds only padding this step (e.g. a vanilla STS step on a retrieval-only worker): its
        # payload must still take part in autograd, or it would skip the gather's collective backward.
        payload.requires_grad_(True)
    gathered = gather_with_grad(payload) if grad else gather_no_grad(payload)
    per_worker = payload.shape[0]
    out, offset = [], 0
    for seg in segments:
        position = {lr: (w, j) for w, ranks in enumerate(seg.blocks) for j, lr in enumerate(ranks)}
        index = [w * per_worker + offset + j * seg.rows + i
                 for lr in sorted(position) for w, j in [position[lr]] for i in range(seg.rows)]
        out.append(gathered.index_select(0, torch.tensor(index, device=device)))
        offset += seg.padded_rows
    keep_alive = gathered.sum() * 0.0 if grad else torch.zeros((), device=device)
    return out, keep_alive


def _sum_over_workers(value: torch.Tensor) -> torch.Tensor:
    if world_info().size > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average .grad over workers in one flat all-reduce (what DDP does; parameters a worker did not
    use this step count as zero there)."""
    size = world_info().size
    if size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        count = grad.numel()
        param.grad = flat[offset:offset + count].view_as(param)
        offset += count
