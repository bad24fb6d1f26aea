"""Prefect task: `conan_core.train.trainer.run_finetune` (CBB loss, dynamic hard negatives, Ray Train)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.cache import stage_task_options
from tasks.progress import ProgressReporter, call_logged
from tasks.training_report import publish_training


@task(**stage_task_options("finetune"))
def finetune_task(model: dict[str, Any], data: list[dict[str, Any]], output: str, config: dict[str, Any],
                  mining: dict[str, Any], candidates: dict[str, Any] | None, workers: int | None) -> dict[str, Any]:
    """Finetune `model` on `data` with the mined `candidates` (upstream results) into `output`."""
    from conan_core.mining.config import MiningConfig
    from conan_core.train.config import FinetuneConfig
    from conan_core.train.trainer import run_finetune

    progress = ProgressReporter("finetune-progress", "finetuning: share of steps done")
    result, _ = call_logged("finetune", run_finetune, FinetuneConfig.model_validate(config),
                            [Path(d["path"]) for d in data], Path(model["path"]), Path(output),
                            candidates_dir=Path(candidates["path"]) if candidates else None,
                            mining=MiningConfig.model_validate(mining), workers=workers,
                            progress_callback=progress, notice_callback=get_run_logger().info)
    progress.finish()
    return publish_training("finetune", result)
