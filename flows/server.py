"""A Prefect API to talk to: the one `PREFECT_API_URL` names if it answers, else a local server we start.

`prefect server start` on a new SQLite database needs about 17 s before `/api/health` answers (measured
on this machine); a restart on an existing database about 6 s. One SIGTERM stops it. We start it in its own
process group, so stopping it also stops the uvicorn/service children it spawned.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conan_core.errors import ConanError
from conan_core.paths import work_dir


class PrefectServerError(ConanError):
    """The local Prefect server could not be started or did not become healthy."""


@dataclass
class PrefectServer:
    """An API URL, and the server process when we started it (None when we joined a running one)."""

    api_url: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def started_here(self) -> bool:
        return self.process is not None


def api_is_healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    """True when `<api_url>/health` answers 200."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _prefect_executable() -> list[str]:
    # The `prefect` script next to this interpreter, so the server runs from the same venv.
    script = Path(sys.executable).parent / "prefect"
    return [str(script)] if script.exists() else [sys.executable, "-m", "prefect"]


def start_server(home: Path, *, port: int | None = None, timeout_s: float = 120.0) -> PrefectServer:
    """Start `prefect server start --host 127.0.0.1` with PREFECT_HOME=`home`; wait until healthy."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)  # the server itself must not point at another API
    log_path = home / f"server-{port}.log"
    command = [*_prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port),
               "--analytics-off"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = PrefectServer(api_url=api_url, process=process, log_path=log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PrefectServerError(f"prefect server exited with code {process.returncode}; see {log_path}")
        if api_is_healthy(api_url):
            return server
        time.sleep(0.5)
    stop_server(server)
    raise PrefectServerError(f"prefect server not healthy after {timeout_s:.0f} s; see {log_path}")


def stop_server(server: PrefectServer, timeout_s: float = 20.0) -> None:
    """Stop a server we started (SIGTERM to its process group, SIGKILL if it lingers). No-op otherwise."""
    process = server.process
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def drain_prefect_clients(timeout_s: float = 10.0) -> None:
    """Send the logs and events this process still holds, so nothing retries against a stopped server.

    Without it, the process spends over a minute at exit retrying log uploads (measured here).
    """
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout_s)


def connect_or_start(home: Path | None = None, *, echo=print) -> PrefectServer:
    """Use `PREFECT_API_URL` when it answers; otherwise start a local server under `home`."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured and api_is_healthy(configured):
        return PrefectServer(api_url=configured)
    if configured:
        echo(f"PREFECT_API_URL={configured} does not answer; starting a local Prefect server instead")
    home = home or Path(os.environ.get("PREFECT_HOME", work_dir() / "prefect_home"))
    echo("starting a local Prefect server (about 17 s on a new database) ...")
    return start_server(home)


@contextlib.contextmanager
def prefect_api(home: Path | None = None, *, echo=print) -> Iterator[PrefectServer]:
    """A reachable Prefect API for the duration of the block; `PREFECT_API_URL` is set inside it.

    Stops the server afterwards only if this block started it.
    """
    server = connect_or_start(home, echo=echo)
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield server
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        if server.started_here:
            drain_prefect_clients()
        stop_server(server)
