"""Training configs: weakly-supervised pretraining and CBB finetuning (paper §2.1, §2.3, §3.1).

Defaults are the paper's (AdamW, lr 1e-5, warmup 5 %, weight decay 0.001, STS batch 32, beta 0.8) except
the retrieval batch: the paper's 4 queries per step (with thousands of GPUs' worth of negatives) gave a 9-way
softmax here, against the 32-way one of sentence-transformers MNRL at batch 32, so the default is 32 queries
with in-batch negatives on and the group's hard negatives on top (issue 10). The temperature (0.05) and
the number of negatives the paper leaves open are our choices.
Every field has a default and unknown keys are rejected, so a typo in a YAML file fails loudly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainCommon(_Strict):
    """Options shared by both stages. The Matryoshka dims are the model's (`model.matryoshka_dims`, set by
    `conan model init --matryoshka-dim`): training sums its loss over the dims the model it trains has."""

    steps: int | None = Field(default=None, gt=0, description="total optimizer steps (wins over epochs)")
    epochs: float = Field(default=1.0, gt=0, description="passes over the data when steps is not set")
    max_length: int = Field(default=128, gt=0, description="tokens per text (truncation)")
    temperature: float = Field(default=0.05, gt=0)
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.001, ge=0, description="AdamW decay (not on embeddings, norms, biases)")
    embedding_lr_scale: float = Field(
        default=10.0, gt=0, description="lr multiplier of the input word embeddings (new vocabulary rows)")
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    schedule: Literal["linear", "constant", "cosine"] = "linear"
    grad_clip: float | None = Field(default=1.0, gt=0, description="max grad norm; null turns clipping off")
    bf16: bool = Field(default=True, description="bf16 autocast when training on GPU")
    cpu_bf16: bool = Field(
        default=False, description="bf16 autocast when training on the CPU too (fp32 master weights and "
                                   "optimizer): fast only on CPUs with AMX (conan_core.precision; speed in "
                                   "docs/benchmarks.md); off by default: the quality results were measured in fp32")
    hidden_dropout: float | None = Field(
        default=None, ge=0, lt=1, description="dropout on the encoder's hidden states while training; "
                                              "null: the model's own (0.1 for MiniLM)")
    attention_dropout: float | None = Field(
        default=None, ge=0, lt=1, description="dropout on the attention probabilities while training; null: "
                                              "the model's own (0.1 for MiniLM); 0 lets attention run fused "
                                              "(SDPA's flash kernel on the CPU too), see docs/benchmarks.md")
    gradient_checkpointing: bool = False
    grad_cache_chunk: int | None = Field(
        default=None, gt=0,
        description="gradient caching (GradCache, Gao et al. 2021): encode a step's texts in chunks of this "
                    "many without a graph, compute the loss on the full batch, then re-encode and "
                    "back-propagate chunk by chunk (dropout replayed): the plain step's loss and gradients "
                    "in about one chunk's activation memory, for ~1/3 more compute; counts the texts of "
                    "one encode call (queries, positives, negatives, STS sides are encoded separately); "
                    "null: the plain step, one graph over every text")
    checkpoint_every: int = Field(
        default=50, gt=0, description="steps between Ray Train checkpoints (at most half the run: a run "
                                      "shorter than 2x this checkpoints at its middle step too)")
    checkpoint_every_s: float | None = Field(
        default=600.0, gt=0, description="also checkpoint when this many seconds passed since the last one "
                                         "(checked at logged steps); null: by steps only")
    keep_checkpoints: int = Field(default=2, gt=0)
    log_every: int = Field(default=1, gt=0)
    max_failures: int = Field(default=1, ge=0, description="worker-group restarts Ray Train may do")
    seed: int = 0
    log_batch_ids: bool = Field(default=False,
                                description="write each step's example ids to metrics.jsonl (resume audits)")
    bucket_batches: int = Field(default=32, gt=0,
                                description="batches per length-sorting chunk (bigger: less padding)")

    @model_validator(mode="before")
    @classmethod
    def _matryoshka_is_the_models(cls, data: object) -> object:
        if isinstance(data, dict) and "matryoshka_dims" in data:
            if data["matryoshka_dims"]:
                raise ValueError("matryoshka_dims is the model's: set model.matryoshka_dims (conan model init "
                                 "--matryoshka-dim); training uses the dims of the model it trains")
            data = {k: v for k, v in data.items() if k != "matryoshka_dims"}  # null asks for nothing
        return data


class PretrainConfig(TrainCommon):
    """Stage 1: in-batch InfoNCE over the global batch (paper Eq. 1), pairs mixed from several sources."""

    batch_size: int = Field(default=8, gt=0, description="pairs per worker per step (global = x workers)")
    source_weights: dict[str, float] = Field(
        default_factory=dict,
        description="share of an epoch per `source` value (normalised); unlisted sources keep their natural "
                    "share n_source / n_total")
    one_source_per_step: bool = Field(
        default=False, description="every global batch from one source (avoids easy cross-source negatives)")
    symmetric_loss: bool = Field(
        default=False, description="also rank each positive against all queries (passage -> query), the "
                                   "mean of both directions (GTE's bidirectional InfoNCE; no extra encoding)")

    @model_validator(mode="after")
    def _positive_weights(self) -> PretrainConfig:
        bad = {k: v for k, v in self.source_weights.items() if v < 0}
        if bad:
            raise ValueError(f"source weights must be >= 0, got {bad}")
        return self


class LayoutConfig(_Strict):
    """Which logical ranks a CBB step has: a retrieval group sharing queries and positives (each rank with
    its own slice of hard negatives) and STS ranks with a bigger batch (paper Fig. 3)."""

    retrieval_group: int = Field(default=2, gt=0, description="ranks sharing queries+positives (N in Eq. 3)")
    sts_workers: int = Field(default=1, ge=0, description="ranks computing CoSENT")

    @property
    def logical_ranks(self) -> int:
        return self.retrieval_group + self.sts_workers


class FinetuneConfig(TrainCommon):
    """Stage 2: CBB loss (Eq. 3): InfoNCE with the negatives of the whole retrieval group + beta * CoSENT,
    every task in every step; or `vanilla`: one randomly chosen task per step (the paper's baseline)."""

    mode: Literal["cbb", "vanilla"] = "cbb"
    layout: LayoutConfig = Field(default_factory=LayoutConfig)
    retrieval_batch: int = Field(default=32, gt=0, description="queries per step, shared by the group")
    sts_batch: int = Field(default=32, gt=1, description="pairs per STS rank per step")
    negatives_per_rank: int = Field(default=4, gt=0, description="hard negatives per query per group rank "
                                                                 "(DHNM's count: retrieval_group * this)")
    beta: float = Field(default=0.8, ge=0, description="weight of CoSENT in the CBB loss")
    cosent_scale: float = Field(default=20.0, gt=0)
    in_batch_negatives: bool = Field(
        default=True, description="also score the other queries' positives (Eq. 3 literally does not): "
                                  "retrieval_batch - 1 more candidates per query")
    max_retrieval_queries: int | None = Field(
        default=None, gt=0, description="train on a seeded random subset of this many retrieval queries: a "
                                        "fixed budget then makes several passes, which DHNM needs (it swaps "
                                        "the negatives of a query seen again whose negatives got easy)")
    classification_max_per_source: int | None = Field(
        default=1000, gt=0, description="cap on the retrieval queries made from one classification source "
                                        "(2-label sentiment reviews would otherwise be half the pool)")
    task_weights: dict[str, float] = Field(
        default_factory=lambda: {"retrieval": 0.5, "sts": 0.5},
        description="vanilla mode: probability of each task per step")
    dhnm: bool = Field(default=True, description="dynamic hard negatives when a candidates dir is given")
