"""Dynamic hard negative mining (DHNM): swap a query's negatives once the model has learned them.

Conan-embedding, arXiv 2408.15710 §2.2 (v1): for each query keep the average score (cosine with the query)
of its current hard negatives, first observed value = `initial`. Every `check_every` steps a query is
stale when

    current * 1.15 < initial  and  |current| < 0.8

and its i-th replacement takes the candidates ranked (i-1)*n + 10 .. i*n + 10 (n = negatives per query;
ranks below 10 are never used: likely false negatives). Scores come from the training forward pass
(`observe`), so a check costs no encoding.

Conan-embedding-v2, arXiv 2509.12892 Eq. 6 (variant "v2"), per negative with initial score S0 and
current score S:

    replace if S0 < 0.4,  or  1.2 * S < S0 and S < 0.7

by the next unused candidate of the query's list.

A query starts with its record's own negatives (window 0) when it has any, topped up from rank 10 to n;
otherwise with window 1. A window that the list cannot fill is not taken (the query keeps its
negatives and counts as exhausted). The initial score restarts with the first observation of new
negatives. Metrics (Fig. 2 of the paper) go to a JSONL file: one line per step that observed scores
(`kind: step`, mean hard-negative score) and one per check (`kind: check`, stale fraction, ...).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conan_core.errors import ConanError
from conan_core.mining.candidates import CandidateLists
from conan_core.mining.config import DHNMConfig

STATE_FORMAT = 1


def window_ranks(i: int, n: int, skip: int = 10) -> range:
    """Candidate ranks of the i-th replacement (i >= 1): (i-1)*n + skip .. i*n + skip (end excluded)."""
    if i < 1:
        raise ValueError(f"replacement windows count from 1, got {i}")
    return range((i - 1) * n + skip, i * n + skip)


def is_stale_v1(initial: float, current: float, factor: float = 1.15, abs_limit: float = 0.8) -> bool:
    """Conan v1: the query's negatives got easy (score fell by the factor) and are not near-duplicates."""
    return current * factor < initial and abs(current) < abs_limit


def is_stale_v2(initial: float, current: float, min_initial: float = 0.4, factor: float = 1.2,
                limit: float = 0.7) -> bool:
    """Conan v2 Eq. 6, one negative: too easy from the start, or no longer hard."""
    return initial < min_initial or (factor * current < initial and current < limit)


@dataclass
class QueryState:
    """Negatives of one query as refs (>= 0: candidate rank; < 0: the record's own negative -(ref+1))."""

    slots: list[int]
    window: int
    next_rank: int
    initial: list[float | None]
    current: list[float | None]
    replacements: int = 0
    stale_since_remine: bool = False

    def reset_scores(self) -> None:
        self.initial = [None] * len(self.slots)
        self.current = [None] * len(self.slots)


