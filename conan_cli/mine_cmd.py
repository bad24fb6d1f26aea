"""`conan mine`: initial hard-negative mining with the Ray actor pool."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from conan_cli.config_opts import ConfigOpt, SetOpt, build_section
from conan_cli.errors import one_line_errors
from conan_cli.main import app


def mining_section(config: Path | None = None, sets: list[str] | None = None, *, workers: int | None = None,
                   top_k: int | None = None, margin: float | None = None, no_margin: bool = False,
                   index: str | None = None, shard_rows: int | None = None, skip_ranks: int | None = None) -> Any:
    """`conan mine`'s MiningConfig: the `mining` section of `config`, `--set`, then the shortcuts given."""
    from conan_core.mining.config import MiningConfig

    shortcuts: dict[str, Any] = {"workers": workers, "top_k": top_k, "margin": margin, "index": index,
                                 "shard_rows": shard_rows, "skip_ranks": skip_ranks}
    overrides = list(sets or []) + (["margin=null"] if no_margin else [])
    return build_section(MiningConfig, "mining", config, overrides, **shortcuts)


@app.command("mine")
@one_line_errors
def mine(
    model: Annotated[Path, typer.Option(help="Model dir (sentence-transformers format) that mines.")],
    data: Annotated[Path, typer.Option(help="Dataset dir whose query records get candidate lists.")],
    out: Annotated[Path, typer.Option(help="Candidates dir to write (with the corpus under out/corpus).")],
    corpus: Annotated[Path | None, typer.Option(help="Dataset dir to take the corpus from (default: --data).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workers: Annotated[int | None, typer.Option(help="Shortcut for --set workers=N: mining actors "
                                                     "(default: one per shard, <= CPUs).")] = None,
    top_k: Annotated[int | None, typer.Option(help="Shortcut for --set top_k=N: candidates kept per query, "
                                                   "after the guards.")] = None,
    margin: Annotated[float | None, typer.Option(
        help="Shortcut for --set margin=X: keep a candidate only below positive score * margin.")] = None,
    no_margin: Annotated[bool, typer.Option("--no-margin", help="Turn the positive-aware guard off "
                                                                "(--set margin=null).")] = False,
    index: Annotated[str | None, typer.Option(help="Shortcut for --set index=flat|ivf.")] = None,
    shard_rows: Annotated[int | None, typer.Option(help="Shortcut for --set shard_rows=N: corpus documents "
                                                        "per shard.")] = None,
    skip_ranks: Annotated[int | None, typer.Option(help="Shortcut for --set skip_ranks=N: DHNM windows start "
                                                        "at this rank.")] = None,
) -> None:
    """Mine ranked candidate lists for every query of a dataset (initial DHNM candidates).

    Settings: the `mining` section (`--config`, `--set key=value`); the shortcut options win over both."""
    from conan_core.mining.run import run_mine

    cfg = mining_section(config, set_, workers=workers, top_k=top_k, margin=margin, no_margin=no_margin,
                         index=index, shard_rows=shard_rows, skip_ranks=skip_ranks)
    manifest = run_mine(model, data, out, cfg, corpus_dir=corpus)
    typer.echo(json.dumps(manifest["counts"]))
    typer.echo(f"candidates written to {out} (mined by {manifest['config']['mined_by']['fingerprint']})")
