"""Settings of hard-negative mining: the initial (and between-epoch) mining run and dynamic mining (DHNM).

Defaults follow the Conan-embedding paper (arXiv 2408.15710, §2.2) where it gives a number: windows start
at rank 10, a check every 100 steps, stale if `current * 1.15 < initial` and `|current| < 0.8`. The v2
thresholds (0.4, 1.2, 0.7) come from Conan-embedding-v2 (arXiv 2509.12892, Eq. 6). The positive-aware
guard is on by default with margin 0.95, the best setting of NV-Retriever (arXiv 2407.15831, TopK-PercPos):
a candidate scoring at or above 0.95 x its query's positive score is more likely an unlabelled positive than
a negative.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DHNMConfig(BaseModel):
    """How dynamic hard negative mining works during finetuning; whether it runs is `finetune.dhnm`'s
    (the one switch)."""

    model_config = ConfigDict(extra="forbid")

    variant: Literal["v1", "v2"] = "v1"
    check_every: int = Field(100, ge=1, description="steps between staleness checks (a query is judged only "
                                                    "once it was seen twice: size it in passes over the pool)")
    # v1: a query is stale when current * factor < initial and |current| < abs_limit (scores: mean over its negatives)
    factor: float = Field(1.15, gt=0)
    abs_limit: float = Field(0.8, gt=0)
    # v2 (per negative): replace when initial < v2_min_initial, or v2_factor * current < initial and current < v2_limit
    v2_min_initial: float = 0.4
    v2_factor: float = Field(1.2, gt=0)
    v2_limit: float = 0.7
    remine_between_epochs: Literal["off", "stale", "all"] = "stale"

    @model_validator(mode="before")
    @classmethod
    def _one_switch(cls, data: object) -> object:
        if isinstance(data, dict) and "enabled" in data:
            if data["enabled"] is not True:
                raise ValueError("mining.dhnm.enabled is not a setting: finetune.dhnm switches dynamic mining "
                                 "on/off")
            data = {k: v for k, v in data.items() if k != "enabled"}  # true (the old default) changes nothing
        return data


class MiningConfig(BaseModel):
    """Initial mining (`conan mine`) and the between-epoch re-mine; `dhnm` is used by the finetune loop."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(100, ge=1, description="candidates kept per query, after the false-negative guards")
    skip_ranks: int = Field(10, ge=0, description="DHNM windows start at this rank (paper: 10)")
    margin: float | None = Field(
        0.95, gt=0, le=1,
        description="positive-aware false-negative guard: keep a candidate only if score < positive_score * "
                    "margin (default 0.95, NV-Retriever's TopK-PercPos, arXiv 2407.15831); null turns it off",
    )
    query_kinds: list[str] = Field(default_factory=lambda: ["retrieval", "pair"])
    shard_rows: int = Field(20_000, ge=1, description="corpus documents per shard (one shard per actor at a time)")
    workers: int | None = Field(None, ge=1, description="actor pool size; default: one per corpus shard, <= CPUs")
    index: Literal["flat", "ivf"] = "flat"
    ivf_nlist: int = Field(256, ge=1)
    ivf_nprobe: int = Field(16, ge=1)
    encode_batch_size: int = Field(64, ge=1)
    bf16: bool | None = Field(
        None, description="encode in bf16 autocast on the CPU (~3x faster where the CPU has AMX, embeddings at "
                          "cosine ~0.99999 of fp32's); null = auto: on exactly where the CPU has AMX")
    query_batch_size: int = Field(2048, ge=1, description="queries per faiss search call")
    max_actor_retries: int = Field(3, ge=0, description="times a shard is re-queried after its actor died")
    cache_dir: str | None = Field(None, description="embedding cache; default <work dir>/mining_cache")
    dhnm: DHNMConfig = Field(default_factory=DHNMConfig)
