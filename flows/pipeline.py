"""The `conan-pipeline` flow: clean -> extract LLM pairs -> init model -> pretrain -> mine hard negatives
with the pretrained model -> finetune with dynamic mining -> evaluate the final model, and the untrained
start (init) model with the same eval config, and compare the two task by task.

Each stage is a Prefect task (tasks/) that calls one conan_core entry point and returns a small dict (the
output path and its content fingerprint); the next stage takes that dict as input, so its cache key holds
the upstream content hash. Stages run one after another in the flow's thread, where Ray is started and
stopped too (Ray started from a `.submit()`ted task made a later `ray.shutdown()` take 15 s here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.settings import PREFECT_API_URL, temporary_settings

from conan_core.errors import ConanError
from conan_core.paths import PROJECT_ROOT, offline_env, work_dir
from flows.plan import StagePlan, plan_stages, preflight
from flows.server import flow_run_link_hook
from tasks.artifacts import publish_markdown
from tasks.cache import output_is_intact
from tasks.clean import clean_task
from tasks.evaluate import evaluate_task
from tasks.extract import extract_task
from tasks.finetune import finetune_task
from tasks.mine import mine_task
from tasks.model_init import init_model_task
from tasks.pretrain import pretrain_task

FLOW_NAME = "conan-pipeline"


def resolve_config_path(config: str | Path) -> Path:
    """A config path as given, else relative to the project root (deployments run from anywhere)."""
    path = Path(config)
    if not path.is_absolute() and not path.exists():
        path = PROJECT_ROOT / path
    if not path.is_file():
        raise ConanError(f"{config}: config file not found")
    return path.resolve()


def default_out_dir(config_path: Path) -> Path:
    """Outputs of a config go to a fixed place (not per run), so a rerun finds and reuses them."""
    return work_dir() / "runs" / config_path.stem


class StageRunner:
    """Calls stage tasks with the shared options, and re-executes a stage whose cached result points at an
    output that was deleted or changed since (a cache hit must never hand on a path that is not there)."""

    def __init__(self, result_storage: str | None) -> None:
        self.result_storage = result_storage
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, key: str, stage_task: Any, **params: Any) -> dict[str, Any]:
        prepared = stage_task.with_options(result_storage=self.result_storage) if self.result_storage else stage_task
        result = prepared(**params)
        if not output_is_intact(result):
            get_run_logger().warning("%s: cached output %s is gone or changed; running the stage again",
                                     key, (result or {}).get("path"))
            result = prepared.with_options(refresh_cache=True)(**params)
        self.results[key] = result
        return result


@contextlib.contextmanager
def ray_for_flow(address: str | None) -> Iterator[None]:
    """Ray for the whole flow, started and stopped in this thread (stages reuse it and leave it running)."""
    from conan_core.raysession import ray_session

    with ray_session(address):
        yield


def keyed_dir(base: str, *inputs: Any) -> str:
    """`base-<hash of inputs>`: a training stage resumes from the checkpoints in its out dir (Ray Train
    resumes a run of the same name and storage), which is right after a crash and wrong after a change of
    config or data, so each distinct set of inputs gets its own dir."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return f"{base}-{digest[:10]}"


def run_stages(plan: StagePlan, runner: StageRunner) -> dict[str, Any]:
    """The DAG, in order; every stage's inputs are the results of the stages it depends on."""
    pretrain_data = runner.run("clean-pretrain", clean_task, **plan.clean_pretrain)
    finetune_data = runner.run("clean-finetune", clean_task, **plan.clean_finetune)
    llm_pairs = runner.run("extract", extract_task, **plan.extract)
    base_model = runner.run("init-model", init_model_task, **plan.init_model)
    pretrain_inputs = {"model": base_model, "data": [pretrain_data, llm_pairs], **plan.pretrain}
    pretrained = runner.run("pretrain", pretrain_task,
                            **{**pretrain_inputs, "output": keyed_dir(plan.pretrain["output"], pretrain_inputs)})
    # Hard negatives come from the stage-1 model (its result dict, fingerprint included, keys the cache):
    # finetuning starts from it, so what it ranks high is what the finetuned model confuses.
    candidates = runner.run("mine", mine_task, model=pretrained, data=finetune_data, **plan.mine)
    finetune_inputs = {"model": pretrained, "data": [finetune_data], "candidates": candidates, **plan.finetune}
    finetuned = runner.run("finetune", finetune_task,
                           **{**finetune_inputs, "output": keyed_dir(plan.finetune["output"], finetune_inputs)})
    report = runner.run("evaluate", evaluate_task, model=finetuned, **plan.evaluate)
    start_report = runner.run("evaluate-start", evaluate_task, model=base_model, **plan.evaluate_start)
    comparison = write_comparison(start_report, report, plan.comparison)
    return {"model": finetuned["path"], "metrics": finetuned.get("metrics_path"),
            "pretrain_metrics": pretrained.get("metrics_path"), "eval_results": report["results"],
            "eval_report": report["report"], "eval_average": report.get("average"),
            "start_model": base_model["path"], "start_eval_results": start_report["results"],
            "start_eval_average": start_report.get("average"), "comparison": comparison["markdown"],
            "comparison_path": comparison["path"], "not_better": comparison["not_better"],
            "stages": runner.results}


