"""Prefect task: `conan_core.clean.stage.run_clean` (rule cleaning, dedup, optional teacher filter)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.artifacts import counts_table, publish_link, publish_table
from tasks.cache import stage_output, stage_task_options
from tasks.progress import call_logged


def counts_by_reason(counts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows (source, outcome, count) from a data-stage manifest's counts: kept, skipped, and each drop reason.

    Falls back to a generic flattening when the counts do not have the per-source layout.
    """
    sources = counts.get("sources")
    if not isinstance(sources, Mapping):
        return counts_table(counts)
    rows = []
    for source, entry in sources.items():
        rows.append({"source": source, "outcome": "kept", "count": entry.get("kept", 0)})
        if entry.get("skipped"):
            rows.append({"source": source, "outcome": "skipped", "count": entry["skipped"]})
        for reason, count in (entry.get("dropped") or {}).items():
            rows.append({"source": source, "outcome": f"dropped: {reason}", "count": count})
    rows.append({"source": "ALL", "outcome": "kept", "count": counts.get("kept", 0)})
    for reason, count in (counts.get("dropped_by_reason") or {}).items():
        rows.append({"source": "ALL", "outcome": f"dropped: {reason}", "count": count})
    return rows


def publish_data_stage(stage: str, name: str, output: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Artifacts of a data stage (counts table, link to the dataset) and its small result."""
    counts = manifest.get("counts", {})
    publish_table(f"{stage}-{name}-counts", counts_by_reason(counts),
                  f"{stage} `{name}`: rows kept and dropped per source and reason")
    publish_link(f"{stage}-{name}-dataset", output, f"{stage} `{name}`: dataset dir (manifest.json + shards)")
    get_run_logger().info("%s %s: kept %s, dropped %s", stage, name, counts.get("kept"), counts.get("dropped"))
    return stage_output(output, kept=counts.get("kept"), dropped=counts.get("dropped"))


@task(**stage_task_options("clean", run_name="clean-{name}"))
def clean_task(name: str, inputs: list[str], inputs_fingerprint: str, output: str, config: dict[str, Any],
               workers: int, teacher: dict[str, Any] | None = None) -> dict[str, Any]:
    """Clean `inputs` into the dataset `output`. `inputs_fingerprint` (content hash of the raw files) is
    here so the cache key changes when the data does; `teacher` is an upstream model result or None."""
    from conan_core.clean.config import CleanConfig
    from conan_core.clean.stage import run_clean

    manifest, _ = call_logged(f"clean {name}", run_clean, [Path(p) if not p.startswith("group:") else p
                                                          for p in inputs],
                              Path(output), CleanConfig.model_validate(config),
                              teacher=teacher["path"] if teacher else None, workers=workers, progress=False)
    return publish_data_stage("clean", name, output, manifest)
