"""`conan server start|status|stop`: a local Prefect server (API and UI) that outlives a run.

It lives in PREFECT_HOME (default `<work dir>/prefect_home`, the database `conan run` uses), listens on
127.0.0.1 only, and `conan run` uses it instead of starting a server of its own.

Exit codes: `start` 0 when the server answers (started now, or already running there); `status` 0 when
a server answers on this PREFECT_HOME, 1 when none does; `stop` 0 when none runs afterwards (stopped now,
or there was none: says so). Errors (a port in use, a server that belongs to a live `conan run`, one that
does not become healthy) print one `error:` line and exit 2, as every conan command does.
"""

from __future__ import annotations

from typing import Annotated

import typer

from conan_cli.errors import one_line_errors
from conan_cli.main import app

server_app = typer.Typer(help="A local Prefect server and UI that outlives a run (`conan run` uses it).",
                         no_args_is_help=True)
app.add_typer(server_app, name="server")


@server_app.command("start")
@one_line_errors
def start(
    port: Annotated[int | None, typer.Option(help="Port on 127.0.0.1 [default: 4200].")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait until the server answers.")] = 120.0,
) -> None:
    """Start the server in the background on PREFECT_HOME, wait until it answers, print the UI URL."""
    from flows.server import default_home, start_kept_server, ui_url

    home = default_home()
    record, started = start_kept_server(home, port=port, timeout_s=timeout, echo=typer.echo)
    state = "started" if started else "already running"
    typer.echo(f"Prefect server {state} (pid {record['pid']}, PREFECT_HOME {home}, log {record.get('log')})")
    typer.echo(f"UI:  {ui_url(record['api_url'])}")
    typer.echo(f"API: {record['api_url']}  (`conan run` uses it; `conan server stop` stops it)")


@server_app.command("status")
@one_line_errors
def status() -> None:
    """Say whether a server answers on PREFECT_HOME, and where its UI is; exit 1 when none does."""
    from flows.server import default_home, server_status

    current = server_status(default_home())
    typer.echo(current.describe())
    if not current.running:
        raise typer.Exit(code=1)


@server_app.command("stop")
@one_line_errors
def stop(
    timeout: Annotated[float, typer.Option(help="Seconds between SIGTERM and SIGKILL.")] = 20.0,
) -> None:
    """Stop the server `conan server start` started on PREFECT_HOME (none running: says so, exit 0)."""
    from flows.server import default_home, stop_kept_server

    typer.echo(stop_kept_server(default_home(), timeout_s=timeout))
