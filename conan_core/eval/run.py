"""`run_eval`: evaluate a model directory on built-in tasks and task folders with mteb's evaluators."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conan_core.eval.config import EvalConfig
from conan_core.eval.data import TaskData, subsample
from conan_core.eval.readers import TaskDataError
from conan_core.eval.report import format_table, summarize, task_entry
from conan_core.eval.spec import TaskSpec, UnknownTaskError
from conan_core.eval.taskdir import load_task_dir
from conan_core.eval.tasks import resolve_task_names
from conan_core.paths import offline_env, work_dir

DEFAULT_GROUP = "zh-default"

__all__ = ["DEFAULT_GROUP", "format_table", "resolve_specs", "run_eval"]


def resolve_specs(tasks: list[str] | None, task_dirs: list[Path]) -> list[TaskSpec]:
    """Built-in tasks / groups by name, then the task folders. `tasks=None`: the default group, unless
    task folders are given (then only they run)."""
    folder_specs = [load_task_dir(Path(folder)) for folder in task_dirs]
    names = tasks if tasks is not None else ([] if folder_specs else [DEFAULT_GROUP])
    specs = resolve_task_names(names) + folder_specs
    if not specs:
        raise UnknownTaskError("no tasks to run: name tasks or groups, or give task folders")
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise TaskDataError(f"task name {spec.name!r} is used twice ({seen[spec.name]} and {spec.source})")
        seen[spec.name] = spec.source
    return specs


def _mteb_scores(task_result: Any, split: str) -> dict[str, Any]:
    """mteb's score dict for our single split and subset."""
    return next(s for s in task_result.scores[split] if s.get("hf_subset", "default") == "default")


def _evaluate_one(encoder: Any, spec: TaskSpec, data: TaskData, config: EvalConfig) -> dict[str, Any]:
    import mteb
    from mteb.cache import ResultCache

    from conan_core.eval.mteb_tasks import build_mteb_task

    sampled, sample_info = subsample(data, config)
    task = build_mteb_task(spec, sampled, seed=config.seed)
    started = time.perf_counter()
    # "always": the same task name may carry other data (subsampling, an edited folder); never reuse a cache hit.
    result = mteb.evaluate(encoder, task, cache=ResultCache(cache_path=str(work_dir() / "mteb_cache")),
                           overwrite_strategy="always", show_progress_bar=False,
                           encode_kwargs={"batch_size": config.batch_size, "show_progress_bar": False})
    scores = _mteb_scores(result.task_results[0], spec.split)
    return task_entry(spec, scores, len(sampled), sample_info.as_dict() if sample_info else None,
                      time.perf_counter() - started)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_eval(model_path: Path, *, tasks: list[str] | None, task_dirs: list[Path], output: Path,
             config: EvalConfig | None = None,
             on_task: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Evaluate `model_path` and write the result JSON to `output` (returned as well).

    `tasks` / `task_dirs` add to the config's (`tasks=None` falls back to `config.tasks`). All task data is
    read and checked before the model is loaded, so a malformed folder fails in a second, not after an
    hour of encoding. `on_task` is called with each task's entry as it finishes (progress, logging).
    """
    from conan_core.eval.encoder import ConanMtebEncoder, model_name_for
    from conan_core.model import ConanEmbedder

    offline_env()
    config = config or EvalConfig()
    specs = resolve_specs(tasks if tasks is not None else config.tasks, [*config.task_dirs, *task_dirs])
    loaded = [(spec, spec.load()) for spec in specs]
    model = ConanEmbedder.load(model_path)
    name, revision = model_name_for(Path(model_path)), model.fingerprint()
    encoder = ConanMtebEncoder(model, name=name, revision=revision, batch_size=config.batch_size)
    entries = []
    for spec, data in loaded:
        with warnings.catch_warnings():
            # sklearn warns per fold when a weak model never predicts some class; the scores say as much.
            warnings.filterwarnings("ignore", message=".*ill-defined.*")
            entries.append(_evaluate_one(encoder, spec, data, config))
        if on_task is not None:
            on_task(entries[-1])
    result = summarize(name, revision, entries)
    result["model_path"] = str(Path(model_path).resolve())
    result["config"] = config.model_dump(mode="json")
    _write_json(Path(output), result)
    return result
