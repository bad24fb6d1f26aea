"""Prefect task: `conan_core.eval.run.run_eval` (mteb evaluators on local C-MTEB-style tasks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.artifacts import publish_link, publish_markdown, publish_table
from tasks.cache import fingerprint_paths, stage_output, stage_task_options
from tasks.progress import call_logged


def task_dirs_fingerprint(task_dirs: list[str]) -> str:
    """Content hash of the drop-in task folders (missing folders hash to their name: eval will say so)."""
    present = [d for d in task_dirs if Path(d).exists()]
    return fingerprint_paths(present) + ":" + ",".join(sorted(set(task_dirs) - set(present)))


@task(**stage_task_options("evaluate", run_name="{stage}", retries=0))
def evaluate_task(model: dict[str, Any], output_dir: str, config: dict[str, Any],
                  task_dirs_hash: str, stage: str = "evaluate") -> dict[str, Any]:
    """Evaluate `model` (upstream result) on the configured tasks; writes results.json and report.md.
    `task_dirs_hash` (content hash of the drop-in task folders) keys the cache on their data. `stage` names
    the task run and prefixes its artifact keys (the flow evaluates the final model as `evaluate` and the
    untrained start model as `evaluate-start`)."""
    from conan_core.eval.config import EvalConfig
    from conan_core.eval.run import format_table, run_eval

    eval_config = EvalConfig.model_validate(config)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger = get_run_logger()

    def log_task(entry: dict[str, Any]) -> None:
        logger.info("%s (%s, %s): %s", entry.get("name"), entry.get("type"), entry.get("split"),
                    entry.get("main_score"))

    # tasks=None and no extra folders: run_eval takes both from the config (passing them too would double them)
    results, _ = call_logged(stage, run_eval, Path(model["path"]), tasks=None, task_dirs=[],
                             output=out / "results.json", config=eval_config, on_task=log_task)
    table = format_table(results)
    (out / "report.md").write_text(table + "\n", encoding="utf-8")
    publish_table(f"{stage}-results", [{key: task_result.get(key) for key in ("name", "type", "split", "main_score")}
                                       for task_result in results.get("tasks", [])],
                  f"{stage}: main score per task; average {results.get('average')}")
    publish_markdown(f"{stage}-report", table, f"{stage}: evaluation report (markdown table)")
    publish_link(f"{stage}-results-json", out / "results.json", f"{stage}: evaluation results JSON")
    logger.info("%s: evaluation average %s\n%s", stage, results.get("average"), table)
    return stage_output(out, results=str((out / "results.json").resolve()),
                        report=str((out / "report.md").resolve()), average=results.get("average"))
