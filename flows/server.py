"""A Prefect API to talk to: the one `PREFECT_API_URL` names if it answers, else the server `conan server
start` keeps on this PREFECT_HOME, else a local server we start for the run.

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

A kept server (`conan server start`, `start_kept_server`) outlives the command that started it:
- it is started without PDEATHSIG, in its own session (no terminal's SIGHUP reaches it), output to
  `server-<port>.log`;
- it holds the same lock itself: the lock file's descriptor is handed to it, so the lock lasts as long as
  the server does, and no run starts a second server on its database meanwhile;
- its `conan-server.json` says `"kept": true`; `conan run` finds it there and uses it (starts none);
- `stop_kept_server` sends SIGTERM to its process group, waits, then SIGKILL, and removes the pid file.
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
DEFAULT_PORT = 4200
KEEP_HINT = "`conan server start` keeps one running for the UI after a run (`conan run` then uses it)"

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

def _stat_fields(path: Path) -> list[str] | None:
    """The fields of a /proc `stat` file after the command name (state first), or None when it is gone."""
    try:
        stat = path.read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _exited(pid: int, state: str) -> bool:
    """A process has exited when it is a zombie and so is every thread of it: the main thread of a process
    that is exiting shows Z while its other threads still run (and still hold its files, locks included)."""
    if state not in ("Z", "X"):
        return False
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return True
    return all((fields := _stat_fields(task / "stat")) is None or fields[0] in ("Z", "X") for task in tasks)


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot) from /proc; None when it is gone, has exited (a
    zombie), or there is no /proc."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return None if fields is None or _exited(pid, fields[0]) else int(fields[19])


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


def _group_alive(pgid: int) -> bool:
    """True while a live process (not a zombie) is left in process group `pgid`."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields is not None and int(fields[2]) == pgid and not _exited(int(stat.parent.name), fields[0]):
            return True
    return False


