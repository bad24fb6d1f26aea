"""`conan mine`: initial hard-negative mining with the Ray actor pool."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from conan_cli.errors import one_line_errors
from conan_cli.main import app


@app.command("mine")
@one_line_errors
def mine(
    model: Annotated[Path, typer.Option(help="Model dir (sentence-transformers format) that mines.")],
    data: Annotated[Path, typer.Option(help="Dataset dir whose query records get candidate lists.")],
    out: Annotated[Path, typer.Option(help="Candidates dir to write (with the corpus under out/corpus).")],
    corpus: Annotated[Path | None, typer.Option(help="Dataset dir to take the corpus from (default: --data).")] = None,
    workers: Annotated[int | None, typer.Option(help="Mining actors (default: one per shard, <= CPUs).")] = None,
    top_k: Annotated[int, typer.Option(help="Candidates kept per query, after the guards.")] = 100,
    margin: Annotated[float | None, typer.Option(
        help="Keep a candidate only below positive score * margin (default: the config's, 0.95).")] = None,
    no_margin: Annotated[bool, typer.Option("--no-margin", help="Turn the positive-aware guard off.")] = False,
    index: Annotated[str, typer.Option(help="flat (exact) or ivf.")] = "flat",
    shard_rows: Annotated[int, typer.Option(help="Corpus documents per shard.")] = 20_000,
    skip_ranks: Annotated[int, typer.Option(help="DHNM windows start at this rank.")] = 10,
) -> None:
    """Mine ranked candidate lists for every query of a dataset (initial DHNM candidates)."""
    from pydantic import ValidationError

    from conan_core.errors import ConanError
    from conan_core.mining.config import MiningConfig
    from conan_core.mining.run import run_mine

    guard = {"margin": None} if no_margin else ({"margin": margin} if margin is not None else {})
    try:
        config = MiningConfig(top_k=top_k, index=index, shard_rows=shard_rows,  # type: ignore[arg-type]
                              skip_ranks=skip_ranks, workers=workers, **guard)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConanError(f"--{'-'.join(map(str, first['loc'])).replace('_', '-')}: {first['msg']}") from None
    manifest = run_mine(model, data, out, config, corpus_dir=corpus, workers=workers)
    typer.echo(json.dumps(manifest["counts"]))
    typer.echo(f"candidates written to {out} (mined by {manifest['config']['mined_by']['fingerprint']})")
