"""The evaluation result: per-task scores from mteb, per-type means, the C-MTEB-style average, a table.

Result JSON:
    {"model": str, "revision": str, "tasks": [{"name", "type", "lang", "split", "main_score", "metrics",
     "n_samples", "subsample", "source", "note", "eval_seconds"}], "categories": {type: mean main score},
     "average": mean over tasks}
Scores are mteb's (0..1); the table prints them x100 like the C-MTEB leaderboard.
"""

from __future__ import annotations

import math
from statistics import mean
from typing import Any


def task_entry(spec: Any, scores: dict[str, Any], n_samples: int, subsample: dict[str, Any] | None,
               seconds: float) -> dict[str, Any]:
    """One task's result from mteb's score dict (the one for our split and subset)."""
    # NaN (e.g. AP of a multi-class classifier) becomes null: JSON has no NaN.
    metrics = {k: float(v) if math.isfinite(v) else None for k, v in scores.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and k != "main_score"}
    return {"name": spec.name, "type": spec.type, "lang": spec.lang, "split": spec.split,
            "main_score": float(scores["main_score"]), "main_score_name": spec.main_score,
            "metrics": metrics, "n_samples": n_samples, "subsample": subsample, "source": spec.source,
            "note": spec.note, "eval_seconds": round(seconds, 2)}


def summarize(model: str, revision: str, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-type means and the average over all tasks (C-MTEB's overall average is over tasks, not types)."""
    by_type: dict[str, list[float]] = {}
    for task in tasks:
        by_type.setdefault(task["type"], []).append(task["main_score"])
    return {"model": model, "revision": revision, "tasks": tasks,
            "categories": {task_type: mean(scores) for task_type, scores in by_type.items()},
            "average": mean(t["main_score"] for t in tasks) if tasks else None}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per task, then one per type and the average (scores x100)."""
    lines = [f"Model `{result['model']}` (revision {result.get('revision', '-')})", "",
             "| task | type | split | metric | score | n |", "|---|---|---|---|---:|---:|"]
    for task in result["tasks"]:
        sampled = " (subsampled)" if task.get("subsample") else ""
        lines.append(f"| {task['name']} | {task['type']} | {task['split']} | {task.get('main_score_name', '')} "
                     f"| {_pct(task['main_score'])} | {task.get('n_samples', '')}{sampled} |")
    for task_type, score in result["categories"].items():
        lines.append(f"| **{task_type}** (mean) | | | | {_pct(score)} | |")
    lines.append(f"| **average** ({len(result['tasks'])} tasks) | | | | {_pct(result['average'])} | |")
    return "\n".join(lines) + "\n"
