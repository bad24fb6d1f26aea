"""`conan clean`, `conan extract` and `conan data sources`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from conan_cli.errors import one_line_errors
from conan_cli.main import app

data_app = typer.Typer(help="The shared data catalog.", no_args_is_help=True)
app.add_typer(data_app, name="data")

InputsOption = Annotated[list[str], typer.Option(
    "--input", help="A file, a BEIR dir, or group:<name> (see `conan data sources`); repeatable.")]
OutputOption = Annotated[Path, typer.Option("--output", help="Dataset dir to write.")]
WorkersOption = Annotated[int, typer.Option(help="Ray workers; 0 runs in this process without Ray.")]


def _summary(manifest: dict, output: Path) -> str:
    counts = manifest["counts"]
    reasons = ", ".join(f"{reason} {count}" for reason, count in counts["dropped_by_reason"].items())
    return (f"kept {counts['kept']}, dropped {counts['dropped']} ({reasons or 'none'}), "
            f"{len(manifest['shards'])} shard(s) in {output}")


@app.command("clean")
@one_line_errors
def clean(
    inputs: InputsOption,
    output: OutputOption,
    teacher: Annotated[str | None, typer.Option(help="Teacher model dir or name; enables the score filter.")] = None,
    min_score: Annotated[float, typer.Option(help="Drop pairs whose teacher cosine is below this.")] = 0.4,
    max_chars: Annotated[int, typer.Option(help="Longest side, characters.")] = 4096,
    max_tokens: Annotated[int, typer.Option(help="Longest side, tokens.")] = 1024,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer dir for token counts.")] = None,
    lang: Annotated[list[str] | None, typer.Option(help="Keep only this detected language; repeatable.")] = None,
    t2s: Annotated[bool, typer.Option(help="Traditional -> simplified Chinese.")] = False,
    minhash_threshold: Annotated[float, typer.Option(help="Near-duplicate Jaccard threshold.")] = 0.9,
    no_near_dedup: Annotated[bool, typer.Option(help="Skip MinHash near-duplicate removal.")] = False,
    no_decontaminate: Annotated[bool, typer.Option(help="Keep rows that share a text with an eval split.")] = False,
    workers: WorkersOption = 2,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Normalise, filter and deduplicate pairs into a sharded, checksummed dataset."""
    from conan_core.clean.config import CleanConfig
    from conan_core.clean.stage import run_clean

    config = CleanConfig(min_teacher_score=min_score, max_chars=max_chars, max_tokens=max_tokens,
                         tokenizer=tokenizer, langs=lang or None, traditional_to_simplified=t2s,
                         minhash_threshold=minhash_threshold, near_dedup=not no_near_dedup,
                         decontaminate=not no_decontaminate)
    manifest = run_clean([Path(i) if not i.startswith("group:") else i for i in inputs],  # type: ignore[misc]
                         output, config, teacher=teacher, workers=workers, progress=progress)
    typer.echo(_summary(manifest, output))


@app.command("extract")
@one_line_errors
def extract(
    inputs: InputsOption,
    output: OutputOption,
    context_turns: Annotated[int, typer.Option(help="Earlier turns prepended to each prompt.")] = 0,
    min_response_chars: Annotated[int, typer.Option(help="Shortest response kept.")] = 8,
    max_response_chars: Annotated[int, typer.Option(help="Longest response kept.")] = 4096,
    keep_refusals: Annotated[bool, typer.Option(help="Keep refusals and disclaimers.")] = False,
    workers: WorkersOption = 2,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Extract (prompt, response) pairs from LLM instruction / chat data."""
    from conan_core.clean.config import ExtractConfig
    from conan_core.extract import run_extract

    config = ExtractConfig(context_turns=context_turns, min_response_chars=min_response_chars,
                           max_response_chars=max_response_chars, drop_refusals=not keep_refusals)
    manifest = run_extract([Path(i) if not i.startswith("group:") else i for i in inputs],  # type: ignore[misc]
                           output, config, workers=workers, progress=progress)
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
