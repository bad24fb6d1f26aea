"""The cache policy of every stage task, the content fingerprints it keys on, and the @task options
(cache, persisted results, retries) every stage shares.

Stages hand each other paths plus content hashes, never data. The cache key of a stage is its inputs (the
config section, the paths, the fingerprints of the upstream outputs) plus the task's source code, and not
the flow-run id: rerunning the flow after a failure serves every completed stage from cache (measured to
work in Prefect 3.9.1), and a changed upstream output changes the key of everything after it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

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
