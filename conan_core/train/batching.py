"""Deterministic, resumable batch streams and the CBB task->worker layout.

A `BatchStream` turns one task's examples into a sequence of global batches. The plan of an epoch is
a pure function of (seed, stream name, epoch), so every worker computes the same plan without talking
to the others, and a stream's whole state is (epoch, index): saving those two numbers in a checkpoint
is enough for a resumed run to repeat or skip no batch.

Inside an epoch, examples are drawn per source by weight, cut into chunks of `bucket_batches` batches,
sorted by token length inside a chunk (so a batch carries little padding) and the batches shuffled.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from conan_core.errors import ConanError
from conan_core.losses.cbb import WorkerRoles
from conan_core.train.config import LayoutConfig


class TrainDataError(ConanError):
    """The training data cannot fill the requested batches (empty task, missing sources)."""


class LayoutError(ConanError):
    """The CBB layout and the number of workers do not fit together."""


@dataclass
class StreamState:
    epoch: int = 0
    index: int = 0


@dataclass
class BatchStream:
    """Global batches of example indices over `groups` (one index array per source)."""

    name: str
    groups: list[np.ndarray]
    lengths: np.ndarray
    batch_size: int
    seed: int = 0
    weights: list[float] | None = None
    one_group_per_batch: bool = False
    bucket_batches: int = 32
    state: StreamState = field(default_factory=StreamState)
    _plan_epoch: int = field(default=-1, repr=False)
    _plan: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.groups = [np.asarray(g, dtype=np.int64) for g in self.groups]
        if sum(len(g) for g in self.groups) == 0:
            raise TrainDataError(f"task {self.name!r} has no examples")
        if self.weights is not None and len(self.weights) != len(self.groups):
            raise ValueError("one weight per group")

    def _quotas(self) -> list[int]:
        """How many examples each group contributes to one epoch."""
        sizes = [len(g) for g in self.groups]
        if self.weights is None:
            return sizes
        total_weight = sum(w for w, size in zip(self.weights, sizes, strict=True) if size > 0)
        if total_weight <= 0:
            raise TrainDataError(f"task {self.name!r}: all sources with data have weight 0")
        return [round(sum(sizes) * w / total_weight) if size else 0
                for w, size in zip(self.weights, sizes, strict=True)]

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(self.name.encode()), epoch])

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches, each an array of `batch_size` example indices."""
        if epoch == self._plan_epoch:
            return self._plan
        rng = self._rng(epoch)
        drawn = [_draw(rng, group, quota) for group, quota in zip(self.groups, self._quotas(), strict=True)]
        if self.one_group_per_batch:
            batches = [b for sample in drawn if len(sample) for b in self._bucketed(rng, sample)]
        else:
            mixed = np.concatenate(drawn)
            batches = self._bucketed(rng, mixed[rng.permutation(len(mixed))])
        order = rng.permutation(len(batches))
        self._plan, self._plan_epoch = [batches[i] for i in order], epoch
        return self._plan

    def _bucketed(self, rng: np.random.Generator, sample: np.ndarray) -> list[np.ndarray]:
        """Cut into batches of similar length; the last batch is topped up from the sample's start."""
        if len(sample) % self.batch_size:
            missing = self.batch_size - len(sample) % self.batch_size
            sample = np.concatenate([sample, np.resize(sample, missing)])
        chunk = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, len(sample), chunk):
            part = sample[start:start + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        return batches

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_plan(self.state.epoch))

    def next(self) -> np.ndarray:
        """The next global batch; moves the position (epoch, index) forward."""
        plan = self.epoch_plan(self.state.epoch)
        batch = plan[self.state.index]
        self.state.index += 1
        if self.state.index == len(plan):
            self.state = StreamState(self.state.epoch + 1, 0)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "index": self.state.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = StreamState(int(state["epoch"]), int(state["index"]))


def _draw(rng: np.random.Generator, group: np.ndarray, quota: int) -> np.ndarray:
    """`quota` indices of `group` in random order; whole permutations repeat when upsampling."""
    if quota == 0 or len(group) == 0:
        return np.zeros(0, dtype=np.int64)
    rounds = -(-quota // len(group))
    return np.concatenate([group[rng.permutation(len(group))] for _ in range(rounds)])[:quota]


def rank_slice(batch: np.ndarray, rank: int, per_rank: int) -> np.ndarray:
    return batch[rank * per_rank:(rank + 1) * per_rank]


def assign_roles(layout: LayoutConfig, world_size: int) -> list[WorkerRoles]:
    """Spread the layout's logical ranks round-robin over the physical workers.

    With fewer workers than logical ranks a worker computes several of them (the same math as on more
    machines); more workers than logical ranks would leave a worker idle, which we refuse.
    """
    logical = [("r", i) for i in range(layout.retrieval_group)] + [("s", i) for i in range(layout.sts_workers)]
    if world_size > len(logical):
        raise LayoutError(f"{world_size} workers but the CBB layout has only {len(logical)} ranks "
                          f"(retrieval_group={layout.retrieval_group}, sts_workers={layout.sts_workers}); "
                          "use fewer workers or a bigger layout")
    roles = []
    for worker in range(world_size):
        hosted = logical[worker::world_size]
        roles.append(WorkerRoles(tuple(i for kind, i in hosted if kind == "r"),
                                 tuple(i for kind, i in hosted if kind == "s")))
    return roles


def negatives_slice(negatives: Sequence[str], group_rank: int, per_rank: int) -> list[str | None]:
    """Group rank g's hard negatives: items g*n .. (g+1)*n of the query's list. Slots the list cannot fill
    are None (the loss masks them): a text is never repeated in one query's denominator, so a query with
    one negative does not get it n times."""
    start = group_rank * per_rank
    return [negatives[start + i] if start + i < len(negatives) else None for i in range(per_rank)]
