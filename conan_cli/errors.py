"""Turn the library's expected errors into one-line messages and a non-zero exit."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from conan_core.errors import ConanError


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConanError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper
