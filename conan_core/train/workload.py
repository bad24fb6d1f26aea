"""The two training stages' workloads (step producers; not called tasks: in this project a task is a
Prefect task, or retrieval / STS): each builds its data once, hands every worker its share of
the next global batch, and computes the worker's objective. `loop.py` runs them the same way.

`PretrainWorkload`: a global batch of `batch_size * workers` pairs per step (one stream over all sources,
mixed by weight); worker r takes slice r. `FinetuneWorkload`: per step one retrieval batch (shared by the
retrieval group, each group rank with its own slice of every query's negatives) and one STS batch per
STS rank, or one task only in `vanilla` mode. Dynamic hard negatives (DHNM) plug in through
`DynamicNegatives`: each query's current negatives come from it, and the forward pass's cosines go back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from conan_core.distributed import world_info
from conan_core.losses.cbb import CbbShape
from conan_core.losses.matryoshka import MatryoshkaLoss
from conan_core.train.batching import (
    BatchStream,
    TrainDataError,
    assign_roles,
    negatives_slice,
    rank_slice,
)
from conan_core.train.config import FinetuneConfig, PretrainConfig
from conan_core.train.data import TokenBank, finetune_tasks, load_records, pretrain_pairs
from conan_core.train.objective import CbbWorkerBatch, StepEncoder, cbb_objective, pretrain_objective


@dataclass
class StepResult:
    objective: torch.Tensor
    losses: dict[str, torch.Tensor | None]  # per task, this worker's value or None
    pairs: int  # examples the global step trained on
    batch_ids: list[str]  # ids of the global batch's examples (for audits of resume)
    info: dict[str, Any] = field(default_factory=dict)


def _source_weights(sources: Sequence[str], weights: dict[str, float]) -> tuple[list[str], list[float] | None]:
    """Listed sources get their weight as a share of the epoch; unlisted ones their natural share."""
    names = sorted(set(sources))
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise TrainDataError(f"source_weights names sources not in the data: {', '.join(unknown)} "
                             f"(sources: {', '.join(names)})")
    if not weights:
        return names, None
    counts = {name: 0 for name in names}
    for source in sources:
        counts[source] += 1
    total = len(sources)
    return names, [weights.get(name, counts[name] / total) for name in names]


class PretrainWorkload:
    stream_names = ("pairs",)

    def __init__(self, config: PretrainConfig, data_dirs: Sequence[str | Path], bank: TokenBank,
                 encode: StepEncoder) -> None:
        self.config, self.encode = config, encode
        self.world = world_info()
        self.pairs = pretrain_pairs(load_records(data_dirs))
        bank.add(self.pairs.queries + self.pairs.positives)
        lengths = bank.lengths(self.pairs.queries) + bank.lengths(self.pairs.positives)
        names, weights = _source_weights(self.pairs.sources, config.source_weights)
        source_array = np.asarray(self.pairs.sources)
        groups = [np.flatnonzero(source_array == name) for name in names]
        self.streams = {"pairs": BatchStream("pairs", groups, lengths, config.batch_size * self.world.size,
                                             seed=config.seed, weights=weights,
                                             one_group_per_batch=config.one_source_per_step,
                                             bucket_batches=config.bucket_batches)}
        self.matryoshka = MatryoshkaLoss(model_matryoshka_dims(encode.model))
        self.counts = {"pairs": len(self.pairs), "sources": len(names)}

    def steps_per_epoch(self) -> int:
        return self.streams["pairs"].batches_per_epoch

    def step(self, step: int) -> StepResult:
        batch = self.streams["pairs"].next()
        own_rows = rank_slice(batch, self.world.rank, self.config.batch_size)
        loss = pretrain_objective(self.encode, [self.pairs.queries[i] for i in own_rows],
                                  [self.pairs.positives[i] for i in own_rows],
                                  temperature=self.config.temperature, matryoshka=self.matryoshka,
                                  symmetric=self.config.symmetric_loss)
        return StepResult(loss, {"loss_pairs": loss.detach()}, len(batch), [self.pairs.ids[i] for i in batch])

    def after_step(self, step: int, result: StepResult) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        return None


class FinetuneWorkload:
    stream_names = ("retrieval", "sts")

    def __init__(self, config: FinetuneConfig, data_dirs: Sequence[str | Path], bank: TokenBank,
                 encode: StepEncoder, *, dyn: Any = None, mining: Any = None, out_dir: Path | None = None) -> None:
        self.config, self.encode, self.dyn = config, encode, dyn
        self.mining, self.out_dir = mining, out_dir  # for the between-epoch re-mine (rank 0 writes there)
        self.last_step = 2**62  # the loop sets the run's total: no re-mine after the last step
        self.world = world_info()
        layout = config.layout
        self.n_total = layout.retrieval_group * config.negatives_per_rank
        self.retrieval, self.sts, self.counts = finetune_tasks(
            load_records(data_dirs), classification_negatives=self.n_total, seed=config.seed,
            classification_max_per_source=config.classification_max_per_source)
        if not len(self.retrieval):
            raise TrainDataError("finetuning needs retrieval examples (kinds retrieval/pair/classification)")
        if layout.sts_workers and not len(self.sts):
            raise TrainDataError(f"the layout has sts_workers={layout.sts_workers} but the data has no STS "
                                 "records (kind sts, or pairs with a score); set layout.sts_workers: 0")
        if config.max_retrieval_queries is not None and len(self.retrieval) > config.max_retrieval_queries:
            # A seeded subset in the original order: the same on every worker and every resumed run.
            rng = np.random.default_rng([config.seed, 11])
            self.retrieval = self.retrieval.select(
                np.sort(rng.choice(len(self.retrieval), config.max_retrieval_queries, replace=False)))
            self.counts["retrieval_pool"] = len(self.retrieval)
        _fill_missing_negatives(self.retrieval.negatives, self.retrieval.positives, self.n_total, config.seed)
        self.roles = tuple(assign_roles(layout, self.world.size))
        self.shape = CbbShape(self.roles, config.retrieval_batch, config.negatives_per_rank, config.sts_batch,
                              encode.model.dim)
        bank.add(self.retrieval.queries + self.retrieval.positives + self.sts.first + self.sts.second)
        bank.add(t for negs in self.retrieval.negatives for t in negs)
        self.streams = {"retrieval": BatchStream(
            "retrieval", [np.arange(len(self.retrieval))],
            bank.lengths(self.retrieval.queries) + bank.lengths(self.retrieval.positives),
            config.retrieval_batch, seed=config.seed, bucket_batches=config.bucket_batches)}
        if layout.sts_workers:
            # One source per STS batch: CoSENT compares gold scores, which only share a scale within a source.
            sources = np.asarray(self.sts.sources)
            by_source = [np.flatnonzero(sources == name) for name in sorted(set(self.sts.sources))]
            self.streams["sts"] = BatchStream(
                "sts", by_source, bank.lengths(self.sts.first) + bank.lengths(self.sts.second),
                config.sts_batch * layout.sts_workers, seed=config.seed, one_group_per_batch=True,
                bucket_batches=config.bucket_batches)
        self.matryoshka = MatryoshkaLoss(model_matryoshka_dims(encode.model))

    def steps_per_epoch(self) -> int:
        return self.streams["retrieval"].batches_per_epoch

    def tasks_for(self, step: int) -> tuple[str, ...]:
        """CBB: every task; vanilla: one, drawn from a per-step seed so every worker draws the same."""
        available = [t for t in ("retrieval", "sts") if t in self.streams]
        if self.config.mode == "cbb":
            return tuple(available)
        weights = np.array([self.config.task_weights.get(t, 0.0) for t in available], dtype=float)
        if weights.sum() <= 0:
            raise TrainDataError(f"vanilla mode: task_weights give 0 to every task of {available}")
        rng = np.random.default_rng([self.config.seed, step])
        return (available[int(rng.choice(len(available), p=weights / weights.sum()))],)

    def _negatives_of(self, index: int) -> list[str]:
        """The query's current negatives, each text once (DHNM's when it has a candidate list)."""
        own = self.retrieval.negatives[index]
        if self.dyn is not None and self.retrieval.ids[index] in self.dyn.candidates.queries:
            own = self.dyn.negatives(self.retrieval.ids[index]) or own
        return list(dict.fromkeys(own))

    def step(self, step: int) -> StepResult:
        tasks = self.tasks_for(step)
        own_roles = self.roles[self.world.rank]
        batch, ids, pairs = CbbWorkerBatch(), [], 0
        query_index = None
        if "retrieval" in tasks:
            query_index = self.streams["retrieval"].next()
            ids += [self.retrieval.ids[i] for i in query_index]
            pairs += len(query_index)
            if own_roles.retrieval_ranks:
                batch.queries = [self.retrieval.queries[i] for i in query_index]
                batch.positives = [self.retrieval.positives[i] for i in query_index]
                lists = [self._negatives_of(i) for i in query_index]
                slots = {g: [negatives_slice(lst, g, self.config.negatives_per_rank) for lst in lists]
                         for g in range(self.config.layout.retrieval_group)}
                # An empty slot is encoded as "" (shapes must match across workers) and masked in the loss.
                batch.negatives = {g: [[t if t is not None else "" for t in row] for row in slots[g]]
                                   for g in own_roles.retrieval_ranks}
                batch.neg_mask = torch.tensor(
                    [[t is None for g in sorted(slots) for t in slots[g][row]] for row in range(len(lists))],
                    dtype=torch.bool, device=self.encode.device)
        if "sts" in tasks:
            sts_index = self.streams["sts"].next()
            ids += [self.sts.ids[i] for i in sts_index]
            pairs += len(sts_index)
            for s in own_roles.sts_ranks:
                part = rank_slice(sts_index, s, self.config.sts_batch)
                batch.sts[s] = ([self.sts.first[i] for i in part], [self.sts.second[i] for i in part],
                                [self.sts.scores[i] for i in part])
        out = cbb_objective(self.encode, batch, self.shape, temperature=self.config.temperature,
                            beta=self.config.beta, scale=self.config.cosent_scale,
                            in_batch=self.config.in_batch_negatives, matryoshka=self.matryoshka, tasks=tasks,
                            share_negatives=self.config.mode == "cbb", neg_scores=self.dyn is not None)
        return StepResult(out.objective, {"loss_retrieval": out.retrieval_loss, "loss_sts": out.sts_loss},
                          pairs, ids, {"query_index": query_index, "neg_scores": out.neg_scores,
                                       "tasks": tasks})

    def after_step(self, step: int, result: StepResult) -> dict[str, Any]:
        """DHNM: every worker observes the same cosines (computed on rank 0, which always holds group
        rank 0) so every worker's negatives stay identical; then the periodic staleness check."""
        if self.dyn is None or result.info["query_index"] is None:
            return {}
        rows = len(result.info["query_index"])
        scores = result.info["neg_scores"]
        if scores is None:
            scores = torch.zeros(rows, self.n_total, device=self.encode.device)
        if self.world.size > 1:
            scores = scores.contiguous()
            dist.broadcast(scores, src=0)
        query_ids = [self.retrieval.ids[i] for i in result.info["query_index"]]
        known = [j for j, qid in enumerate(query_ids) if qid in self.dyn.candidates.queries]
        if known:
            self.dyn.observe([query_ids[j] for j in known], scores[known].float().cpu().numpy())
        check = self.dyn.maybe_check(step)
        metrics = {f"dhnm_{k}": v for k, v in (check or {}).items() if isinstance(v, int | float) and k != "step"}
        stream = self.streams["retrieval"].state
        if stream.index == 0 and stream.epoch > 0 and self.out_dir is not None and step < self.last_step:
            metrics.update(self._remine(step))
        return metrics

    def _remine(self, step: int) -> dict[str, Any]:
        """Between epochs: rank 0 re-mines the candidate lists with the current weights (the actor pool of
        `conan mine`) and every worker adopts the new lists, so all keep the same negatives."""
        from conan_core.mining.candidates import CandidateLists

        queries = self.dyn.queries_to_remine()
        if queries == []:
            return {}
        path: list[str | None] = [None]
        if self.world.rank == 0:
            from conan_core.mining.run import remine

            model_dir = self.encode.model.save(self.out_dir / "remine" / f"step-{step}" / "model")
            new = remine(model_dir, self.dyn.candidates, queries, config=self.mining,
                         out_dir=self.out_dir / "remine" / f"step-{step}" / "candidates")
            path = [str(new.path)]
        if self.world.size > 1:
            dist.broadcast_object_list(path, src=0)
        self.dyn.replace_candidates(CandidateLists.load(Path(path[0])))
        return {"dhnm_remined_queries": len(queries) if queries is not None else len(self.dyn.candidates.queries)}

    def state_dict(self) -> dict[str, Any] | None:
        return self.dyn.state_dict() if self.dyn is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore DHNM; when the checkpoint was taken after a re-mine, adopt those lists first."""
        if self.dyn is None or state is None:
            return
        if state["candidates_fingerprint"] != self.dyn.candidates.fingerprint and state.get("candidates_dir"):
            from conan_core.mining.candidates import CandidateLists

            self.dyn.replace_candidates(CandidateLists.load(Path(state["candidates_dir"])))
        self.dyn.load_state_dict(state)


def _fill_missing_negatives(negatives: list[list[str]], positives: list[str], count: int, seed: int) -> None:
    """Queries without negatives (plain pairs) get other queries' positives, drawn once with a fixed
    seed, so every worker and every resumed run sees the same ones."""
    rng = np.random.default_rng([seed, 7])
    for i, negs in enumerate(negatives):
        if negs or len(positives) < 2:
            continue
        picks = rng.choice(len(positives) - 1, size=min(count, len(positives) - 1), replace=False)
        negatives[i] = [positives[j if j < i else j + 1] for j in picks]


def model_matryoshka_dims(model: object) -> list[int] | None:
    """The Matryoshka dims of the model being trained (its conan config owns them); None: plain loss."""
    return getattr(getattr(model, "config", None), "matryoshka_dims", None)


Workload = PretrainWorkload | FinetuneWorkload
