"""Launch a training stage on Ray Train (`TorchTrainer`) and collect its outputs.

Ray is local by default (started in `<work dir>/ray`, stopped again from the same thread), or joined at
`ray_address` / `RAY_ADDRESS`. Workers: `workers`, else one per GPU when there are any, else one per node
with all its threads (finetuning is capped at the CBB layout's rank count). gloo on CPU, NCCL with `use_gpu` on GPU.
Checkpoints go to `storage_path` (a local path or any pyarrow/fsspec URI; default `<out>/checkpoints`)
under the run name `pretrain` / `finetune`: rerunning with the same out dir resumes from the last
checkpoint (Ray Train V2 semantics), and `FailureConfig(max_failures)` restarts crashed workers from it.
Each (re)start of the workers is announced through `notice_callback` ("resumed from step N (checkpoint
...)" or "starting at step 0 (no checkpoint)"), from the starts log the loop writes.

Before Ray starts, the driver checks what the workers would otherwise fail on (`train.preflight`): every
dataset against its manifest (shards present, sha256, row counts: the same DatasetIntegrityError `conan
mine` gives) and the model dir (JSON files parse, safetensors headers readable and the files complete).
When a worker does fail, the error names the worker's own exception in one line, not Ray's summary.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conan_core.errors import ConanError
from conan_core.mining.config import MiningConfig
from conan_core.model import resolve_base
from conan_core.raysession import ray_session
from conan_core.train.config import FinetuneConfig, PretrainConfig, TrainCommon
from conan_core.train.loop import FINAL_MODEL_DIR, HARDNESS_FILE, train_loop
from conan_core.train.metrics import (
    METRICS_FILE,
    PLOT_FILE,
    STARTS_FILE,
    plot_losses,
    read_metrics,
    read_starts,
    start_message,
)
from conan_core.train.preflight import check_candidates, check_dataset, check_model_files
from conan_core.train.spec import TrainSpec

ProgressCallback = Callable[[int, int, dict[str, Any]], None]
NoticeCallback = Callable[[str], None]
_log = logging.getLogger(__name__)


class TrainingError(ConanError):
    """The Ray Train run failed (after its allowed restarts)."""


@dataclass
class TrainResult:
    model_dir: Path
    metrics_path: Path
    plot_path: Path | None
    steps: int
    final_metrics: dict[str, Any]
    checkpoint: str | None = None
    hardness_path: Path | None = None
    hardness_plot: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def run_pretrain(config: PretrainConfig, data_dirs: Sequence[str | Path], model_path: str | Path,
                 out_dir: str | Path, *, workers: int | None = None, ray_address: str | None = None,
                 progress_callback: ProgressCallback | None = None, storage_path: str | None = None,
                 fault_injection: dict[str, Any] | None = None,
                 notice_callback: NoticeCallback | None = None) -> TrainResult:
    """Weakly-supervised pretraining (in-batch InfoNCE over the global batch); see the module docstring."""
    spec = TrainSpec(stage="pretrain", config=config, fault_injection=fault_injection,
                     **_checked_paths(data_dirs, model_path, out_dir))
    return _run(spec, workers, ray_address, progress_callback, storage_path, notice_callback)


def run_finetune(config: FinetuneConfig, data_dirs: Sequence[str | Path], model_path: str | Path,
                 out_dir: str | Path, *, candidates_dir: str | Path | None = None,
                 mining: MiningConfig | None = None, workers: int | None = None, ray_address: str | None = None,
                 progress_callback: ProgressCallback | None = None, storage_path: str | None = None,
                 fault_injection: dict[str, Any] | None = None,
                 notice_callback: NoticeCallback | None = None) -> TrainResult:
    """CBB finetuning (or `vanilla`), with DHNM over `candidates_dir` when given."""
    if candidates_dir is not None:
        if not Path(candidates_dir).is_dir():
            raise ConanError(f"candidates dir not found: {candidates_dir}")
        check_candidates(Path(candidates_dir))
    spec = TrainSpec(stage="finetune", config=config, mining=mining, fault_injection=fault_injection,
                     candidates_dir=Path(candidates_dir).resolve() if candidates_dir is not None else None,
                     **_checked_paths(data_dirs, model_path, out_dir))
    return _run(spec, workers, ray_address, progress_callback, storage_path, notice_callback)


def _checked_paths(data_dirs: Sequence[str | Path], model_path: str | Path,
                   out_dir: str | Path) -> dict[str, Any]:
    """The spec's paths, absolute, after the driver-side checks (train.preflight); makes the out dir."""
    if not data_dirs:
        raise ConanError("no training data given (pass at least one dataset dir)")
    for data_dir in data_dirs:
        check_dataset(Path(data_dir))
    model_dir = resolve_base(model_path)  # one-line ModelLoadError for a bad path
    check_model_files(model_dir)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return {"data_dirs": [Path(d).resolve() for d in data_dirs], "model_path": model_dir.resolve(), "out_dir": out}


