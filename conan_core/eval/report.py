"""The evaluation result: per-task scores from mteb, per-type means, the C-MTEB-style average, a table.

Result JSON:
    {"model": str, "revision": str, "tasks": [{"name", "type", "lang", "split", "main_score", "metrics",
     "n_samples", "subsample", "source", "note", "eval_seconds"}], "categories": {type: mean main score},
     "average": mean over tasks}
Scores are mteb's (0..1); the table prints them x100 like the C-MTEB leaderboard.

`compare_results(start, final)` lines two such results up task by task (the pipeline's untrained start
model against its final model) and `format_comparison` prints that as markdown.
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


def compare_results(start: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    """Per task scored in both results: the start score, the final score and final - start, in the final
    result's task order; the averages over those common tasks; the tasks where the final model is not
    better (final <= start); and the tasks only one of the two results has.

    Returns {"start_model", "final_model", "tasks": [{"name", "type", "split", "start", "final", "delta"}],
    "start_average", "final_average", "delta_average", "not_better": [names], "only_start": [names],
    "only_final": [names]} (averages None when no task is common)."""
    start_by_name = {task["name"]: task for task in start.get("tasks", [])}
    final_names = {task["name"] for task in final.get("tasks", [])}
    rows = []
    for task in final.get("tasks", []):
        before = start_by_name.get(task["name"])
        if before is None:
            continue
        start_score, final_score = float(before["main_score"]), float(task["main_score"])
        rows.append({"name": task["name"], "type": task.get("type"), "split": task.get("split"),
                     "start": start_score, "final": final_score, "delta": final_score - start_score})
    start_average = mean(row["start"] for row in rows) if rows else None
    final_average = mean(row["final"] for row in rows) if rows else None
    return {"start_model": start.get("model"), "final_model": final.get("model"), "tasks": rows,
            "start_average": start_average, "final_average": final_average,
            "delta_average": None if not rows else final_average - start_average,
            "not_better": [row["name"] for row in rows if not row["final"] > row["start"]],
            "only_start": [name for name in start_by_name if name not in final_names],
            "only_final": [task["name"] for task in final.get("tasks", []) if task["name"] not in start_by_name]}


def _signed_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}"


def format_comparison(comparison: dict[str, Any], *, start_label: str = "start", final_label: str = "final") -> str:
    """Markdown: one row per common task (start, final, delta; x100), the averages, then one line naming
    the tasks where the final model is not better than the start model (or saying there are none)."""
    lines = [f"| task | type | split | {start_label} | {final_label} | delta |", "|---|---|---|---:|---:|---:|"]
    for row in comparison["tasks"]:
        lines.append(f"| {row['name']} | {row['type']} | {row['split']} | {_pct(row['start'])} "
                     f"| {_pct(row['final'])} | {_signed_pct(row['delta'])} |")
    lines.append(f"| **average** ({len(comparison['tasks'])} tasks) | | | {_pct(comparison['start_average'])} "
                 f"| {_pct(comparison['final_average'])} | {_signed_pct(comparison['delta_average'])} |")
    lines.append("")
    if not comparison["tasks"]:
        lines.append("No task was scored for both models.")
    elif comparison["not_better"]:
        lines.append(f"The {final_label} model is NOT better than the {start_label} model on "
                     f"{len(comparison['not_better'])} of {len(comparison['tasks'])} tasks: "
                     + ", ".join(comparison["not_better"]) + ".")
    else:
        lines.append(f"The {final_label} model is better than the {start_label} model on every task "
                     f"({len(comparison['tasks'])}).")
    for key, label in (("only_start", start_label), ("only_final", final_label)):
        if comparison.get(key):
            lines.append(f"Scored for the {label} model only (not compared): {', '.join(comparison[key])}.")
    return "\n".join(lines) + "\n"
