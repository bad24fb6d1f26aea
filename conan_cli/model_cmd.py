"""`conan model init`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from conan_cli.errors import one_line_errors
from conan_cli.main import app

model_app = typer.Typer(help="Create and inspect embedding models.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("init")
@one_line_errors
def init(
    out: Annotated[Path, typer.Option(help="Model directory to write (sentence-transformers format).")],
    base: Annotated[str, typer.Option(help="'all-MiniLM-L6-v2' (shipped) or a local model dir.")] = "all-MiniLM-L6-v2",
    expand_dim: Annotated[int | None, typer.Option(help="Add a linear expansion layer to this dim.")] = None,
    pooling: Annotated[str, typer.Option(help="mean or cls.")] = "mean",
    extend_vocab_from: Annotated[list[Path] | None, typer.Option(
        help="Text files (or dirs) whose [UNK] characters join the vocabulary; repeatable.")] = None,
    matryoshka_dim: Annotated[list[int] | None, typer.Option(help="A Matryoshka output dim; repeatable.")] = None,
    max_seq_length: Annotated[int, typer.Option(help="Tokens per text.")] = 128,
    vocab_min_freq: Annotated[int, typer.Option(help="Add characters seen at least this often.")] = 1,
    vocab_init: Annotated[str, typer.Option(
        help="Where new embedding rows start: mean (of the old rows), cjk_mean, or unk; + N(0, 0.02^2).")] = "mean",
) -> None:
    """Write a new model directory from a base encoder."""
    from conan_core.errors import ConanError
    from conan_core.model_init import init_model

    if pooling not in ("mean", "cls"):
        raise ConanError(f"--pooling must be mean or cls, not {pooling!r}")
    if vocab_init not in ("mean", "cjk_mean", "unk"):
        raise ConanError(f"--vocab-init must be mean, cjk_mean or unk, not {vocab_init!r}")
    report = init_model(base, out, expand_dim=expand_dim, pooling=pooling,  # type: ignore[arg-type]
                        extend_vocab_from=extend_vocab_from or [], matryoshka_dims=matryoshka_dim,
                        max_seq_length=max_seq_length, vocab_min_freq=vocab_min_freq,
                        vocab_init=vocab_init)  # type: ignore[arg-type]
    vocab = report.get("vocab")
    if vocab:
        typer.echo(f"[UNK] rate {vocab['unk_rate_before']:.2%} -> {vocab['unk_rate_after']:.2%} "
                   f"({vocab['added_tokens']} tokens added, vocab {vocab['vocab_size_before']} -> "
                   f"{vocab['vocab_size_after']})")
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "vocab"}))
    typer.echo(f"model written to {out}")