def worker_error_line(err: BaseException) -> str:
    """One line naming what failed: the worker's own exception (a ConanError's message, else its type and
    first line) when Ray Train reports worker failures, the controller's when it failed; else `err`'s."""
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        rank, cause = min(failures.items(), key=lambda item: (_blame_order(item[1]), item[0]))
        others = len(failures) - 1
        more = f" (and {others} other worker{'s' if others > 1 else ''})" if others else ""
        return f"worker {rank}: {_exception_line(cause)}{more}"
    controller = getattr(err, "controller_failure", None)
    if isinstance(controller, BaseException):
        return f"Ray Train controller: {_exception_line(controller)}"
    return _exception_line(err)


_PEER_LOST = re.compile(r"gloo|nccl|connection (closed|reset) by peer", re.IGNORECASE)


def _blame_order(err: BaseException) -> int:
    """Which of several workers' errors to show: an expected ConanError first, then a worker process that
    died (Ray's error), then other errors of the training code; last, a collective that broke off because
    a peer went away (what the surviving workers report)."""
    err = getattr(err, "_base_exc", err)
    if isinstance(err, ConanError):
        return 0
    if (type(err).__module__ or "").startswith("ray."):
        return 1
    return 3 if _PEER_LOST.search(str(err)) else 2


def _exception_line(err: BaseException) -> str:
    err = getattr(err, "_base_exc", err)  # Ray's UserExceptionWithTraceback
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if isinstance(err, ConanError):
        return lines[0] if lines else type(err).__name__
    if not lines:
        return type(err).__name__
    # Ray's errors put the cause last ("... The actor is dead because ..."), then advice; Python's first.
    if (type(err).__module__ or "").startswith("ray."):
        text = lines[-1].split(" Some common causes include")[0]
        text = text if len(text) <= 300 else text[:297] + "..."
    else:
        text = lines[0]
    return f"{type(err).__name__}: {text}"


def default_workers(config: TrainCommon) -> int:
    """What the cluster offers: one worker per GPU; without GPUs one per node, each with all its node's
    threads (one 2-thread worker trains 1.14x faster than two 1-thread workers on the 2-core machine:
    docs/benchmarks.md, "Training as users run it"); finetuning at most the layout's ranks."""
    import ray

    offered = int(ray.cluster_resources().get("GPU", 0)) or sum(
        1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) >= 1)
    if isinstance(config, FinetuneConfig):
        offered = min(offered, config.layout.logical_ranks)
    return max(1, offered)


