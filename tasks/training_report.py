"""Artifacts of a training stage: loss curves, the hard-negative hardness curve, the model dir link."""

from __future__ import annotations

import numbers
from typing import Any

from prefect import get_run_logger

from tasks.artifacts import image_markdown, jsonable, points_table_markdown, publish_link, publish_markdown, read_jsonl
from tasks.cache import stage_output


def _curve_columns(rows: list[dict[str, Any]], wanted: tuple[str, ...]) -> list[str]:
    """`step` plus the numeric columns whose name contains one of `wanted`, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in columns and any(w in key for w in wanted) and isinstance(value, numbers.Number):
                columns.append(key)
    return ["step", *[c for c in columns if c != "step"]]


def training_markdown(stage: str, result: Any) -> str:
    """Loss curves (plot + table of points) and, for finetuning, the hardness curve (paper Fig. 2)."""
    metrics = read_jsonl(getattr(result, "metrics_path", None))
    parts = [f"## {stage}: {getattr(result, 'steps', '?')} steps", "",
             image_markdown("loss curves", getattr(result, "plot_path", None)),
             points_table_markdown("loss per step", metrics, _curve_columns(metrics, ("loss", "lr")))]
    hardness = read_jsonl(getattr(result, "hardness_path", None))
    if getattr(result, "hardness_path", None):
        parts += [image_markdown("hard-negative hardness", getattr(result, "hardness_plot", None)),
                  points_table_markdown("hard-negative hardness (DHNM checks)", hardness,
                                        _curve_columns(hardness, ("stale", "score", "swap", "replaced")))]
    final = jsonable(getattr(result, "final_metrics", None) or {})
    if final:
        parts += ["### final metrics", "", *[f"- `{key}`: {value}" for key, value in final.items()]]
    return "\n".join(part for part in parts if part) + "\n"


def publish_training(stage: str, result: Any) -> dict[str, Any]:
    """Publish a TrainResult's artifacts; return the stage result (the model dir + fingerprint)."""
    publish_markdown(f"{stage}-curves", training_markdown(stage, result), f"{stage}: loss curves and metrics")
    publish_link(f"{stage}-model", result.model_dir, f"{stage}: model dir (sentence-transformers format)")
    get_run_logger().info("%s: model at %s after %s steps", stage, result.model_dir, result.steps)
    return stage_output(result.model_dir, steps=result.steps, metrics_path=str(result.metrics_path),
                        final_metrics=jsonable(getattr(result, "final_metrics", None) or {}))
