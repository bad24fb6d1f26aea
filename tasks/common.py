"""What every stage task shares: the cache policy, content fingerprints, the small result a stage returns,
and the artifact helpers (tables of counts, markdown, links, a progress bar fed by the trainer).

Stages hand each other paths plus content hashes, never data. The cache key of a stage is its inputs (the
config section, the paths, the fingerprints of the upstream outputs) plus the task's source code, and not
the flow-run id: rerunning the flow after a failure serves every completed stage from cache (measured to
work in Prefect 3.9.1), and a changed upstream output changes the key of everything after it.

Stage modules import their conan_core entry point inside the task body: loading the flow (for `prefect
deploy`, the UI's parameter schema, a worker's first look) then does not pull in torch, Ray or mteb.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import INPUTS, TASK_SOURCE

from conan_core.errors import ConanError
from conan_core.io.dataset import sha256_file

STAGE_CACHE_POLICY = INPUTS + TASK_SOURCE
# Stages that start Ray or read shared storage can fail for transient reasons (a node going away, a
# port race at start); deterministic failures fail again quickly, so a short backoff costs little.
TRANSIENT_RETRIES = 2
RETRY_DELAYS_S = [10, 30]


class StageOutputError(ConanError):
    """A stage's output is missing or does not match the fingerprint it was recorded with."""


def fingerprint_path(path: str | Path) -> str:
    """Content hash of a stage input or output.

    A dataset dir (it has manifest.json, which lists every shard's sha256) is hashed by its manifest, the
    same as `conan_core.io.dataset.dataset_fingerprint`; a model dir or raw folder by every file's relative
    path and bytes; a file by its bytes.
    """
    path = Path(path)
    if not path.exists():
        raise StageOutputError(f"{path}: does not exist")
    if path.is_file():
        return sha256_file(path)
    manifest = path / "manifest.json"
    if manifest.is_file():
        return sha256_file(manifest)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def fingerprint_paths(paths: Iterable[str | Path]) -> str:
    """One hash over several inputs, in order (raw input files of the data stages)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(Path(path).resolve()).encode())
        digest.update(fingerprint_path(path).encode())
    return digest.hexdigest()


def stage_output(path: str | Path, **summary: Any) -> dict[str, Any]:
    """The small result a stage returns: where its output is, its content hash, and a JSON-able summary."""
    path = Path(path).resolve()
    return {"path": str(path), "fingerprint": fingerprint_path(path), **summary}


def output_is_intact(result: Mapping[str, Any] | None) -> bool:
    """True when the output a (possibly cached) stage result points at still exists unchanged."""
    if not result or "path" not in result:
        return False
    try:
        return fingerprint_path(result["path"]) == result["fingerprint"]
    except StageOutputError:
        return False


def jsonable(value: Any) -> Any:
    """A JSON-safe copy (paths and numpy scalars become strings / floats), for task results and artifacts."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


# ---- artifacts ------------------------------------------------------------------------------------

def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    text = "-".join(parts).lower()
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")[:100]


def flatten_counts(counts: Mapping[str, Any], *, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Nested count dicts as (key path, value) pairs, e.g. {"dropped": {"afqmc": {"empty_side": 3}}}."""
    rows: list[tuple[tuple[str, ...], Any]] = []
    for key, value in counts.items():
        if isinstance(value, Mapping):
            rows += flatten_counts(value, prefix=(*prefix, str(key)))
        else:
            rows.append(((*prefix, str(key)), value))
    return rows


def counts_table(counts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows for a table artifact: one per leaf count, its key path split into columns."""
    flat = flatten_counts(counts)
    depth = max((len(path) for path, _ in flat), default=0)
    table = []
    for path, value in flat:
        padded = list(path[:-1]) + [""] * (depth - len(path)) + [path[-1]]
        row = {f"level_{i + 1}": part for i, part in enumerate(padded[:-1])}
        row.update(name=padded[-1], count=value)
        table.append(row)
    return table


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    if rows:
        create_table_artifact(key=artifact_key(key), table=jsonable(rows), description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description)


def publish_link(key: str, path: str | Path, description: str) -> None:
    path = Path(path).resolve()
    create_link_artifact(key=artifact_key(key), link=path.as_uri(), link_text=str(path), description=description)


def points_table_markdown(title: str, rows: list[dict[str, Any]], columns: list[str], *, max_rows: int = 40) -> str:
    """A markdown table of (at most `max_rows`, evenly spaced) points of a curve."""
    if not rows:
        return f"### {title}\n\n(no points recorded)\n"
    stride = max(1, -(-len(rows) // max_rows))
    picked = rows[::stride]
    if picked[-1] is not rows[-1]:
        picked.append(rows[-1])
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in picked:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def read_jsonl(path: str | Path | None) -> list[dict[str, Any]]:
    if not path or not Path(path).is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def image_markdown(title: str, image: str | Path | None) -> str:
    """Markdown pointing at a plot on disk (the Prefect UI shows it when the path is reachable)."""
    if not image or not Path(image).is_file():
        return ""
    path = Path(image).resolve()
    return f"### {title}\n\n![{title}]({path.as_uri()})\n\n`{path}`\n"


class ProgressReporter:
    """A Prefect progress artifact fed by the trainer's `progress_callback(step, total, metrics)`.

    The callback may come from a thread other than the task's (Ray Train reports on the driver), so the
    task's Prefect context is captured here and each update runs in a copy of it. Updates are throttled,
    and an update that fails is logged and skipped: progress display never stops a training run.
    """

    def __init__(self, key: str, description: str, *, min_interval_s: float = 2.0,
                 log_interval_s: float = 30.0) -> None:
        self._context = contextvars.copy_context()
        self._min_interval_s = min_interval_s
        self._log_interval_s = log_interval_s
        self._last_update = 0.0
        self._last_log = 0.0
        self._lock = threading.Lock()
        self._logger = get_run_logger()
        self.artifact_id = create_progress_artifact(progress=0.0, key=artifact_key(key), description=description)

    def __call__(self, step: int, total: int | None, metrics: Mapping[str, Any] | None = None) -> None:
        now = time.monotonic()
        finished = bool(total) and step >= total
        with self._lock:
            if not finished and now - self._last_update < self._min_interval_s:
                return
            self._last_update = now
        percent = 100.0 * step / total if total else 0.0
        self._context.copy().run(self._update, min(percent, 100.0), step, total, metrics or {})

    def _update(self, percent: float, step: int, total: int | None, metrics: Mapping[str, Any]) -> None:
        try:
            update_progress_artifact(artifact_id=self.artifact_id, progress=percent)
            loss = metrics.get("loss")
            now = time.monotonic()
            if loss is not None and (now - self._last_log >= self._log_interval_s or percent >= 100.0):
                self._last_log = now
                self._logger.info("step %s/%s loss %.4f", step, total, float(loss))
        except Exception as err:  # noqa: BLE001 - display only; never fail training over it
            self._logger.warning("progress artifact update failed: %s", err)

    def finish(self) -> None:
        self._context.copy().run(self._update, 100.0, 0, None, {})


def call_logged(logger_name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Run a library call, logging its start and duration through the Prefect run logger."""
    logger = get_run_logger()
    logger.info("%s: starting", logger_name)
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    elapsed = time.perf_counter() - started
    logger.info("%s: finished in %.1f s", logger_name, elapsed)
    return value, elapsed


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: a ConanError (bad input, bad config, missing file) fails the same way
    every time, so it is not retried; anything else (a Ray node lost, a port race) is."""
    return not isinstance(getattr(state, "data", None), ConanError)


def stage_task_options(name: str, *, run_name: str | None = None,
                       retries: int = TRANSIENT_RETRIES) -> dict[str, Any]:
    """The @task options every stage shares: persisted results, input-keyed cache, retries with backoff,
    and a task-run name that is the stage's name (so the UI and the API show `pretrain`, not `pretrain-3f1`)."""
    return {
        "name": name,
        "task_run_name": run_name or name,
        "persist_result": True,
        "cache_policy": STAGE_CACHE_POLICY,
        "retries": retries,
        "retry_delay_seconds": RETRY_DELAYS_S[:max(retries, 1)],
        "retry_condition_fn": retry_unless_bad_input,
        "log_prints": False,  # libraries print noise (one prints bytecode during eval); we log explicitly
    }