def _run(spec: TrainSpec, workers: int | None, ray_address: str | None,
         progress_callback: ProgressCallback | None, storage_path: str | None,
         notice_callback: NoticeCallback | None = None) -> TrainResult:
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config, out = spec.config, spec.out_dir
    use_gpu = torch.cuda.is_available()
    with ray_session(ray_address):
        count = workers or default_workers(config)
        if isinstance(config, FinetuneConfig):
            from conan_core.train.batching import assign_roles

            assign_roles(config.layout, count)  # the layout's one check (LayoutError), here before Ray starts
        trainer = TorchTrainer(
            train_loop, train_loop_config={"spec": spec},  # the typed spec, pickled by Ray as it is
            # CPU workers: spread over the nodes (the default count is one per node; PACK would stack them)
            scaling_config=ScalingConfig(num_workers=count, use_gpu=use_gpu,
                                         placement_strategy="PACK" if use_gpu else "SPREAD"),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                name=spec.stage, storage_path=storage_path or str(out / "checkpoints"),
                checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                failure_config=FailureConfig(max_failures=config.max_failures)))
        result = _fit_with_progress(trainer, out, progress_callback, notice_callback)
    return _collect(out, result)


def _fit_with_progress(trainer: Any, out: Path, callback: ProgressCallback | None,
                       notice: NoticeCallback | None = None) -> Any:
    """Run fit() in a helper thread while this thread announces each (re)start of the workers and hands
    new metrics lines to the callback, so both callbacks (e.g. Prefect's) run on the caller's thread."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised on the caller's thread below
            outcome["error"] = err

    tail = _ProgressTail(out, callback, notice or _log.info)
    thread = threading.Thread(target=fit, name="conan-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=1.0)
        tail.poll()
    tail.poll()
    if "error" in outcome:
        raise TrainingError(f"training failed: {worker_error_line(outcome['error'])}") from outcome["error"]
    return outcome["result"]


class _ProgressTail:
    """Follows `starts.jsonl` and `metrics.jsonl` of a run. A start line (the loop writes it after cutting
    the metrics log back to its start step) is announced, and progress continues from its step: steps
    redone after a restart are reported again, steps of an earlier run that this one resumes are not."""

    def __init__(self, out: Path, callback: ProgressCallback | None, notice: NoticeCallback) -> None:
        self.metrics_path, self.starts_path = out / METRICS_FILE, out / STARTS_FILE
        self.callback, self.notice = callback, notice
        self.seen = len(read_starts(self.starts_path))
        self.starts = 0
        try:  # until this run's start line arrives, the old log's steps are not news
            self.last_step = max((row["step"] for row in read_metrics(self.metrics_path)), default=0)
        except ValueError:
            self.last_step = 0

    def poll(self) -> None:
        try:
            entries = read_starts(self.starts_path)[self.seen:]
        except ValueError:  # a line being written right now
            entries = []
        for entry in entries:
            self.seen += 1
            message = start_message(entry)
            self.notice(f"restarted after a worker failure: {message}" if self.starts else message)
            self.starts += 1
            self.last_step = entry["start_step"]
        if self.callback is None:
            return
        try:
            rows = read_metrics(self.metrics_path)
        except ValueError:  # a line being written right now
            return
        for row in rows:
            if row["step"] > self.last_step:
                self.callback(row["step"], row["total_steps"], {k: v for k, v in row.items() if k != "batch_ids"})
                self.last_step = row["step"]


def _collect(out: Path, result: Any) -> TrainResult:
    metrics_path = out / METRICS_FILE
    rows = read_metrics(metrics_path)
    final = {k: v for k, v in (rows[-1] if rows else {}).items() if k != "batch_ids"}
    model_dir = out / FINAL_MODEL_DIR
    if not (model_dir / "modules.json").is_file():
        raise TrainingError(f"training finished but wrote no model to {model_dir}")
    hardness = out / HARDNESS_FILE
    hardness_plot = None
    if hardness.is_file():
        from conan_core.mining.plot import plot_hardness

        hardness_plot = plot_hardness(hardness, out / "hardness.png")
    checkpoint = getattr(getattr(result, "checkpoint", None), "path", None)
    return TrainResult(model_dir=model_dir, metrics_path=metrics_path,
                       plot_path=plot_losses(metrics_path, out / PLOT_FILE), steps=int(final.get("step", 0)),
                       final_metrics=final, checkpoint=checkpoint,
                       hardness_path=hardness if hardness.is_file() else None, hardness_plot=hardness_plot)
