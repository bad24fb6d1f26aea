"""From a validated PipelineConfig to each stage task's parameters (JSON-able: they are shown in the UI and
hashed into the cache key). The only place that knows both the config's layout and the tasks' signatures.

`preflight(config)` checks every path and name the config refers to, in seconds and before anything starts;
it imports neither Prefect nor Ray (`conan run` calls it before choosing a Prefect API), so the task
modules are imported inside `plan_stages`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conan_core.errors import ConanError
from conan_core.io.catalog import resolve_inputs
from conan_core.paths import shared_data_dir


class PreflightError(ConanError):
    """A path or name in the pipeline config that does not resolve (found before any stage runs)."""


@dataclass
class StagePlan:
    """Keyword arguments per stage, minus the upstream results the flow adds; `comparison` is where the flow
    writes the start-vs-final evaluation comparison (markdown)."""

    clean_pretrain: dict[str, Any]
    clean_finetune: dict[str, Any]
    extract: dict[str, Any]
    init_model: dict[str, Any]
    mine: dict[str, Any]
    pretrain: dict[str, Any]
    finetune: dict[str, Any]
    evaluate: dict[str, Any]
    evaluate_start: dict[str, Any]
    comparison: Path


SHARED_PREFIX = "shared:"


def resolve_input(item: str | Path) -> str:
    """A config input as the stages take it: `shared:<path>` is a file of the shared data dir
    (CONAN_DATA_DIR, so configs do not hard-code where the data lives), `group:<name>` a catalog group,
    anything else a path."""
    text = str(item)
    if text.startswith(SHARED_PREFIX):
        return str(shared_data_dir() / text.removeprefix(SHARED_PREFIX))
    return text


def input_files(inputs: list[str]) -> list[Path]:
    """The raw files behind a stage's inputs (`group:<name>` expands through the data catalog)."""
    return sorted({path for path, _spec in resolve_inputs([resolve_input(i) for i in inputs])})


def preflight(config: Any) -> None:
    """Every input file the data stages and the vocabulary extension read (`shared:` and `group:` entries
    resolved), the base model (a path or the shipped all-MiniLM-L6-v2, with readable files), the eval task
    names and groups, their data, and the eval task folders. PreflightError (one line, naming the config
    key and the bad value) at the first that does not resolve."""
    data, model = config.data, config.model
    for key, items in (("data.pretrain", data.pretrain), ("data.finetune", data.finetune),
                       ("data.instruct", data.instruct), ("model.extend_vocab_from", model.extend_vocab_from)):
        for item in items:
            _check_input(key, item)
    _check_base(str(model.base))
    _check_eval(config.eval)


def _check_input(key: str, item: str) -> None:
    resolved = resolve_input(item)
    shown = f"{item!r}" + (f" ({resolved})" if resolved != str(item) else "")
    if not resolved.startswith("group:"):
        path = Path(resolved.partition("#")[0])
        if not path.exists():
            raise PreflightError(f"{key}: input {shown} not found")
    try:
        entries = resolve_inputs([resolved])
    except ConanError as err:  # an unknown group, a file of unknown format
        raise PreflightError(f"{key}: {item!r}: {err}") from None
    for path, _spec in entries:
        if not path.exists():
            raise PreflightError(f"{key}: {item!r}: input file {path} not found")


def _check_base(base: str) -> None:
    from conan_core.model import resolve_base
    from conan_core.train.preflight import check_model_files

    try:
        check_model_files(resolve_base(base))
    except ConanError as err:
        raise PreflightError(f"model.base: {base!r}: {err}") from None


