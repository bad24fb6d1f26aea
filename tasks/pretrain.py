"""Prefect task: `conan_core.train.trainer.run_pretrain` (weakly-supervised in-batch InfoNCE on Ray Train)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.cache import stage_task_options
from tasks.progress import ProgressReporter, call_logged
from tasks.training_report import publish_training


@task(**stage_task_options("pretrain"))
def pretrain_task(model: dict[str, Any], data: list[dict[str, Any]], output: str, config: dict[str, Any],
                  workers: int | None) -> dict[str, Any]:
    """Pretrain `model` on the datasets `data` (upstream results) into `output`; returns the model dir."""
    from conan_core.train.config import PretrainConfig
    from conan_core.train.trainer import run_pretrain

    progress = ProgressReporter("pretrain-progress", "pretraining: share of steps done")
    result, _ = call_logged("pretrain", run_pretrain, PretrainConfig.model_validate(config),
                            [Path(d["path"]) for d in data], Path(model["path"]), Path(output), workers=workers,
                            progress_callback=progress, notice_callback=get_run_logger().info)
    progress.finish()
    return publish_training("pretrain", result)
