"""`conan clean`, `conan extract` and `conan data sources`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from conan_cli.config_opts import ConfigOpt, SetOpt, build_section
from conan_cli.errors import one_line_errors
from conan_cli.main import app

data_app = typer.Typer(help="The shared data catalog.", no_args_is_help=True)
app.add_typer(data_app, name="data")

InputsOption = Annotated[list[str], typer.Option(
    "--input", help="A file, a BEIR dir, or group:<name> (see `conan data sources`); repeatable.")]
OutputOption = Annotated[Path, typer.Option("--output", help="Dataset dir to write.")]
WorkersOption = Annotated[int | None, typer.Option(
    help="Workers: local processes, or Ray tasks when Ray runs or RAY_ADDRESS is set; 0 runs in this process, "
         "as do inputs too small for workers to pay (default: the config's data.workers, 2).")]
ProgressOption = Annotated[bool, typer.Option(help="Show a progress bar.")]


def _summary(manifest: dict, output: Path) -> str:
    counts = manifest["counts"]
    reasons = ", ".join(f"{reason} {count}" for reason, count in counts["dropped_by_reason"].items())
    return (f"kept {counts['kept']}, dropped {counts['dropped']} ({reasons or 'none'}), "
            f"{len(manifest['shards'])} shard(s) in {output}")


def _inputs(inputs: list[str]) -> list:
    return [Path(i) if not i.startswith("group:") else i for i in inputs]


def data_workers(config: Path | None, workers: int | None) -> int:
    """`--workers`, else the pipeline config's `data.workers` (its default when `config` holds one section)."""
    from conan_core.config import DataConfig, load_sibling

    return workers if workers is not None else load_sibling(DataConfig, "data", config).workers


def clean_section(config: Path | None = None, sets: list[str] | None = None, *, min_score: float | None = None,
                  max_chars: int | None = None, max_tokens: int | None = None, tokenizer: str | None = None,
                  lang: list[str] | None = None, t2s: bool | None = None, minhash_threshold: float | None = None,
                  no_near_dedup: bool = False, no_decontaminate: bool = False) -> Any:
    """`conan clean`'s CleanConfig: the `clean` section of `config`, `--set`, then the shortcuts given."""
    from conan_core.clean.config import CleanConfig

    return build_section(CleanConfig, "clean", config, sets, min_teacher_score=min_score, max_chars=max_chars,
                         max_tokens=max_tokens, tokenizer=tokenizer, langs=lang or None,
                         traditional_to_simplified=t2s, minhash_threshold=minhash_threshold,
                         near_dedup=False if no_near_dedup else None,
                         decontaminate=False if no_decontaminate else None)


def extract_section(config: Path | None = None, sets: list[str] | None = None, *,
                    context_turns: int | None = None, min_response_chars: int | None = None,
                    max_response_chars: int | None = None, keep_refusals: bool = False) -> Any:
    """`conan extract`'s ExtractConfig: the `extract` section of `config`, `--set`, then the shortcuts given."""
    from conan_core.clean.config import ExtractConfig

    return build_section(ExtractConfig, "extract", config, sets, context_turns=context_turns,
                         min_response_chars=min_response_chars, max_response_chars=max_response_chars,
                         drop_refusals=False if keep_refusals else None)


@app.command("clean")
@one_line_errors
def clean(
    inputs: InputsOption,
    output: OutputOption,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher model dir or name; enables the score filter.")] = None,
    min_score: Annotated[float | None, typer.Option(
        help="Shortcut for --set min_teacher_score=X: drop pairs whose teacher cosine is below this.")] = None,
    max_chars: Annotated[int | None, typer.Option(help="Shortcut for --set max_chars=N: longest side, "
                                                       "characters.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Shortcut for --set max_tokens=N: longest side, "
                                                        "tokens.")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Shortcut for --set tokenizer=DIR: tokenizer for token "
                                                       "counts.")] = None,
    lang: Annotated[list[str] | None, typer.Option(help="Keep only this detected language; repeatable "
                                                        "(--set langs=[zh, en]).")] = None,
    t2s: Annotated[bool | None, typer.Option("--t2s/--no-t2s", help="Traditional -> simplified Chinese "
                                                                    "(--set traditional_to_simplified=true).")] = None,
    minhash_threshold: Annotated[float | None, typer.Option(
        help="Shortcut for --set minhash_threshold=X: near-duplicate Jaccard threshold.")] = None,
    no_near_dedup: Annotated[bool, typer.Option(help="Skip MinHash near-duplicate removal "
                                                     "(--set near_dedup=false).")] = False,
    no_decontaminate: Annotated[bool, typer.Option(help="Keep rows that share a text with an eval split "
                                                        "(--set decontaminate=false).")] = False,
    workers: WorkersOption = None,
    progress: ProgressOption = True,
) -> None:
    """Normalise, filter and deduplicate pairs into a sharded, checksummed dataset.

    Settings: the `clean` section (`--config`, `--set key=value`); the shortcut options win over both."""
    from conan_core.clean.stage import run_clean

    cfg = clean_section(config, set_, min_score=min_score, max_chars=max_chars, max_tokens=max_tokens,
                        tokenizer=tokenizer, lang=lang, t2s=t2s, minhash_threshold=minhash_threshold,
                        no_near_dedup=no_near_dedup, no_decontaminate=no_decontaminate)
    manifest = run_clean(_inputs(inputs), output, cfg, teacher=teacher, workers=data_workers(config, workers),
                         progress=progress)
    typer.echo(_summary(manifest, output))


@app.command("extract")
@one_line_errors
def extract(
    inputs: InputsOption,
    output: OutputOption,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    context_turns: Annotated[int | None, typer.Option(
        help="Shortcut for --set context_turns=N: earlier turns prepended to each prompt.")] = None,
    min_response_chars: Annotated[int | None, typer.Option(
        help="Shortcut for --set min_response_chars=N: shortest response kept.")] = None,
    max_response_chars: Annotated[int | None, typer.Option(
        help="Shortcut for --set max_response_chars=N: longest response kept.")] = None,
    keep_refusals: Annotated[bool, typer.Option(help="Keep refusals and disclaimers "
                                                     "(--set drop_refusals=false).")] = False,
    workers: WorkersOption = None,
    progress: ProgressOption = True,
) -> None:
    """Extract (prompt, response) pairs from LLM instruction / chat data.

    Settings: the `extract` section (`--config`, `--set key=value`, e.g. `clean.max_chars=8192`); the
    shortcut options win over both."""
    from conan_core.extract import run_extract

    cfg = extract_section(config, set_, context_turns=context_turns, min_response_chars=min_response_chars,
                          max_response_chars=max_response_chars, keep_refusals=keep_refusals)
    manifest = run_extract(_inputs(inputs), output, cfg, workers=data_workers(config, workers), progress=progress)
    typer.echo(_summary(manifest, output))


@data_app.command("sources")
@one_line_errors
def sources(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the catalogued files of the shared data with their group, reader, kind, source and language."""
    from conan_core.io.catalog import catalog_table

    rows = catalog_table()
    if as_json:
        typer.echo(json.dumps(rows, ensure_ascii=False, indent=1))
        return
    for row in rows:
        typer.echo(f"{row['groups'] or '-':<22} {row['format']:<14} {row['kind']:<15} {row['lang']:<3} "
                   f"{row['source']:<24} {row['path']}")