def _check_eval(eval_config: Any) -> None:
    from conan_core.eval.run import resolve_specs
    from conan_core.eval.spec import UnknownTaskError
    from conan_core.eval.tasks import builtin_tasks, resolve_task_names

    try:  # names first: cheap (a task folder's check imports mteb, seconds)
        resolve_task_names(eval_config.tasks or [])
    except UnknownTaskError as err:
        raise PreflightError(f"eval.tasks: {err}") from None
    for folder in eval_config.task_dirs:
        if not Path(folder).is_dir():
            raise PreflightError(f"eval.task_dirs: {str(folder)!r}: task folder not found")
    try:
        specs = resolve_specs(eval_config.tasks, [Path(d) for d in eval_config.task_dirs])
    except UnknownTaskError as err:
        raise PreflightError(f"eval.tasks: {err}") from None
    except ConanError as err:  # a task folder's task.json or data files
        raise PreflightError(f"eval.task_dirs: {err}") from None
    builtin = builtin_tasks()
    for spec in specs:
        if spec.name in builtin and not Path(spec.source).exists():
            raise PreflightError(f"eval.tasks: data of task {spec.name!r} not found: {spec.source}")


def _data_stage(name: str, inputs: list[str], output: Path, config: Any, workers: int) -> dict[str, Any]:
    from tasks.cache import fingerprint_paths

    inputs = [resolve_input(item) for item in inputs]
    return {"name": name, "inputs": inputs, "inputs_fingerprint": fingerprint_paths(input_files(inputs)),
            "output": str(output), "config": config.model_dump(mode="json"), "workers": workers}


def _base_fingerprint(base: str) -> str:
    """The base model's content hash; a named base resolves to its shipped dir."""
    from conan_core.model import resolve_base
    from tasks.cache import fingerprint_path

    return fingerprint_path(resolve_base(base))


def plan_stages(config: Any, root: Path) -> StagePlan:
    """Parameters of every stage for `config`, with outputs under `root`. Where Ray runs is not among them:
    the flow connects Ray before the stages, and the same inputs give the same outputs on any cluster."""
    from tasks.cache import fingerprint_paths
    from tasks.evaluate import task_dirs_fingerprint

    data, model = config.data, config.model
    clean_pretrain = _data_stage("pretrain", data.pretrain, root / "data" / "pretrain", config.clean,
                                 data.workers)
    clean_finetune = _data_stage("finetune", data.finetune, root / "data" / "finetune", config.clean,
                                 data.workers)
    extract = _data_stage("instruct", data.instruct, root / "data" / "llm_pairs", config.extract, data.workers)
    vocab_files = [str(p) for p in input_files(model.extend_vocab_from)] if model.extend_vocab_from else []
    init_options = {"pooling": model.pooling, "expand_dim": model.expand_dim,
                    "matryoshka_dims": model.matryoshka_dims, "max_seq_length": model.max_seq_length,
                    "vocab_min_freq": model.vocab_min_freq, "vocab_max_new": model.vocab_max_new,
                    "vocab_init": model.vocab_init}
    init = {"base": str(model.base), "base_fingerprint": _base_fingerprint(str(model.base)),
            "output": str(root / "models" / "init"), "options": init_options, "vocab_texts": vocab_files,
            "vocab_fingerprint": fingerprint_paths(vocab_files)}
    mining = config.mining.model_dump(mode="json")
    workers = config.workers
    # The final and the untrained start model are scored with the same eval config, each into its own
    # folder under eval/ (a stage's output dir is fingerprinted whole, so neither may hold the other's).
    evaluate = {"config": config.eval.model_dump(mode="json"),
                "task_dirs_hash": task_dirs_fingerprint([str(d) for d in config.eval.task_dirs])}
    return StagePlan(
        clean_pretrain=clean_pretrain, clean_finetune=clean_finetune, extract=extract, init_model=init,
        mine={"output": str(root / "candidates"), "config": mining},  # pool size: mining.workers
        pretrain={"output": str(root / "pretrain"), "config": config.pretrain.model_dump(mode="json"),
                  "workers": workers},
        finetune={"output": str(root / "finetune"), "config": config.finetune.model_dump(mode="json"),
                  "mining": mining, "workers": workers},
        evaluate={**evaluate, "output_dir": str(root / "eval" / "final")},
        evaluate_start={**evaluate, "output_dir": str(root / "eval" / "start"), "stage": "evaluate-start"},
        comparison=root / "eval" / "comparison.md",
    )
