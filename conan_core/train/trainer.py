"""Launch a training stage on Ray Train (`TorchTrainer`) and collect its outputs.

Ray is local by default (started in `<work dir>/ray`, stopped again from the same thread), or joined at
`ray_address` / `RAY_ADDRESS`. Workers: `workers`, else what the cluster offers (GPUs when there are any,
else CPUs; finetuning is capped at the CBB layout's rank count). gloo on CPU, NCCL with `use_gpu` on GPU.
Checkpoints go to `storage_path` (a local path or any pyarrow/fsspec URI; default `<out>/checkpoints`)
under the run name `pretrain` / `finetune`: rerunning with the same out dir resumes from the last
checkpoint (Ray Train V2 semantics), and `FailureConfig(max_failures)` restarts crashed workers from it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conan_core.errors import ConanError
from conan_core.model import resolve_base
from conan_core.raysession import ray_session
from conan_core.train.config import FinetuneConfig, PretrainConfig, TrainCommon
from conan_core.train.loop import FINAL_MODEL_DIR, HARDNESS_FILE, train_loop
from conan_core.train.metrics import METRICS_FILE, PLOT_FILE, plot_losses, read_metrics

ProgressCallback = Callable[[int, int, dict[str, Any]], None]


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
                 fault_injection: dict[str, Any] | None = None) -> TrainResult:
    """Weakly-supervised pretraining (in-batch InfoNCE over the global batch); see the module docstring."""
    spec = _spec("pretrain", config, data_dirs, model_path, out_dir, fault_injection)
    return _run(spec, config, workers, ray_address, progress_callback, storage_path)


def run_finetune(config: FinetuneConfig, data_dirs: Sequence[str | Path], model_path: str | Path,
                 out_dir: str | Path, *, candidates_dir: str | Path | None = None, mining: Any = None,
                 workers: int | None = None, ray_address: str | None = None,
                 progress_callback: ProgressCallback | None = None, storage_path: str | None = None,
                 fault_injection: dict[str, Any] | None = None) -> TrainResult:
    """CBB finetuning (or `vanilla`), with DHNM over `candidates_dir` when given (mining: MiningConfig)."""
    spec = _spec("finetune", config, data_dirs, model_path, out_dir, fault_injection)
    if candidates_dir is not None:
        if not Path(candidates_dir).is_dir():
            raise ConanError(f"candidates dir not found: {candidates_dir}")
        spec["candidates_dir"] = str(Path(candidates_dir).resolve())
    spec["mining"] = mining.model_dump(mode="json") if mining is not None else None
    return _run(spec, config, workers, ray_address, progress_callback, storage_path)


def _spec(stage: str, config: TrainCommon, data_dirs: Sequence[str | Path], model_path: str | Path,
          out_dir: str | Path, fault_injection: dict[str, Any] | None) -> dict[str, Any]:
    missing = [str(d) for d in data_dirs if not (Path(d) / "manifest.json").is_file()]
    if not data_dirs or missing:
        raise ConanError(f"not a dataset dir (no manifest.json): {', '.join(missing) or '(none given)'}")
    model_dir = resolve_base(model_path)  # one-line ModelLoadError for a bad path
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return {"stage": stage, "config": config.model_dump(mode="json"),
            "data_dirs": [str(Path(d).resolve()) for d in data_dirs], "model_path": str(model_dir.resolve()),
            "out_dir": str(out), "fault_injection": fault_injection}


def default_workers(config: TrainCommon) -> int:
    """What the cluster offers: one worker per GPU, else per CPU; finetuning at most the layout's ranks."""
    import ray

    resources = ray.cluster_resources()
    offered = int(resources.get("GPU", 0)) or int(resources.get("CPU", 1))
    if isinstance(config, FinetuneConfig):
        offered = min(offered, config.layout.logical_ranks)
    return max(1, offered)


def _run(spec: dict[str, Any], config: TrainCommon, workers: int | None, ray_address: str | None,
         progress_callback: ProgressCallback | None, storage_path: str | None) -> TrainResult:
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(spec["out_dir"])
    use_gpu = torch.cuda.is_available()
    with ray_session(ray_address):
        count = workers or default_workers(config)
        if isinstance(config, FinetuneConfig) and count > config.layout.logical_ranks:
            raise ConanError(f"{count} workers but the CBB layout has {config.layout.logical_ranks} ranks "
                             "(retrieval_group + sts_workers); use fewer workers or a bigger layout")
        trainer = TorchTrainer(
            train_loop, train_loop_config=spec,
            scaling_config=ScalingConfig(num_workers=count, use_gpu=use_gpu),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                name=spec["stage"], storage_path=storage_path or str(out / "checkpoints"),
                checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                failure_config=FailureConfig(max_failures=config.max_failures)))
        result = _fit_with_progress(trainer, out / METRICS_FILE, progress_callback)
    return _collect(spec, out, result)


def _fit_with_progress(trainer: Any, metrics_path: Path, callback: ProgressCallback | None) -> Any:
    """Run fit() in a helper thread while this thread hands new metrics lines to the callback, so the
    callback (e.g. a Prefect progress artifact) runs on the caller's thread."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised on the caller's thread below
            outcome["error"] = err

    # Steps already in the log come from an earlier run this one resumes: not news to the caller.
    last_step = max((row["step"] for row in read_metrics(metrics_path)), default=0)
    thread = threading.Thread(target=fit, name="conan-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=1.0)
        if callback is not None:
            last_step = _emit_progress(metrics_path, last_step, callback)
    if callback is not None:
        _emit_progress(metrics_path, last_step, callback)
    if "error" in outcome:
        err = outcome["error"]
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(f"training failed: {first}") from err
    return outcome["result"]


def _emit_progress(path: Path, last_step: int, callback: ProgressCallback) -> int:
    try:
        rows = read_metrics(path)
    except ValueError:  # a line being written right now
        return last_step
    for row in rows:
        if row["step"] > last_step:
            callback(row["step"], row["total_steps"], {k: v for k, v in row.items() if k != "batch_ids"})
            last_step = row["step"]
    return last_step


def _collect(spec: dict[str, Any], out: Path, result: Any) -> TrainResult:
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
