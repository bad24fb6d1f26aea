"""A Prefect API to talk to: the one `PREFECT_API_URL` names if it answers, else a local server we start.

`prefect server start` on a new SQLite database needs about 17 s before `/api/health` answers (measured
on this machine); a restart on an existing database about 6 s. One SIGTERM stops it. We start it in its own
process group, so stopping it also stops any child it spawned.

A server we start never outlives its run:
- it dies with the process that started it: on Linux it is started with PR_SET_PDEATHSIG=SIGTERM, so even a
  SIGKILL of `conan run` stops it (measured: its port closes within a second);
- in `prefect_api`, SIGTERM and SIGHUP unwind the run like Ctrl-C does (SystemExit): Prefect marks the flow
  run Crashed and the server is stopped on the way out;
- the run that owns a server holds an exclusive lock (`conan-server.lock`) on its PREFECT_HOME and names the
  server in `conan-server.json` (pid, start time, port). The next run there finds that file: a server still
  alive from a dead run is stopped; a live run that holds the lock makes the new run stop with an error
  rather than start a second server on the same SQLite file;
- after starting its server, `prefect_api` marks flow runs and task runs left Running/Pending in that
  database (by a dead run: no live one can use it, the lock says so) Crashed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from conan_core.errors import ConanError
from conan_core.paths import work_dir

PID_FILE = "conan-server.json"
LOCK_FILE = "conan-server.lock"

# Run between fork and the `prefect` exec: ask the kernel for SIGTERM when the parent dies (kept across
# exec), then exit at once if the parent already died before that.
_DIE_WITH_PARENT = ("import ctypes, os, sys\n"
                    "ctypes.CDLL(None, use_errno=True).prctl(1, 15, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGTERM\n"
                    "if os.getppid() != int(sys.argv[1]):\n"
                    "    sys.exit(0)\n"
                    "os.execv(sys.argv[2], sys.argv[2:])\n")


class PrefectServerError(ConanError):
    """The local Prefect server could not be started or did not become healthy."""


@dataclass
class PrefectServer:
    """An API URL, and the server process when we started it (None when we joined a running one)."""

    api_url: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    home: Path | None = None
    lock: IO[Any] | None = field(default=None, repr=False)

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


# ---- process identity: a pid plus its start time, so a reused pid is not taken for the server ----------

def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot) from /proc; None when it is gone, a zombie, or
    there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _is_alive(pid: int, start_ticks: int | None) -> bool:
    if Path("/proc/self/stat").exists():
        ticks = _start_ticks(pid)
        return ticks is not None and (start_ticks is None or ticks == start_ticks)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate(pid: int, start_ticks: int | None, timeout_s: float = 20.0) -> None:
    """SIGTERM the process (its whole group when it leads one), SIGKILL after `timeout_s`."""
    try:
        group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return
    kill = os.killpg if group else os.kill
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        if not _is_alive(pid, start_ticks):
            return
        with contextlib.suppress(ProcessLookupError):
            kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _is_alive(pid, start_ticks):
            time.sleep(0.1)


# ---- the pid file and the owner's lock ------------------------------------------------------------------

def read_pid_file(home: Path) -> dict[str, Any] | None:
    """What `conan-server.json` under `home` says (pid, start_ticks, port, api_url, owner_pid), or None."""
    try:
        record = json.loads((home / PID_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _write_pid_file(home: Path, process: subprocess.Popen, port: int, api_url: str) -> None:
    record = {"pid": process.pid, "start_ticks": _start_ticks(process.pid), "port": port, "api_url": api_url,
              "owner_pid": os.getpid(), "started_at": time.time()}
    tmp = home / f"{PID_FILE}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(home / PID_FILE)


def _remove_pid_file(home: Path, pid: int) -> None:
    record = read_pid_file(home)
    if record is not None and record["pid"] == pid:
        (home / PID_FILE).unlink(missing_ok=True)


def _take_ownership(home: Path) -> IO[Any]:
    """Lock `home` for this process (released by the kernel when it dies, however it dies)."""
    lock = open(home / LOCK_FILE, "a+")  # noqa: SIM115 - held for the server's lifetime
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        record = read_pid_file(home) or {}
        raise PrefectServerError(
            f"another conan run (pid {record.get('owner_pid', '?')}) runs a Prefect server on {home} "
            f"({record.get('api_url', 'starting')}); wait for it to finish, or share it with "
            f"PREFECT_API_URL={record.get('api_url', '<its URL>')}") from None
    return lock


def reap_stale_server(home: Path, *, echo: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Deal with a `conan-server.json` left by a dead run: stop the server it names if that is still alive,
    remove the file. Returns what the file said, or None when there was none. Call with the lock held."""
    record = read_pid_file(home)
    if record is None:
        (home / PID_FILE).unlink(missing_ok=True)
        return None
    pid, ticks = record["pid"], record.get("start_ticks")
    if ticks is not None and _is_alive(pid, ticks):  # without its start time, a live pid may be another process
        echo(f"stopping the Prefect server (pid {pid}, {record.get('api_url')}) left by a dead run "
             f"(pid {record.get('owner_pid')})")
        _terminate(pid, ticks)
    else:
        echo(f"found the pid file of a Prefect server (pid {pid}, no longer running) left by a dead run "
             f"(pid {record.get('owner_pid')})")
    (home / PID_FILE).unlink(missing_ok=True)
    return record


