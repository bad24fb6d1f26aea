"""Gradient caching (GradCache): a contrastive step over a large batch in the memory of one chunk.

Gao, Zhang, Han and Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup" (RepL4NLP, arXiv 2101.06983). A contrastive loss couples every embedding of the batch, so the
batch cannot be cut into independent micro-batches; but the loss reaches the model only through the
embeddings e_i, so dL/dtheta = sum_i (dL/de_i) . (de_i/dtheta), and the step runs in three parts:

  1. `embed`: encode the texts chunk by chunk under no_grad (no activations kept) and hand the loss
     one leaf tensor of all their embeddings, requiring grad;
  2. `backward`, first the objective's own backward: it stops at the leaves and leaves dL/de there
     (in the distributed losses it also runs the gathers' reduce-scatter, exactly as the plain step);
  3. then the replay: re-encode each chunk with a graph and back-propagate (e_chunk * dL/de_chunk).sum()
     (`e.backward(grad)`), which adds that chunk's share of dL/dtheta to .grad. Only one chunk's
     activations are alive at any time.

Exactness: the replay must compute the same e as part 1, so each chunk's RNG state (CPU, and the CUDA
device's) is saved before its no-grad pass and set again for its replay: dropout draws the same masks
(what GradCache's RandContext and sentence-transformers' CachedMultipleNegativesRankingLoss do). The
replay runs under `torch.random.fork_rng`, so afterwards the RNG continues from where part 1 left it, as
after a plain step. What the caller does to the embeddings (L2 normalisation, Matryoshka truncation, the
cross-worker gathers) happens on the leaves, in part 2's graph, so its Jacobian is counted once.
Cost: one more forward pass per chunk (a plain step is ~3 forwards' worth, so ~1/3 more compute);
memory: one chunk's activations plus the batch's embeddings, whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

Features = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RngState:
    """The generator states a forward pass draws from: the CPU one, and the CUDA device's when on GPU."""

    cpu: torch.Tensor
    device: torch.device
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), device, cuda)

    @contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the block from this state; the RNG is put back as it was afterwards."""
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@dataclass
class _CachedCall:
    """One `embed` call: its chunks (features and RNG state) and the leaf the loss got."""

    chunks: list[tuple[Features, RngState]]
    embeddings: torch.Tensor


class GradCache:
    """The three parts above for one training step at a time.

    features: texts -> a padded batch (called once per chunk, in part 1 only; the replay reuses it);
    forward: a batch -> its embeddings [n, d] with a graph to the model; chunk: texts per chunk.
    """

    def __init__(self, features: Callable[[Sequence[str]], Features],
                 forward: Callable[[Features], torch.Tensor], chunk: int, device: torch.device) -> None:
        if chunk <= 0:
            raise ValueError(f"the GradCache chunk must be a positive number of texts, got {chunk}")
        self.features, self.forward, self.chunk, self.device = features, forward, chunk, device
        self._pending: list[_CachedCall] = []

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Part 1: the texts' embeddings [n, d], computed without a graph, as a leaf requiring grad."""
        chunks, parts = [], []
        for start in range(0, len(texts), self.chunk):
            features = self.features(texts[start:start + self.chunk])  # padded to the chunk's longest
            state = RngState.capture(self.device)
            with torch.no_grad():
                parts.append(self.forward(features))
            chunks.append((features, state))
        embeddings = torch.cat(parts).requires_grad_()
        self._pending.append(_CachedCall(chunks, embeddings))
        return embeddings

    def backward(self, objective: torch.Tensor) -> None:
        """Parts 2 and 3: the objective's backward to the leaves of this step's `embed` calls, then the
        replay into the model's .grad. An objective without grad (a worker with no part in this step's
        tasks) contributes nothing; the pending calls are dropped either way."""
        pending, self._pending = self._pending, []
        if not objective.requires_grad:
            return
        objective.backward()
        for call in pending:
            self._replay(call)

    def _replay(self, call: _CachedCall) -> None:
        grad = call.embeddings.grad
        if grad is None:  # the loss did not use these embeddings: no gradient to carry on
            return
        offset = 0
        for features, state in call.chunks:
            with state.replayed():  # the same dropout masks as this chunk's pass in part 1
                embeddings = self.forward(features)
            rows = embeddings.shape[0]
            embeddings.backward(grad[offset:offset + rows])  # = (e * dL/de).sum().backward()
            offset += rows
