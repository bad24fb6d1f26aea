"""The mining actor pool: `size` mining actors (`conan_core.mining.actor`), fan-out + merge, retries, sizing.

The driver sends the queries to every shard (each actor directly: ActorPool balances load, it does not
broadcast) and merges the lists. No process ever holds more than one shard's vectors. An actor that dies
is restarted by Ray (`max_restarts`) and the shard calls it lost are sent again, so no query is lost.
`close()` (or leaving the `with` block) kills every actor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from conan_core.errors import ConanError
from conan_core.mining.actor import EmbeddingModel, ShardActor
from conan_core.mining.config import MiningConfig
from conan_core.mining.corpus import ShardRef
from conan_core.mining.index import merge_topk

RESTART_WAIT_S = 120.0  # how long a restarting actor may take (model load) before it is replaced


class MiningActorError(ConanError):
    """A mining actor kept dying: its shard could not be searched."""


class MiningPool:
    """`size` mining actors; encode() splits texts over them, search() fans queries out to every shard."""

    def __init__(self, encoder_factory: Callable[[], EmbeddingModel], config: MiningConfig, size: int) -> None:
        self._factory = encoder_factory
        self._config = config
        self.size = max(1, size)
        self.restarts = 0
        self.encoded_shards = 0
        self._threads = max(1, (os.cpu_count() or 1) // self.size)
        available = ray.available_resources().get("CPU", 0.0)
        # Fractional CPUs so the pool also fits beside a running trainer (0 = schedule anyway).
        self._num_cpus = min(1.0, available / self.size) if available >= 0.01 * self.size else 0.0
        self._actors = [self._new_actor() for _ in range(self.size)]
        try:
            fingerprints = set(self._run([(slot, lambda a: a.fingerprint.remote()) for slot in range(self.size)]))
            if len(fingerprints) != 1:
                raise ConanError(f"mining actors loaded different models: {sorted(fingerprints)}")
        except BaseException:
            self.close()  # no __exit__ for a pool that never finished starting
            raise
        self.fingerprint = fingerprints.pop()

    def _new_actor(self) -> Any:
        return ShardActor.options(num_cpus=self._num_cpus, max_restarts=self._config.max_actor_retries,
                                  max_task_retries=0).remote(self._factory, self._config, self._threads)

    def actor(self, slot: int) -> Any:
        return self._actors[slot]

    def close(self) -> None:
        for handle in self._actors:
            ray.kill(handle, no_restart=True)
        self._actors = []

    def __enter__(self) -> MiningPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised embeddings of `texts`, encoded in `size` parts in parallel (input order kept)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        # Strided parts (every size-th text) give each actor a similar mix of lengths.
        slots = [slot for slot in range(self.size) if texts[slot::self.size]]
        encoded = self._run([(slot, lambda a, slot=slot: a.encode.remote(texts[slot::self.size])) for slot in slots])
        out = np.zeros((len(texts), encoded[0].shape[1]), dtype=np.float32)
        for slot, vectors in zip(slots, encoded, strict=True):
            out[slot::self.size] = vectors
        return out

    def search(self, shards: list[ShardRef], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Global top-k (scores, corpus indices) of every query over all shards."""
        scores, indices, _ = self.search_scoring(shards, queries, k, np.zeros((0, 2), dtype=np.int64))
        return scores, indices

    def search_scoring(self, shards: list[ShardRef], queries: np.ndarray, k: int, pairs: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`search`, and the cosine of each (query row, global corpus row) of `pairs` [m, 2], computed by the
        actor that holds that row's shard (float32 [m])."""
        queries_ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        in_shard = [np.flatnonzero((pairs[:, 1] >= s.offset) & (pairs[:, 1] < s.offset + s.rows)) for s in shards]
        # (query row, row within the shard) for the actor; None where the shard holds no pair's document
        local = [pairs[sel] - np.array([0, s.offset]) if len(sel) else None
                 for s, sel in zip(shards, in_shard, strict=True)]
        calls = [(shard.index % self.size, lambda a, shard=shard, own=own: a.search.remote(shard, queries_ref, k, own))
                 for shard, own in zip(shards, local, strict=True)]
        results = self._run(calls)
        self.encoded_shards += sum(bool(r["encoded"]) for r in results)
        pair_scores = np.full(len(pairs), np.nan, dtype=np.float32)
        for sel, result in zip(in_shard, results, strict=True):
            pair_scores[sel] = result["pair_scores"]
        scores, indices = merge_topk([r["scores"] for r in results], [r["rows"] for r in results],
                                     [s.offset for s in shards], k)
        return scores, indices, pair_scores

    def _run(self, calls: list[tuple[int, Callable[[Any], Any]]]) -> list[Any]:
        """Submit each (actor slot, call); a call whose actor died is sent again once the actor is back."""
        results: list[Any] = [None] * len(calls)
        attempts = [0] * len(calls)
        pending = {make(self._actors[slot]): (i, self._actors[slot]) for i, (slot, make) in enumerate(calls)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i, handle = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except RayTaskError as err:
                if isinstance(err.cause, ConanError):
                    raise err.cause from None
                raise
            except RayActorError as err:
                slot, make = calls[i]
                attempts[i] += 1
                if attempts[i] > self._config.max_actor_retries:
                    raise MiningActorError(f"mining actor {slot} died {attempts[i]} times; last: "
                                           f"{str(err).splitlines()[0]}") from None
                self._recover(slot, handle)
                pending[make(self._actors[slot])] = (i, self._actors[slot])
        return results

    def _recover(self, slot: int, failed: Any) -> None:
        """Wait for Ray to restart the actor in `slot`; if it stays dead, put a fresh actor there."""
        if self._actors[slot] is not failed:
            return  # another lost call already brought this slot back
        self.restarts += 1
        deadline = time.monotonic() + RESTART_WAIT_S
        while time.monotonic() < deadline:
            try:
                ray.get(failed.pid.remote(), timeout=RESTART_WAIT_S)
                return
            except ActorUnavailableError:  # restarting: calls sent now would fail too
                time.sleep(0.2)
            except (RayActorError, GetTimeoutError):
                break
        ray.kill(failed, no_restart=True)
        self._actors[slot] = self._new_actor()


def pool_size(config: MiningConfig, shards: int) -> int:
    """`config.workers` (the one owner of the pool size), else one actor per shard but no more than the CPUs;
    never more actors than shards."""
    size = config.workers or min(shards, os.cpu_count() or 1)
    return max(1, min(size, shards))