def start_server(home: Path, *, port: int | None = None, timeout_s: float = 120.0,
                 echo: Callable[[str], None] = print) -> PrefectServer:
    """Start `prefect server start --host 127.0.0.1` with PREFECT_HOME=`home`; wait until healthy.

    Takes `home`'s lock first (PrefectServerError when a live run holds it) and stops a server a dead run
    left there. On Linux the server gets SIGTERM when the thread that called this exits, so call it from
    the thread that lives as long as the server should (the main thread in `conan run`).
    """
    home.mkdir(parents=True, exist_ok=True)
    lock = _take_ownership(home)
    try:
        reap_stale_server(home, echo=echo)
        port = port or free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        # The UI must call this server's API, not the default port 4200 (it showed "Can't connect to Server
        # API" on any other port). Promotional banners: this Prefect's UI reads them from the browser's
        # localStorage (`prefect-show-promotional-content`), not from a server setting.
        env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_UI_API_URL=api_url)
        env.pop("PREFECT_API_URL", None)  # the server itself must not point at another API
        log_path = home / f"server-{port}.log"
        command = [*_prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                   "--analytics-off"]
        if sys.platform.startswith("linux"):
            command = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
    except BaseException:
        lock.close()
        raise
    server = PrefectServer(api_url=api_url, process=process, log_path=log_path, home=home, lock=lock)
    try:
        _write_pid_file(home, process, port, api_url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise PrefectServerError(f"prefect server exited with code {process.returncode}; see {log_path}")
            if api_is_healthy(api_url):
                return server
            time.sleep(0.5)
        raise PrefectServerError(f"prefect server not healthy after {timeout_s:.0f} s; see {log_path}")
    except BaseException:
        stop_server(server)
        raise


def stop_server(server: PrefectServer, timeout_s: float = 20.0) -> None:
    """Stop a server we started (SIGTERM to its process group, SIGKILL if it lingers), remove its pid file
    and release the lock. No-op for a server we joined."""
    process = server.process
    if process is None:
        return
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    if server.home is not None:
        _remove_pid_file(server.home, process.pid)
    if server.lock is not None:
        server.lock.close()
        server.lock = None


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
    return start_server(home, echo=echo)


_UNFINISHED = ("RUNNING", "PENDING")


def mark_abandoned_runs_crashed(api_url: str) -> tuple[int, int]:
    """Set every flow run and task run that is Running or Pending at `api_url` to Crashed; returns how
    many of each. Only for a server we just started on our own (locked) PREFECT_HOME: there, such runs
    were left by a run that died."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Crashed

    states = [StateType(name) for name in _UNFINISHED]
    flow_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states)))
    task_filter = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=states)))
    message = "The process running it died (found by the next run on this Prefect server)."
    seen: set[Any] = set()
    counts = [0, 0]
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for index, (read, set_state, kwargs) in enumerate((
                (client.read_flow_runs, client.set_flow_run_state, {"flow_run_filter": flow_filter}),
                (client.read_task_runs, client.set_task_run_state, {"task_run_filter": task_filter}))):
            while runs := [run for run in read(limit=200, **kwargs) if run.id not in seen]:
                for run in runs:
                    seen.add(run.id)
                    set_state(run.id, Crashed(message=message), force=True)
                counts[index] += len(runs)
    return counts[0], counts[1]


@contextlib.contextmanager
def _exit_on_termination() -> Iterator[None]:
    """In the main thread, SIGTERM and SIGHUP raise SystemExit (as Ctrl-C raises KeyboardInterrupt), so
    the blocks around a run unwind: Prefect marks the flow run Crashed, the server is stopped. A repeat
    signal during that unwinding is ignored (the server still dies with this process). Ray's `ray.init`
    puts its own SIGTERM handler in place for the rest of the run; it raises SystemExit too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    # Only where the signal would kill us anyway: an ignored SIGHUP (nohup) stays ignored.
    handled = [sig for sig in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(sig) == signal.SIG_DFL]

    def on_signal(signum: int, frame: Any) -> None:
        for sig in handled:
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def prefect_api(home: Path | None = None, *, echo=print) -> Iterator[PrefectServer]:
    """A reachable Prefect API for the duration of the block; `PREFECT_API_URL` is set inside it.

    Stops the server afterwards only if this block started it; also on SIGTERM/SIGHUP/Ctrl-C, and (Linux)
    when this process dies. A server it starts first gets the runs a dead run left Running marked Crashed.
    """
    with _exit_on_termination():
        server = connect_or_start(home, echo=echo)
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = server.api_url
        try:
            if server.started_here:
                try:
                    flows, tasks = mark_abandoned_runs_crashed(server.api_url)
                except Exception as err:  # a sweep that fails must not stop the run
                    echo(f"could not mark the runs a dead run left Running as Crashed: {err}")
                else:
                    if flows or tasks:
                        echo(f"marked {flows} flow run(s) and {tasks} task run(s) left Running by a dead run "
                             f"as Crashed")
            yield server
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
            if server.started_here:
                drain_prefect_clients()
            stop_server(server)
