"""`conan eval` (score a model with mteb on built-in tasks and task folders) and `conan eval-tasks`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from conan_cli.errors import one_line_errors
from conan_cli.main import app


def _split_names(values: list[str] | None) -> list[str] | None:
    """`--tasks A --tasks B` and `--tasks A,B` both work."""
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


@app.command("eval")
@one_line_errors
def eval_model(
    model: Annotated[Path, typer.Option(help="Model directory (conan / sentence-transformers format).")],
    output: Annotated[Path, typer.Option(help="Result JSON to write.")],
    tasks: Annotated[list[str] | None, typer.Option(
        help="Task or group names (zh-default, en-default, quick, all); repeatable or comma-separated. "
             "Default: zh-default, or only the --task-dir folders when given.")] = None,
    task_dir: Annotated[list[Path] | None, typer.Option(help="A drop-in task folder; repeatable.")] = None,
    batch_size: Annotated[int, typer.Option(help="Texts per encoding batch.")] = 64,
    max_pairs: Annotated[int | None, typer.Option(
        help="Subsample STS / pair classification to this many pairs.")] = None,
    max_docs: Annotated[int | None, typer.Option(
        help="Subsample clustering / classification texts and retrieval corpora to this many.")] = None,
    max_queries: Annotated[int | None, typer.Option(help="Subsample retrieval / reranking queries.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the subsampling and of mteb's evaluators.")] = 42,
) -> None:
    """Score a model with mteb's evaluators; prints a markdown table and writes the JSON result."""
    import datasets

    from conan_core.eval.config import EvalConfig
    from conan_core.eval.run import format_table, run_eval

    datasets.disable_progress_bars()  # mteb's per-task dataset maps would flood the terminal

    config = EvalConfig(batch_size=batch_size, max_pairs=max_pairs, max_docs=max_docs, max_queries=max_queries,
                        seed=seed)

    def progress(entry: dict) -> None:
        typer.echo(f"{entry['name']}: {entry['main_score_name']} = {100 * entry['main_score']:.2f} "
                   f"({entry['eval_seconds']:.0f} s)", err=True)

    result = run_eval(model, tasks=_split_names(tasks), task_dirs=task_dir or [], output=output, config=config,
                      on_task=progress)
    typer.echo(format_table(result))
    typer.echo(f"results written to {output}")


@app.command("eval-tasks")
@one_line_errors
def eval_tasks() -> None:
    """List the built-in evaluation tasks (name, type, split, data path) and the named groups."""
    from conan_core.eval.tasks import list_builtin_tasks, task_groups

    typer.echo("| task | type | lang | split | data | note |\n|---|---|---|---|---|---|")
    for row in list_builtin_tasks():
        cells = [row["name"], row["type"], row["lang"], row["split"], row["path"], row["note"]]
        typer.echo("| " + " | ".join(cells) + " |")
    typer.echo("")
    for group, names in task_groups().items():
        typer.echo(f"{group}: {', '.join(names)}")
