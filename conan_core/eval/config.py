"""Settings of `conan eval`: which tasks, how big a batch, and optional subsampling for quick runs."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class EvalConfig(BaseModel):
    """Every field has a default. Subsampling caps are off (None) by default: a full run uses all the data.

    When a cap applies, the sample is drawn with `seed` and recorded in the task's result.
    """

    model_config = ConfigDict(extra="forbid")

    # Task names or group names (zh-default, en-default, quick, all). None: `zh-default`, unless task
    # folders are given, in which case only those folders run.
    tasks: list[str] | None = None
    task_dirs: list[Path] = Field(default_factory=list)
    batch_size: int = Field(default=64, gt=0)
    # STS / pair classification: at most this many pairs per task.
    max_pairs: int | None = Field(default=None, gt=0)
    # Clustering texts, classification train and test texts, retrieval corpus (relevant documents
    # of the kept queries are always kept).
    max_docs: int | None = Field(default=None, gt=0)
    # Retrieval and reranking: at most this many queries per task.
    max_queries: int | None = Field(default=None, gt=0)
    seed: int = 42
