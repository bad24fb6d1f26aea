"""Turn expected errors into one-line messages and a non-zero exit.

Expected errors are the library's ConanError (a bad path, a malformed input, a config that does not
validate) and OSError (the file system said no: a file that cannot be read, an output that cannot be
written, a disk that is full). Each prints `error: <one line>` on stderr and exits with code 2. Any
other exception is a bug and keeps its traceback. CONAN_TRACEBACK=1 keeps the traceback for the
expected errors too.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import typer

from conan_core.errors import ConanError


def os_error_line(err: OSError) -> str:
    """`path: reason` of an OSError (`path -> other: reason` for a rename), on one line."""
    reason = err.strerror or (str(err).strip().splitlines() or [type(err).__name__])[0]
    if err.filename is None:
        return reason
    target = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else f"{err.filename}"
    return f"{target}: {reason}"


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConanError, OSError) as err:
            if os.environ.get("CONAN_TRACEBACK"):
                raise
            typer.echo(f"error: {err if isinstance(err, ConanError) else os_error_line(err)}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper
