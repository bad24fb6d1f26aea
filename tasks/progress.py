"""How a stage task reports its progress: a progress artifact fed by the trainer, and logged library calls."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks.artifacts import artifact_key


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

