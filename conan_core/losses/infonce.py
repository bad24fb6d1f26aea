"""InfoNCE: in-batch negatives (pretraining) and hard negatives (retrieval finetuning).

Embeddings are L2-normalised by the caller, so q . p is the cosine s(q, p).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from conan_core.distributed import gather_with_grad, world_info
from conan_core.losses.checks import (
    LossInputError,
    require_dims,
    require_mask_shape,
    require_positive,
    require_same_width,
)
from conan_core.losses.guards import false_negative_mask
from conan_core.losses.matryoshka import MatryoshkaLoss


def in_batch_infonce(
    q: torch.Tensor, p: torch.Tensor, temperature: float = 0.05, *, positive_offset: int = 0
) -> torch.Tensor:
    """InfoNCE with in-batch negatives, Conan-embedding Eq. 1 (arXiv 2408.15710) with a temperature:

        L = -(1/B) sum_i log( exp(s(q_i, p_{i+o}) / tau) / sum_{j=1..M} exp(s(q_i, p_j) / tau) )

    q [B, d], p [M, d] with M >= B + o; the positive of q[i] is p[i + o] (o = `positive_offset`, used when
    p holds the positives of several workers and these queries are worker r's: o = r * B). Every other
    row of p is a negative of q[i]. The paper writes a sum over i without tau; we take the mean (so the
    value does not grow with the batch) and divide by tau (the paper leaves tau open).
    """
    require_dims("q", q, 2)
    require_dims("p", p, 2)
    require_same_width(q=q, p=p)
    require_positive("temperature", temperature)
    if positive_offset < 0 or q.shape[0] + positive_offset > p.shape[0]:
        raise LossInputError(
            f"p has {p.shape[0]} rows, fewer than {q.shape[0]} queries + positive_offset {positive_offset}"
        )
    logits = q @ p.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + positive_offset
    return F.cross_entropy(logits, labels)


def query_negative_scores(q: torch.Tensor, negs: torch.Tensor) -> torch.Tensor:
    """Cosines s(q_i, n_ik) as [B, K] (q [B, d], negs [B, K, d]); DHNM observes these (detached)."""
    return torch.einsum("bd,bkd->bk", q, negs)


def hard_negative_infonce(
    q: torch.Tensor,
    p: torch.Tensor,
    negs: torch.Tensor,
    temperature: float = 0.05,
    in_batch: bool = False,
    neg_mask: torch.Tensor | None = None,
    margin: float | None = None,
) -> torch.Tensor:
    """InfoNCE with hard negatives, the retrieval term of Conan-embedding Eq. 3 (arXiv 2408.15710):

        L = -(1/B) sum_i log( exp(s(q_i, p_i)/tau) / (exp(s(q_i, p_i)/tau) + sum_k exp(s(q_i, n_ik)/tau)) )

    q [B, d]; p [M, d] with M >= B, the positive of q[i] is p[i]; negs [B, K, d], the hard negatives of
    q[i] are negs[i]. in_batch=True also puts every other row of p (the other queries' positives) in
    q[i]'s denominator. A negative is left out of the denominator where `neg_mask` [B, K] is True (the
    caller's text rule) or, when `margin` is set, where s(q_i, n_ik) > s(q_i, p_i) - margin
    (guards.additive_margin_mask, via guards.false_negative_mask). The positive is never masked, so the
    loss stays finite.
    """
    require_dims("q", q, 2)
    require_dims("p", p, 2)
    require_dims("negs", negs, 3)
    require_same_width(q=q, p=p, negs=negs)
    require_positive("temperature", temperature)
    batch = q.shape[0]
    if p.shape[0] < batch or negs.shape[0] != batch:
        raise LossInputError(
            f"need p with >= {batch} rows and negs with {batch} rows, got p {tuple(p.shape)}, "
            f"negs {tuple(negs.shape)}"
        )
    require_mask_shape(neg_mask, tuple(negs.shape[:2]))
    pos_scores = (q * p[:batch]).sum(-1)
    neg_scores = query_negative_scores(q, negs)
    if neg_mask is not None or margin is not None:
        drop = false_negative_mask(pos_scores, neg_scores, margin, text_mask=neg_mask)
        neg_scores = neg_scores.masked_fill(drop, float("-inf"))
    labels = torch.arange(batch, device=q.device)
    if in_batch:
        # Column i of q @ p.T is q[i]'s own positive, so the label is i.
        scores = torch.cat([q @ p.T, neg_scores], dim=1)
    else:
        scores = torch.cat([pos_scores.unsqueeze(1), neg_scores], dim=1)
        labels = torch.zeros_like(labels)
    return F.cross_entropy(scores / temperature, labels)


def symmetric_in_batch_infonce(
    q: torch.Tensor, p: torch.Tensor, temperature: float = 0.05, *, positive_offset: int = 0,
    q_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional in-batch InfoNCE (the query->passage and passage->query terms of GTE's improved
    contrastive loss, Li et al. 2023, arXiv 2308.03281; CLIP's symmetric loss):

        L = (1/2) [ InfoNCE(q -> p) + InfoNCE(p -> q) ]

    q->p is `in_batch_infonce(q, p)`; p->q scores each local positive p[i + o] against all queries
    (`q_all`, default q: the gathered queries of every worker, whose row i + o is q[i]). Both directions
    read one similarity matrix's rows and columns, so it costs no extra encoding.
    """
    q_all = q if q_all is None else q_all
    local_p = p[positive_offset:positive_offset + q.shape[0]]
    forward = in_batch_infonce(q, p, temperature, positive_offset=positive_offset)
    backward = in_batch_infonce(local_p, q_all, temperature, positive_offset=positive_offset)
    return (forward + backward) / 2


def distributed_in_batch_infonce(
    q_local: torch.Tensor,
    p_local: torch.Tensor,
    temperature: float = 0.05,
    group: dist.ProcessGroup | None = None,
    matryoshka: MatryoshkaLoss | None = None,
    symmetric: bool = False,
) -> torch.Tensor:
    """Eq. 1 across workers: this rank's B queries against the positives of all W ranks of `group`.

    The positives are gathered with gradient (gather_with_grad, rank order), so q_local[i]'s positive
    sits at row rank * B + i. Every rank must hold the same B. Returns this rank's loss
    l_r = in_batch_infonce over its own queries; call .backward() on it as it is (scale factor 1):

      * the global loss is L = (1/W) sum_r l_r (the mean over all W*B queries);
      * backward on rank r gives its local q, p the gradient of l_r, and through the gather's
        reduce-scatter(SUM) its p also receives d l_s / d p_r from every other rank s; summed over ranks
        the local parameter gradients are therefore sum_r d l_r / d theta;
      * DDP averages over the W ranks: (1/W) sum_r d l_r / d theta = dL / d theta. Exact.

    That holds when `group` is the DDP world (or, for a subgroup, whenever every rank has the same B).
    `mean_over_ranks(l_r.detach())` is the global L for logging. matryoshka: applied after the gather.
    symmetric: `symmetric_in_batch_infonce` (the queries are gathered too, with gradient, so each rank's
    positives also rank all W*B queries; the same scale-1 argument holds for both terms).
    """
    info = world_info(group)
    p_all = gather_with_grad(p_local, group)
    mrl = matryoshka or MatryoshkaLoss(None)
    offset = info.rank * q_local.shape[0]
    if not symmetric:
        return mrl(in_batch_infonce, q_local, p_all, temperature=temperature, positive_offset=offset)
    q_all = gather_with_grad(q_local, group)

    def both_directions(q: torch.Tensor, p: torch.Tensor, q_gathered: torch.Tensor) -> torch.Tensor:
        return symmetric_in_batch_infonce(q, p, temperature, positive_offset=offset, q_all=q_gathered)

    return mrl(both_directions, q_local, p_all, q_all)  # Matryoshka truncates all three to each dim
