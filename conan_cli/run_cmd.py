"""`conan run --config FILE [--set a.b=c ...]`: the whole pipeline as a Prefect flow run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from conan_cli.errors import one_line_errors
from conan_cli.main import app
from conan_core.errors import ConanError


class PipelineFailed(ConanError):
    """The flow run ended in a state other than Completed."""


@app.command("run")
@one_line_errors
def run(
    config: Annotated[Path, typer.Option(help="Pipeline YAML config.")] = Path("configs/demo.yaml"),
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config value: a.b=c (repeatable).")] = None,
    out_dir: Annotated[Path | None, typer.Option(help="Stage outputs; default <work dir>/runs/<config name>.")] = None,
    result_storage: Annotated[str | None, typer.Option(
        help="Prefect storage block slug for task results (e.g. s3-bucket/conan); default: the work dir.")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster; default RAY_ADDRESS, else local.")] = None,
) -> None:
    """Run clean -> extract -> init -> pretrain -> mine -> finetune -> eval as the `conan-pipeline` Prefect flow.

    At the end it prints where the outputs are and the final model's scores against its untrained start
    model's, task by task.

    Uses the Prefect API at PREFECT_API_URL when it answers, else the server `conan server start` keeps
    on this PREFECT_HOME, else starts a local server for the run (and stops it afterwards). Prints the
    flow run's UI link as it starts. Rerunning after a failure serves finished stages from cache.
    """
    from conan_core.config import load_config
    from flows.plan import preflight
    from flows.server import KEEP_HINT, prefect_api

    # A bad config, or a path / name it refers to that does not resolve (input files, model.base,
    # eval.tasks / eval.task_dirs), fails here in one line, before any server or Ray starts.
    preflight(load_config(config, overrides or []))
    links: list[str] = []
    with prefect_api(echo=typer.echo) as server:
        typer.echo(f"Prefect API: {server.api_url} (UI: {server.api_url.removesuffix('/api')})")
        # Import after the API is chosen: Prefect reads its settings when first imported.
        from flows.pipeline import run_pipeline

        def announce(link: str) -> None:
            links.append(link)
            typer.echo(f"flow run: {link}")

        state = run_pipeline(server.api_url, str(config), overrides=overrides or [],
                             out_dir=str(out_dir) if out_dir else None, result_storage=result_storage,
                             ray_address=ray_address, on_flow_run=announce)
        outlives_run = not server.started_here
        if not state.is_completed():
            seen = f" (in the UI: {links[-1]})" if links and outlives_run else ""
            raise PipelineFailed(f"pipeline run ended {state.name}: {state.message}{seen}; fix the cause and run "
                                 f"the same command again (finished stages come back from cache)")
        summary = state.result()
    typer.echo(f"model:              {summary['model']}")
    typer.echo(f"training metrics:   {summary['metrics']}")
    typer.echo(f"evaluation results: {summary['eval_results']}")
    typer.echo(f"evaluation report:  {summary['eval_report']}")
    typer.echo(f"evaluation average: {summary['eval_average']}")
    if summary.get("comparison"):
        typer.echo(f"start model:        {summary['start_model']} (untrained; evaluation average "
                   f"{summary['start_eval_average']})")
        typer.echo(f"comparison:         {summary['comparison_path']}")
        typer.echo("")
        typer.echo("final model vs its untrained start model (scores x100):")
        typer.echo(summary["comparison"].rstrip("\n"))
    typer.echo("")
    if outlives_run:
        typer.echo(f"this run in the Prefect UI: {links[-1] if links else server.api_url.removesuffix('/api')}")
    else:
        typer.echo(f"the Prefect server stopped with this run; {KEEP_HINT}")
