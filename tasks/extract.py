"""Prefect task: `conan_core.extract.run_extract` (LLM prompt -> response pairs and their filters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from tasks.cache import stage_task_options
from tasks.clean import publish_data_stage
from tasks.progress import call_logged


@task(**stage_task_options("extract", run_name="extract-{name}"))
def extract_task(name: str, inputs: list[str], inputs_fingerprint: str, output: str, config: dict[str, Any],
                 workers: int) -> dict[str, Any]:
    """Extract (prompt, response) pairs of `inputs` into the dataset `output`."""
    from conan_core.clean.config import ExtractConfig
    from conan_core.extract import run_extract

    manifest, _ = call_logged(f"extract {name}", run_extract, [Path(p) if not p.startswith("group:") else p
                                                              for p in inputs],
                              Path(output), ExtractConfig.model_validate(config), workers=workers, progress=False)
    return publish_data_stage("extract", name, output, manifest)