def _wait_until(done: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _terminate(pid: int, start_ticks: int | None, timeout_s: float = 20.0) -> None:
    """SIGTERM the process (its whole group when it leads one), SIGKILL after `timeout_s`; when it led a
    group, also wait for the rest of the group to go (SIGKILL to what is left after 5 s)."""
    try:
        group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return
    kill = os.killpg if group else os.kill

    def gone() -> bool:
        return not _is_alive(pid, start_ticks)

    signalled = False  # only a group we signalled is ours to wait for (the pid may name another one now)
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        if gone():
            break
        with contextlib.suppress(ProcessLookupError):
            kill(pid, sig)
        signalled = True
        _wait_until(gone, wait_s)
    if group and signalled and gone() and not _wait_until(lambda: not _group_alive(pid), 5.0):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        _wait_until(lambda: not _group_alive(pid), 5.0)


# ---- the pid file and the owner's lock ------------------------------------------------------------------

def read_pid_file(home: Path) -> dict[str, Any] | None:
    """What `conan-server.json` under `home` says (pid, start_ticks, port, api_url, owner_pid), or None."""
    try:
        record = json.loads((home / PID_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _write_pid_file(home: Path, process: subprocess.Popen, port: int, api_url: str, *,
                    kept: bool = False) -> dict[str, Any]:
    """Name the server in `conan-server.json`; `kept`: started by `conan server start` (it owns itself)."""
    record = {"pid": process.pid, "start_ticks": _start_ticks(process.pid), "port": port, "api_url": api_url,
              "owner_pid": process.pid if kept else os.getpid(), "started_at": time.time(), "kept": kept,
              "log": str(home / f"server-{port}.log")}
    tmp = home / f"{PID_FILE}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(home / PID_FILE)
    return record


def _remove_pid_file(home: Path, pid: int) -> None:
    record = read_pid_file(home)
    if record is not None and record["pid"] == pid:
        (home / PID_FILE).unlink(missing_ok=True)


def _try_lock(home: Path) -> IO[Any] | None:
    """`home`'s lock for this process, or None when another process holds it. The kernel releases it when
    every holder of the descriptor is gone, however they die."""
    lock = open(home / LOCK_FILE, "a+")  # noqa: SIM115 - held for the server's lifetime
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def _wait_for_lock(home: Path, timeout_s: float) -> IO[Any] | None:
    deadline = time.monotonic() + timeout_s
    while (lock := _try_lock(home)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return lock


def _take_ownership(home: Path) -> IO[Any]:
    """Lock `home` for this process (released by the kernel when it dies, however it dies)."""
    lock = _try_lock(home)
    if lock is not None:
        return lock
    record = read_pid_file(home) or {}
    if record.get("kept"):
        raise PrefectServerError(
            f"the Prefect server `conan server start` keeps on {home} (pid {record['pid']}, {record['api_url']}) "
            f"does not answer; see {record.get('log')}, or stop it with `conan server stop`")
    raise PrefectServerError(
        f"another conan run (pid {record.get('owner_pid', '?')}) runs a Prefect server on {home} "
        f"({record.get('api_url', 'starting')}); wait for it to finish, or share it with "
        f"PREFECT_API_URL={record.get('api_url', '<its URL>')}")


def reap_stale_server(home: Path, *, echo: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Deal with a `conan-server.json` left by a dead run: stop the server it names if that is still alive,
    remove the file. Returns what the file said, or None when there was none. Call with the lock held."""
    record = read_pid_file(home)
    if record is None:
        (home / PID_FILE).unlink(missing_ok=True)
        return None
    pid, ticks = record["pid"], record.get("start_ticks")
    left_by = "`conan server start`" if record.get("kept") else f"a dead run (pid {record.get('owner_pid')})"
    if ticks is not None and _is_alive(pid, ticks):  # without its start time, a live pid may be another process
        echo(f"stopping the Prefect server (pid {pid}, {record.get('api_url')}) left by {left_by}")
        _terminate(pid, ticks)
    else:
        echo(f"found the pid file of a Prefect server (pid {pid}, no longer running) left by {left_by}")
    (home / PID_FILE).unlink(missing_ok=True)
    return record


def _server_env(home: Path, api_url: str) -> dict[str, str]:
    # The UI must call this server's API, not the default port 4200 (it showed "Can't connect to Server
    # API" on any other port). Promotions ("Ready to scale? Upgrade" in the sidebar and on the dashboard):
    # both UIs read this setting from the server's /admin/settings (V1 then caches it in localStorage).
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_API_URL=api_url, PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false")
    env.pop("PREFECT_API_URL", None)  # the server itself must not point at another API
    return env


def _launch(home: Path, port: int, *, die_with_parent: bool,
            pass_fds: tuple[int, ...] = ()) -> tuple[subprocess.Popen, str, Path]:
    """`prefect server start --host 127.0.0.1 --port <port>` in its own session, output to
    `<home>/server-<port>.log`; returns the process, its API URL and the log's path."""
    api_url = f"http://127.0.0.1:{port}/api"
    log_path = home / f"server-{port}.log"
    command = [*_prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port),
               "--analytics-off"]
    if die_with_parent and sys.platform.startswith("linux"):
        command = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=_server_env(home, api_url), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=pass_fds)
    return process, api_url, log_path


def _wait_healthy(process: subprocess.Popen, api_url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PrefectServerError(f"prefect server exited with code {process.returncode}; see {log_path}")
        if api_is_healthy(api_url):
            return
        time.sleep(0.5)
    raise PrefectServerError(f"prefect server not healthy after {timeout_s:.0f} s; see {log_path}")


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
        process, api_url, log_path = _launch(home, port, die_with_parent=True)
    except BaseException:
        lock.close()
        raise
    server = PrefectServer(api_url=api_url, process=process, log_path=log_path, home=home, lock=lock)
    try:
        _write_pid_file(home, process, port, api_url)
        _wait_healthy(process, api_url, log_path, timeout_s)
        return server
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


# ---- a kept server: `conan server start / status / stop` -----------------------------------------------

def default_home() -> Path:
    """The PREFECT_HOME a server and its database live in: `PREFECT_HOME`, else `<work dir>/prefect_home`."""
    return Path(os.environ.get("PREFECT_HOME") or work_dir() / "prefect_home")


def ui_url(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")


def flow_run_link_hook(announce: Callable[[str], None]) -> Callable[..., None]:
    """An `on_running` flow hook that hands `announce` the flow run's UI link (`<UI>/runs/flow-run/<id>`,
    with the UI URL Prefect derives from PREFECT_API_URL) as the run starts."""
    def announce_flow_run_link(flow: Any, flow_run: Any, state: Any) -> None:
        from prefect.utilities.urls import url_for

        announce(url_for("flow-run", obj_id=flow_run.id) or f"flow run {flow_run.id}")

    return announce_flow_run_link


@dataclass(frozen=True)
class ServerStatus:
    """What runs on a PREFECT_HOME, as its pid file, the processes it names and the API's health say."""

    home: Path
    record: dict[str, Any] | None
    alive: bool = False  # the server process the pid file names is running
    healthy: bool = False  # and its API answers
    owner_alive: bool = False  # the process that owns it (a conan run; a kept server owns itself) is running

    @property
    def kept(self) -> bool:
        return bool(self.record and self.record.get("kept"))

    @property
    def running(self) -> bool:
        return self.alive and self.healthy

    def describe(self) -> str:
        """One line: what runs here and where its UI is, or why nothing usable does."""
        record = self.record
        if record is None:
            return f"no Prefect server runs on {self.home}"
        if not self.alive:
            return (f"no Prefect server runs on {self.home}: pid {record['pid']} (port {record.get('port')}) "
                    f"named in {PID_FILE} has exited")
        if not self.healthy:
            return (f"the Prefect server on {self.home} (pid {record['pid']}) runs but {record['api_url']} does "
                    f"not answer (starting, or stuck: see {record.get('log')})")
        where = f"UI {ui_url(record['api_url'])}, API {record['api_url']} (pid {record['pid']})"
        if self.kept:
            return f"running: {where}; PREFECT_HOME {self.home}; log {record.get('log')}"
        if self.owner_alive:
            return f"running for conan run pid {record.get('owner_pid')}, stops when it ends: {where}"
        return f"running, left by a dead conan run (pid {record.get('owner_pid')}): {where}"


def server_status(home: Path) -> ServerStatus:
    """The status of the server `home`'s pid file names. Read only: nothing is started, stopped, removed or
    locked (a probe of the lock could make a run that starts its server at that moment fail)."""
    record = read_pid_file(home)
    if record is None:
        return ServerStatus(home, None)
    alive = _is_alive(record["pid"], record.get("start_ticks"))
    healthy = alive and api_is_healthy(str(record.get("api_url")))
    owner = record.get("owner_pid")
    owner_alive = alive if record.get("kept") else isinstance(owner, int) and _is_alive(owner, None)
    return ServerStatus(home, record, alive=alive, healthy=healthy, owner_alive=owner_alive)


def kept_server(home: Path) -> dict[str, Any] | None:
    """The pid file's record of the server `conan server start` keeps on `home` when it answers, else None."""
    status = server_status(home)
    return status.record if status.kept and status.running else None


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds (TIME_WAIT is fine)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _already_running(home: Path, port: int | None) -> dict[str, Any]:
    """`home` is locked: the record of the kept server that holds it, or PrefectServerError saying why not."""
    status = server_status(home)
    record = status.record
    if not status.kept and status.owner_alive:
        raise PrefectServerError(f"a conan run (pid {record['owner_pid']}) has its own Prefect server on {home}, "
                                 f"which stops when the run ends; start one after it")
    if not (status.kept and status.running):
        raise PrefectServerError(status.describe() if record else f"{home} is locked by another process")
    if port is not None and port != record["port"]:
        raise PrefectServerError(f"a Prefect server already runs on {home} on port {record['port']}; "
                                 f"`conan server stop` first to start it on port {port}")
    return record


def start_kept_server(home: Path, *, port: int | None = None, timeout_s: float = 120.0,
                      echo: Callable[[str], None] = print) -> tuple[dict[str, Any], bool]:
    """Start a server on `home` that outlives this process (no PDEATHSIG, its own session, holding `home`'s
    lock itself); wait until healthy. Port `port`, default 4200. Returns its pid file's record and whether
    it was started now (False: one was already running there)."""
    home.mkdir(parents=True, exist_ok=True)
    lock = _try_lock(home)
    if lock is None:
        return _already_running(home, port), False
    process = None
    try:
        reap_stale_server(home, echo=echo)
        port = port or DEFAULT_PORT
        if not _port_is_free(port):
            raise PrefectServerError(f"port {port} on 127.0.0.1 is in use; choose another with --port")
        process, api_url, log_path = _launch(home, port, die_with_parent=False, pass_fds=(lock.fileno(),))
        record = _write_pid_file(home, process, port, api_url, kept=True)
        _wait_healthy(process, api_url, log_path, timeout_s)
    except BaseException:
        if process is not None:
            _terminate(process.pid, _start_ticks(process.pid))
            _remove_pid_file(home, process.pid)
        raise
    finally:
        lock.close()  # the server holds its own copy of the lock from now on
    return record, True


def _clear_stale(home: Path, record: dict[str, Any]) -> None:
    """Under `home`'s lock: stop what a dead owner left (when still alive) and remove the pid file."""
    lock = _try_lock(home)
    if lock is None:
        raise PrefectServerError(f"the Prefect server on {home} (pid {record['pid']}) belongs to conan run pid "
                                 f"{record.get('owner_pid')} and stops when that run ends")
    try:
        reap_stale_server(home, echo=lambda _: None)
    finally:
        lock.close()


def stop_kept_server(home: Path, *, timeout_s: float = 20.0) -> str:
    """Stop the server `conan server start` keeps on `home` (SIGTERM to its process group, SIGKILL after
    `timeout_s`), remove its pid file; returns what was done, in one line. Nothing to stop is no error;
    a server that belongs to a live `conan run` is (PrefectServerError): it stops when that run ends."""
    status = server_status(home)
    record = status.record
    if record is None:
        return f"no Prefect server runs on {home}; nothing to stop"
    if not status.kept or not status.alive:  # a dead one's pid file, or a run's server
        _clear_stale(home, record)
        if status.alive:
            return f"stopped the Prefect server (pid {record['pid']}) left by a dead conan run"
        return f"{status.describe()}; removed its pid file"
    _terminate(record["pid"], record.get("start_ticks"), timeout_s=timeout_s)
    if _is_alive(record["pid"], record.get("start_ticks")):
        raise PrefectServerError(f"the Prefect server (pid {record['pid']}) did not stop after SIGTERM and SIGKILL")
    lock = _wait_for_lock(home, timeout_s=10.0)  # the server's last threads release it as they exit
    if lock is None:  # another process took the home meanwhile: its pid file is not ours to touch
        return f"stopped the Prefect server (pid {record['pid']}); {home} is locked by another process now"
    try:
        _remove_pid_file(home, record["pid"])
    finally:
        lock.close()
    return f"stopped the Prefect server on {home} (pid {record['pid']}, port {record['port']})"


def connect_or_start(home: Path | None = None, *, echo: Callable[[str], None] = print) -> PrefectServer:
    """Use `PREFECT_API_URL` when it answers; else the server `conan server start` keeps on `home`; else
    start a local server under `home` for this run."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured and api_is_healthy(configured):
        return PrefectServer(api_url=configured)
    home = home or default_home()
    kept = kept_server(home)
    if configured:
        instead = "using the kept server on its PREFECT_HOME" if kept else "starting a local Prefect server"
        echo(f"PREFECT_API_URL={configured} does not answer; {instead} instead")
    if kept is not None:
        echo(f"using the Prefect server `conan server start` keeps on {home} (pid {kept['pid']}); it keeps "
             f"running after this run")
        return PrefectServer(api_url=kept["api_url"], home=home)
    echo("starting a local Prefect server for this run (about 17 s on a new database); it stops when the run "
         f"ends; {KEEP_HINT}")
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
