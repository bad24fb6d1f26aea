"""The per-worker training objective of one step: encode this worker's texts, then the loss.

Pretraining: in-batch InfoNCE over the global batch (`losses.infonce.distributed_in_batch_infonce`).
Finetuning: the CBB loss of `losses.cbb.distributed_cbb_loss` (its docstring has the layout and the
scaling that makes the workers' averaged gradient the gradient of the global loss). Gradients are
averaged over workers after backward (`average_gradients`, what DDP does). Both stages run the same way
under gradient caching (`StepEncoder.grad_cache_chunk`, `train.grad_cache`): the objectives only see
embeddings, and `StepEncoder.backward` does the chunked back-propagation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from conan_core.distributed import world_info
from conan_core.losses.cbb import CbbEmbeddings, CbbShape, CbbTerms, distributed_cbb_loss
from conan_core.losses.infonce import distributed_in_batch_infonce
from conan_core.losses.matryoshka import MatryoshkaLoss
from conan_core.train.data import TokenBank
from conan_core.train.grad_cache import GradCache


@dataclass
class StepEncoder:
    """Runs the model on token batches: moves them to the device, bf16 autocast on GPU, float32 out.

    grad_cache_chunk set: gradient caching (`train.grad_cache`): a call returns embeddings computed in
    chunks of that many texts without a graph, and `backward` carries the loss's gradient to the model
    chunk by chunk; None: a call keeps the graph over all its texts and `backward` is one backward.
    """

    model: torch.nn.Module
    bank: TokenBank
    device: torch.device
    bf16: bool = False
    tokens: int = 0  # real (non-padding) tokens encoded so far, for tokens/s
    grad_cache_chunk: int | None = None
    _cache: GradCache | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.grad_cache_chunk is not None:
            self._cache = GradCache(self.features, self.forward, self.grad_cache_chunk, self.device)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """The texts' embeddings [n, d]: with a graph to the model, or GradCache's leaf (see the class)."""
        if self._cache is not None:
            return self._cache.embed(texts)
        return self.forward(self.features(texts))

    def features(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The texts as a padded batch on the CPU; counts their tokens (once per text per step)."""
        features = self.bank.features(texts)
        self.tokens += int(features["attention_mask"].sum())  # counted on the CPU copy: no device sync
        return features

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        features = {k: v.to(self.device, non_blocking=True) for k, v in features.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(features).float()

    def backward(self, objective: torch.Tensor) -> None:
        """Back-propagate this step's objective into the model's .grad (GradCache's parts 2 and 3 when
        on). An objective without grad (a worker with no part in this step's tasks) contributes zeros."""
        if self._cache is not None:
            self._cache.backward(objective)
        elif objective.requires_grad:
            objective.backward()


def pretrain_objective(encode: StepEncoder, queries: Sequence[str], positives: Sequence[str], *,
                       temperature: float, matryoshka: MatryoshkaLoss, symmetric: bool = False) -> torch.Tensor:
    """In-batch InfoNCE of this worker's queries against the positives of all workers (Eq. 1), and with
    `symmetric` of its positives against all queries too; scale 1 under gradient averaging (see
    `distributed_in_batch_infonce`)."""
    q = F.normalize(encode(queries), dim=-1)
    p = F.normalize(encode(positives), dim=-1)
    return distributed_in_batch_infonce(q, p, temperature, matryoshka=matryoshka, symmetric=symmetric)


@dataclass
class CbbWorkerBatch:
    """The texts one worker encodes in a CBB step.

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


def cbb_objective(encode: StepEncoder, batch: CbbWorkerBatch, shape: CbbShape, *, temperature: float,
                  beta: float, scale: float, in_batch: bool, matryoshka: MatryoshkaLoss,
                  tasks: tuple[str, ...] = ("retrieval", "sts"), share_negatives: bool = True,
                  neg_scores: bool = False) -> CbbTerms:
    """Encode what this worker hosts (only the terms of `tasks`), then `distributed_cbb_loss` (same flags)."""
    own_roles = shape.roles[world_info().rank]
    emb = CbbEmbeddings(neg_mask=batch.neg_mask)
    if "retrieval" in tasks and own_roles.retrieval_ranks:
        emb.q = F.normalize(encode(batch.queries), dim=-1)
        emb.p = F.normalize(encode(batch.positives), dim=-1)
        emb.negs = F.normalize(encode([t for g in own_roles.retrieval_ranks for row in batch.negatives[g]
                                       for t in row]), dim=-1)
    if "sts" in tasks and own_roles.sts_ranks:
        emb.sts_a = F.normalize(encode([t for s in own_roles.sts_ranks for t in batch.sts[s][0]]), dim=-1)
        emb.sts_b = F.normalize(encode([t for s in own_roles.sts_ranks for t in batch.sts[s][1]]), dim=-1)
        emb.sts_scores = torch.tensor([x for s in own_roles.sts_ranks for x in batch.sts[s][2]],
                                      dtype=torch.float32, device=encode.device)
    return distributed_cbb_loss(emb, shape, temperature=temperature, beta=beta, scale=scale,
                                in_batch=in_batch, matryoshka=matryoshka, tasks=tasks,
                                share_negatives=share_negatives, neg_scores=neg_scores)


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