class DynamicNegatives:
    """The finetune loop's view of hard negatives: which to use now, and when to swap them."""

    def __init__(self, candidates: CandidateLists, n_negatives: int, config: DHNMConfig, *,
                 metrics_path: str | Path | None = None) -> None:
        if n_negatives < 1:
            raise ConanError(f"n_negatives must be >= 1, got {n_negatives}")
        self.candidates = candidates
        self.n = n_negatives
        self.config = config
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.version = 0  # bumped on every swap or re-mine; saved with the checkpoint
        self._states: dict[str, QueryState] = {}
        self._step_scores: list[float] = []

    # ---- negatives ----------------------------------------------------------------------------
    def negatives(self, query_id: str) -> list[str]:
        """The query's current hard negatives (texts; up to n, fewer only when its list is that short)."""
        state = self._state(query_id)
        return [self._text(query_id, ref) for ref in state.slots]

    def _state(self, query_id: str) -> QueryState:
        state = self._states.get(query_id)
        if state is None:
            state = self._fresh_state(query_id, use_record_negatives=True)
            self._states[query_id] = state
        return state

    def _fresh_state(self, query_id: str, use_record_negatives: bool) -> QueryState:
        entry = self.candidates.get(query_id)
        skip, length = self.candidates.skip_ranks, len(entry.doc_ids)
        own = entry.negatives[: self.n] if use_record_negatives else []
        if own:
            own_texts = set(own)
            top_up = [r for r in range(skip, length)
                      if self.candidates.doc_texts[entry.doc_ids[r]] not in own_texts][: self.n - len(own)]
            slots = [-(j + 1) for j in range(len(own))] + top_up
            window, next_rank = 0, (max(top_up) + 1 if top_up else skip)
        else:
            slots = [r for r in window_ranks(1, self.n, skip) if r < length]
            window, next_rank = 1, skip + self.n
        return QueryState(slots=slots, window=window, next_rank=next_rank,
                          initial=[None] * len(slots), current=[None] * len(slots))

    def _text(self, query_id: str, ref: int) -> str:
        entry = self.candidates.get(query_id)
        return entry.negatives[-ref - 1] if ref < 0 else self.candidates.doc_texts[entry.doc_ids[ref]]

    # ---- scores -------------------------------------------------------------------------------
    def observe(self, query_ids: Sequence[str], neg_scores: np.ndarray) -> None:
        """Record the forward pass's cosines [B, n] of each query with its current negatives (NaN = padding)."""
        scores = np.asarray(neg_scores, dtype=np.float64)
        if scores.ndim != 2 or len(scores) != len(query_ids):
            raise ConanError(f"neg_scores must be [B={len(query_ids)}, n], got shape {scores.shape}")
        for query_id, row in zip(query_ids, scores, strict=True):
            state = self._state(query_id)
            for j in range(min(len(state.slots), len(row))):
                if np.isnan(row[j]):
                    continue
                state.current[j] = float(row[j])
                if state.initial[j] is None:
                    state.initial[j] = float(row[j])
                self._step_scores.append(float(row[j]))

    def maybe_check(self, step: int) -> dict[str, Any] | None:
        """Call once per training step: logs the step's mean negative score; every check_every steps it
        swaps stale queries' negatives and returns the check's metrics."""
        if self._step_scores:
            self._log({"kind": "step", "step": step, "mean_neg_score": float(np.mean(self._step_scores)),
                       "negatives_version": self.version})
            self._step_scores = []
        if step <= 0 or step % self.config.check_every != 0:
            return None
        metrics = self._check_v1() if self.config.variant == "v1" else self._check_v2()
        metrics = {"kind": "check", "step": step, **metrics}
        if metrics["replaced"]:
            self.version += 1
        metrics["negatives_version"] = self.version
        self._log(metrics)
        return metrics

    def _check_v1(self) -> dict[str, Any]:
        observed = stale = replaced = exhausted = 0
        current_means = []
        for query_id, state in self._states.items():
            initial = [s for s in state.initial if s is not None]
            current = [s for s in state.current if s is not None]
            if not current:
                continue
            observed += 1
            initial_mean, current_mean = float(np.mean(initial)), float(np.mean(current))
            current_means.append(current_mean)
            if not is_stale_v1(initial_mean, current_mean, self.config.factor, self.config.abs_limit):
                continue
            stale += 1
            state.stale_since_remine = True
            if self._advance_window(query_id, state):
                replaced += 1
            else:
                exhausted += 1
        return _check_metrics(observed, stale, replaced, exhausted, current_means)

    def _advance_window(self, query_id: str, state: QueryState) -> bool:
        """Move to the next window if the list fills it; True when the negatives changed."""
        length = len(self.candidates.get(query_id).doc_ids)
        ranks = window_ranks(state.window + 1, self.n, self.candidates.skip_ranks)
        if ranks.stop > length:
            return False
        state.window += 1
        state.slots = list(ranks)
        state.next_rank = ranks.stop
        state.replacements += 1
        state.reset_scores()
        return True

    def _check_v2(self) -> dict[str, Any]:
        observed = stale = replaced = exhausted = 0
        current_means, stale_negatives, observed_negatives = [], 0, 0
        c = self.config
        for query_id, state in self._states.items():
            seen = [j for j, s in enumerate(state.current) if s is not None and state.initial[j] is not None]
            if not seen:
                continue
            observed += 1
            observed_negatives += len(seen)
            current_means.append(float(np.mean([state.current[j] for j in seen])))
            flagged = [j for j in seen if is_stale_v2(state.initial[j], state.current[j],  # type: ignore[arg-type]
                                                       c.v2_min_initial, c.v2_factor, c.v2_limit)]
            if not flagged:
                continue
            stale += 1
            stale_negatives += len(flagged)
            state.stale_since_remine = True
            swapped = sum(self._replace_slot(query_id, state, j) for j in flagged)
            replaced += swapped > 0
            exhausted += swapped < len(flagged)
        metrics = _check_metrics(observed, stale, replaced, exhausted, current_means)
        metrics["stale_negative_fraction"] = stale_negatives / observed_negatives if observed_negatives else 0.0
        return metrics

    def _replace_slot(self, query_id: str, state: QueryState, j: int) -> bool:
        """v2: slot j takes the next unused candidate; False when the list has none left."""
        entry = self.candidates.get(query_id)
        in_use = {self._text(query_id, ref) for ref in state.slots}
        rank = max(state.next_rank, self.candidates.skip_ranks)
        while rank < len(entry.doc_ids) and self.candidates.doc_texts[entry.doc_ids[rank]] in in_use:
            rank += 1
        if rank >= len(entry.doc_ids):
            return False
        state.slots[j] = rank
        state.next_rank = rank + 1
        state.initial[j] = state.current[j] = None
        state.replacements += 1
        return True

    # ---- between epochs -----------------------------------------------------------------------
    def queries_to_remine(self) -> list[str] | None:
        """Query ids the between-epoch re-mine should cover: None = all, [] = none (config mode off)."""
        mode = self.config.remine_between_epochs
        if mode == "all":
            return None
        if mode == "off":
            return []
        return [qid for qid, state in self._states.items() if state.stale_since_remine]

    def replace_candidates(self, new: CandidateLists) -> None:
        """Adopt re-mined lists: a query whose list changed restarts at window 1 of its new list."""
        old = self.candidates
        self.candidates = new
        for query_id in list(self._states):
            if query_id not in new.queries:
                del self._states[query_id]
            elif new.queries[query_id].doc_ids != old.queries[query_id].doc_ids:
                self._states[query_id] = self._fresh_state(query_id, use_record_negatives=False)
            else:
                self._states[query_id].stale_since_remine = False
        self.version += 1

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (torch.load(weights_only=True) and JSON safe): the negatives version of a checkpoint."""
        return {"format": STATE_FORMAT, "variant": self.config.variant, "n_negatives": self.n,
                "version": self.version, "candidates_fingerprint": self.candidates.fingerprint,
                "candidates_dir": str(self.candidates.path) if self.candidates.path else None,
                "queries": {qid: asdict(state) for qid, state in self._states.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's negatives; the candidates must be the ones it was saved with."""
        if state.get("format") != STATE_FORMAT:
            raise ConanError(f"DHNM state format {state.get('format')!r}, this code reads {STATE_FORMAT}")
        if state["candidates_fingerprint"] != self.candidates.fingerprint:
            raise ConanError(f"DHNM state was saved with candidates {state['candidates_fingerprint']} "
                             f"({state.get('candidates_dir')}); these are {self.candidates.fingerprint}")
        if state["n_negatives"] != self.n or state["variant"] != self.config.variant:
            raise ConanError(f"DHNM state has n_negatives={state['n_negatives']} variant={state['variant']}, "
                             f"this run has {self.n} {self.config.variant}")
        self.version = int(state["version"])
        self._states = {qid: QueryState(**fields) for qid, fields in state["queries"].items()}
        for query_state in self._states.values():
            query_state.slots = list(query_state.slots)

    # ---- metrics ------------------------------------------------------------------------------
    def _log(self, line: dict[str, Any]) -> None:
        if self.metrics_path is None:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")


def _check_metrics(observed: int, stale: int, replaced: int, exhausted: int,
                   current_means: list[float]) -> dict[str, Any]:
    return {"observed_queries": observed, "stale": stale, "stale_fraction": stale / observed if observed else 0.0,
            "replaced": replaced, "exhausted": exhausted,
            "mean_neg_score": float(np.mean(current_means)) if current_means else None}