def write_comparison(start_report: dict[str, Any], final_report: dict[str, Any], path: Path) -> dict[str, Any]:
    """The start-vs-final table (conan_core.eval.report) from the two evaluations' results.json: written to
    `path` and published as the `evaluate-comparison` markdown artifact."""
    from conan_core.eval.report import compare_results, format_comparison

    start = json.loads(Path(start_report["results"]).read_text(encoding="utf-8"))
    final = json.loads(Path(final_report["results"]).read_text(encoding="utf-8"))
    comparison = compare_results(start, final)
    markdown = format_comparison(comparison, start_label="start (untrained)", final_label="final")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown, encoding="utf-8")
    publish_markdown("evaluate-comparison", "## final model vs its untrained start model (scores x100)\n\n"
                     + markdown, "evaluation: final model vs the untrained start (init) model, per task")
    if comparison["not_better"]:
        get_run_logger().warning("the final model is not better than its start model on: %s",
                                 ", ".join(comparison["not_better"]))
    return {"markdown": markdown, "path": str(path.resolve()), "not_better": comparison["not_better"]}


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["## conan-pipeline outputs", "",
             f"- model: `{summary['model']}`",
             f"- finetune metrics: `{summary['metrics']}`",
             f"- pretrain metrics: `{summary['pretrain_metrics']}`",
             f"- evaluation results: `{summary['eval_results']}`",
             f"- evaluation report: `{summary['eval_report']}`",
             f"- evaluation average: {summary['eval_average']}",
             f"- start model (untrained): `{summary['start_model']}`, evaluation average "
             f"{summary['start_eval_average']}",
             f"- final vs start comparison: `{summary['comparison_path']}`",
             "", "### final model vs its untrained start model (scores x100)", "", summary["comparison"]]
    return "\n".join(lines) + "\n"


@flow(name=FLOW_NAME, persist_result=True, log_prints=True)
def conan_pipeline(config: str = "configs/demo.yaml", overrides: list[str] | None = None,
                   out_dir: str | None = None, result_storage: str | None = None,
                   ray_address: str | None = None) -> dict[str, Any]:
    """The whole Conan pipeline for one YAML config plus `a.b=c` overrides.

    `out_dir`: where the stage outputs go (default `<work dir>/runs/<config name>`); `result_storage`: a
    Prefect storage block slug (e.g. an S3 bucket on a cluster) for persisted task results (default: the
    local path PREFECT_LOCAL_STORAGE_PATH); `ray_address`: a Ray cluster (default RAY_ADDRESS, else local).
    """
    from conan_core.config import load_config

    offline_env()
    config_path = resolve_config_path(config)
    pipeline_config = load_config(config_path, list(overrides or []))
    preflight(pipeline_config)  # every path and name the config refers to, before Ray and the stages
    root = Path(out_dir).resolve() if out_dir else default_out_dir(config_path)
    address = ray_address or os.environ.get("RAY_ADDRESS")
    plan = plan_stages(pipeline_config, root)
    get_run_logger().info("config %s -> outputs under %s", config_path, root)
    with ray_for_flow(address):
        summary = run_stages(plan, StageRunner(result_storage))
    publish_markdown("pipeline-outputs", summary_markdown(summary), "where the model, metrics and report are")
    return summary


def prefect_settings(api_url: str) -> contextlib.AbstractContextManager:
    """The Prefect settings a pipeline run in this process uses: this API. Task results persist under
    PREFECT_LOCAL_STORAGE_PATH, by default $PREFECT_HOME/storage, and `offline_env()` puts PREFECT_HOME
    inside the work dir: the same place a worker's flow-run subprocess uses, so both share one cache."""
    return temporary_settings(updates={PREFECT_API_URL: api_url})


def run_pipeline(api_url: str, config: str, overrides: list[str] | None = None, out_dir: str | None = None,
                 on_flow_run: Callable[[str], None] | None = None, **options: Any) -> Any:
    """Run the flow in this process against `api_url`; returns the flow's final Prefect state.
    `on_flow_run` gets the flow run's UI link when it starts running."""
    pipeline = conan_pipeline
    if on_flow_run is not None:
        pipeline = conan_pipeline.with_options(on_running=[flow_run_link_hook(on_flow_run)])
    with prefect_settings(api_url):
        return pipeline(config=config, overrides=overrides, out_dir=out_dir, return_state=True, **options)
