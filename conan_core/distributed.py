"""Cross-worker collectives that the losses need: a gather that keeps the full gradient, and one gather
of several per-logical-rank segments (the CBB step's negatives and STS pairs) in one collective.

Why not `torch.distributed.all_gather`: its outputs carry no grad, and the usual fix (put the local
tensor back into its own slot) keeps only the gradient of the *local* loss with respect to the local
tensor; the terms that other ranks' losses contribute are lost (measured in
/work/shared/notes/platform.md §3.2: 2 / 8 instead of 6 / 12). The functional collective below has an
autograd rule whose backward is a reduce-scatter with SUM, so each rank's input receives the sum, over
the ranks of the group, of the gradient every rank's loss sends to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits in a process group: its rank in the group and the group's size."""

    rank: int
    size: int
    initialized: bool


def world_info(group: dist.ProcessGroup | None = None) -> WorldInfo:
    """Rank and size in `group` (default: the whole world); rank 0 / size 1 when not distributed.

    A process that is not a member of `group` gets rank -1 (as torch.distributed reports it).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return WorldInfo(rank=0, size=1, initialized=False)
    return WorldInfo(rank=dist.get_rank(group), size=dist.get_world_size(group), initialized=True)


def _resolved_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return group if group is not None else dist.group.WORLD


def gather_with_grad(t: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 0) -> torch.Tensor:
    """All-gather `t` over `group`, concatenated along `dim` in group-rank order, with full gradient.

    Every rank must pass a tensor of the same shape (the batching layer keeps per-rank batch sizes
    equal). Pass-through when torch.distributed is not initialised or the group has one member.
    """
    info = world_info(group)
    if not info.initialized or info.size == 1:
        return t
    # The functional collective gathers along dim 0 only, so move `dim` to the front and back.
    moved = t.movedim(dim, 0).contiguous()
    gathered = funcol.all_gather_single_autograd(moved, 0, _resolved_group(group))
    if isinstance(gathered, funcol.AsyncCollectiveTensor):
        gathered = gathered.wait()
    return gathered.movedim(0, dim)


def gather_no_grad(t: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 0) -> torch.Tensor:
    """All-gather a tensor that needs no gradient (masks, labels); bool tensors travel as uint8."""
    info = world_info(group)
    if not info.initialized or info.size == 1:
        return t
    as_bool = t.dtype == torch.bool
    send = (t.to(torch.uint8) if as_bool else t).detach().contiguous()
    parts = [torch.empty_like(send) for _ in range(info.size)]
    dist.all_gather(parts, send, group=_resolved_group(group))
    gathered = torch.cat(parts, dim=dim)
    return gathered.bool() if as_bool else gathered


def mean_over_ranks(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The average of a detached tensor over the ranks of `group` (for logging a global loss value)."""
    info = world_info(group)
    if not info.initialized or info.size == 1:
        return t.detach()
    total = t.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=_resolved_group(group))
    return total / info.size


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
