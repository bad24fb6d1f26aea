"""`conan eval` (score a model with mteb on built-in tasks and task folders) and `conan eval-tasks`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from conan_cli.config_opts import ConfigOpt, SetOpt, build_section
from conan_cli.errors import one_line_errors
from conan_cli.main import app


def _split_names(values: list[str] | None) -> list[str] | None:
    """`--tasks A --tasks B` and `--tasks A,B` both work."""
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def eval_section(config: Path | None = None, sets: list[str] | None = None, *, tasks: list[str] | None = None,
                 task_dir: list[Path] | None = None, batch_size: int | None = None, max_pairs: int | None = None,
                 max_docs: int | None = None, max_queries: int | None = None, seed: int | None = None) -> Any:
    """`conan eval`'s EvalConfig: the `eval` section of `config`, `--set`, then the shortcuts given
    (`--tasks` / `--task-dir` replace the config's lists)."""
    from conan_core.eval.config import EvalConfig

    return build_section(EvalConfig, "eval", config, sets, tasks=_split_names(tasks),
                         task_dirs=[str(d) for d in task_dir] if task_dir else None, batch_size=batch_size,
                         max_pairs=max_pairs, max_docs=max_docs, max_queries=max_queries, seed=seed)


def default_output(model: Path) -> Path:
    """`<work dir>/eval/<model dir name>.json`; a dir named `model` (what `conan train` writes under its
    --out) is named with its parent: `<out name>-model.json`."""
    from conan_core.paths import work_dir

    model = Path(model).resolve()
    name = f"{model.parent.name}-{model.name}" if model.name == "model" and model.parent.name else model.name
    return work_dir() / "eval" / f"{name}.json"


@app.command("eval")
@one_line_errors
def eval_model(
    model: Annotated[Path, typer.Option(help="Model directory (conan / sentence-transformers format).")],
    output: Annotated[Path | None, typer.Option(
        help="Result JSON to write (default: <work dir>/eval/<model dir name>.json).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    tasks: Annotated[list[str] | None, typer.Option(
        help="Task or group names (zh-default, en-default, quick, all); repeatable or comma-separated. "
             "Default: the config's eval.tasks, else zh-default, or only the task folders when given.")] = None,
    task_dir: Annotated[list[Path] | None, typer.Option(help="A drop-in task folder; repeatable "
                                                             "(replaces the config's eval.task_dirs).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Shortcut for --set batch_size=N: texts per "
                                                        "encoding batch.")] = None,
    max_pairs: Annotated[int | None, typer.Option(
        help="Shortcut for --set max_pairs=N: subsample STS / pair classification to this many pairs.")] = None,
    max_docs: Annotated[int | None, typer.Option(
        help="Shortcut for --set max_docs=N: subsample clustering / classification texts and retrieval "
             "corpora to this many.")] = None,
    max_queries: Annotated[int | None, typer.Option(
        help="Shortcut for --set max_queries=N: subsample retrieval / reranking queries.")] = None,
    seed: Annotated[int | None, typer.Option(help="Shortcut for --set seed=N: seed of the subsampling and of "
                                                  "mteb's evaluators.")] = None,
) -> None:
    """Score a model with mteb's evaluators; prints a markdown table and writes the JSON result.

    Settings: the `eval` section (`--config`, `--set key=value`); the shortcut options win over both."""
    import datasets

    from conan_core.eval.run import format_table, run_eval

    datasets.disable_progress_bars()  # mteb's per-task dataset maps would flood the terminal

    cfg = eval_section(config, set_, tasks=tasks, task_dir=task_dir, batch_size=batch_size, max_pairs=max_pairs,
                       max_docs=max_docs, max_queries=max_queries, seed=seed)
    output = output if output is not None else default_output(model)

    def progress(entry: dict) -> None:
        typer.echo(f"{entry['name']}: {entry['main_score_name']} = {100 * entry['main_score']:.2f} "
                   f"({entry['eval_seconds']:.0f} s)", err=True)

    result = run_eval(model, tasks=None, task_dirs=[], output=output, config=cfg, on_task=progress)
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
