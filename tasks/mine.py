"""Prefect task: `conan_core.mining.run.run_mine` (initial hard-negative candidate lists, Ray actor pool)."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.artifacts import counts_table, publish_link, publish_table
from tasks.cache import stage_output, stage_task_options
from tasks.progress import call_logged


@task(**stage_task_options("mine"))
def mine_task(model: dict[str, Any], data: dict[str, Any], output: str, config: dict[str, Any],
              corpus: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mine candidate lists for the queries of the dataset `data` with the model `model` (both upstream
    results: path + fingerprint) into `output`; the pool size is the mining config's `workers`."""
    from conan_core.mining.config import MiningConfig
    from conan_core.mining.run import run_mine

    manifest, _ = call_logged("mine", run_mine, model["path"], data["path"], output,
                              MiningConfig.model_validate(config), corpus_dir=corpus["path"] if corpus else None)
    counts = manifest.get("counts", {})
    publish_table("mine-counts", counts_table(counts), "initial mining: queries, corpus size, shards, actors")
    publish_link("mine-candidates", output, "candidate lists dataset (ranked per query, mined_by recorded)")
    return stage_output(output, queries=counts.get("queries"), documents=counts.get("documents"))
