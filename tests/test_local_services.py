"""The services a run starts for itself: a local Ray listens on loopback only, and a local Prefect server
never outlives its run (SIGTERM, SIGKILL of the run; the next run stops a server a dead run left, and marks
its flow run Crashed)."""

from __future__ import annotations

import fcntl
import http.client
import ipaddress
import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import flows.server as server_module  # by module, so this file also runs (and fails) against the old one
from conan_core.paths import PROJECT_ROOT

# ---- Ray: every listening socket of a local session is on loopback -----------------------------------


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _session_listeners(psutil: Any) -> list[tuple[str, int, int, str]]:
    """(ip, port, pid, process) of every TCP socket listening in this process and its descendants."""
    me = psutil.Process()
    processes = {me.pid: me} | {child.pid: child for child in me.children(recursive=True)}
    listeners = []
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in processes:
            try:
                what = " ".join(processes[conn.pid].cmdline())[:120] or processes[conn.pid].name()
            except psutil.Error:
                what = "?"
            listeners.append((conn.laddr.ip, conn.laddr.port, conn.pid, what))
    return sorted(listeners)


def _machine_addresses(psutil: Any) -> list[str]:
    return [address.address for addresses in psutil.net_if_addrs().values() for address in addresses
            if address.family == socket.AF_INET and not _is_loopback(address.address)]


def _answers_http(host: str, port: int) -> str | None:
    """What a GET without a token gets at http://host:port/ ('200', '401', a non-HTTP reply); None when
    nothing accepts a connection there."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return None
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=3) as response:
            return str(response.status)
    except urllib.error.HTTPError as err:
        return str(err.code)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # gRPC ports answer HTTP/2
        return repr(err)[:80]


def _foreign_listeners(psutil: Any, session_pids: set[int]) -> set[tuple[str, int]]:
    """(ip, port) listened on by processes outside the session (another Ray on this machine, say)."""
    return {(conn.laddr.ip, conn.laddr.port) for conn in psutil.net_connections("tcp")
            if conn.status == psutil.CONN_LISTEN and conn.pid not in session_pids}


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    psutil = pytest.importorskip("psutil")
    import ray

    from conan_core.raysession import ray_session

    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    # The autoscaler monitor and the dashboard head serve Prometheus pages on fixed ports (44217, 44227):
    # where another Ray on this machine holds those, they would not bind and this test would not see them.
    monkeypatch.setenv("AUTOSCALER_METRIC_PORT", "0")
    monkeypatch.setenv("DASHBOARD_METRIC_PORT", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with ray_session(num_cpus=1):
        def worker_pid() -> int:  # nested, so Ray ships it by value (tests/ is not importable on workers)
            return os.getpid()

        assert ray.get(ray.remote(worker_pid).remote()) != os.getpid()  # a worker is up too
        # The agents, the monitor's and the dashboard's servers come up in the seconds after init: wait
        # for the monitor and the dashboard head, then until nothing new binds for 3 s.
        deadline, stable_since, listeners = time.monotonic() + 40, time.monotonic(), _session_listeners(psutil)
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = _session_listeners(psutil)
            if now != listeners:
                listeners, stable_since = now, time.monotonic()
            roles = " ".join(what for *_, what in listeners)
            if "monitor.py" in roles and "dashboard.py" in roles and time.monotonic() - stable_since > 3:
                break
        node_ip = ray.util.get_node_ip_address()
        foreign = _foreign_listeners(psutil, {pid for _, _, pid, _ in listeners})
        answered = {(host, port): _answers_http(host, port) for host in _machine_addresses(psutil)
                    for _, port, _, _ in listeners
                    if not {(host, port), ("0.0.0.0", port), ("::", port)} & foreign}
    table = "\n".join(f"{ip}:{port} pid {pid} {what}" for ip, port, pid, what in listeners)
    roles = " ".join(what for *_, what in listeners)
    # The core servers must be seen; the monitor's and the dashboard's pages come up late under load (they
    # are checked whenever they are listening, like every other socket of the session).
    for role in ("gcs_server", "raylet"):
        assert role in roles, f"no listening socket of {role} seen:\n{table}"
    exposed = [line for line, (ip, *_) in zip(table.splitlines(), listeners, strict=True) if not _is_loopback(ip)]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(exposed)
    answering = {where: code for where, code in answered.items() if code is not None}
    assert not answering, f"answers on the machine address: {answering}\n{table}"
    assert _is_loopback(node_ip), f"node IP {node_ip}"


def test_a_loopback_ray_address_is_told_apart() -> None:
    """Joining a head on 127.0.0.1 keeps the loopback address (ray.init would resolve it to the machine's)."""
    from conan_core.raysession import is_loopback_address

    for address in ("127.0.0.1:6379", "localhost:6379", "ray://127.0.0.1:10001", "[::1]:6379", "127.0.1.1:1"):
        assert is_loopback_address(address), address
    for address in ("10.0.0.5:6379", "ray://head:10001", "auto", "192.0.2.2:6379"):
        assert not is_loopback_address(address), address


# ---- Prefect: a server never outlives its run ------------------------------------------------------------

# A `conan run` stand-in: a local server through prefect_api, then a flow that says its id and sleeps.
RUN = """
import sys, time
from pathlib import Path
from flows.server import prefect_api

with prefect_api(Path(sys.argv[1])) as server:
    from prefect import flow
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @flow(name="sleeper", persist_result=False)
    def sleeper():
        print("RUNNING", flow_run.id, flush=True)
        time.sleep(600)

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        sleeper()
"""


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PREFECT_HOME for these tests: a server restarts on an existing database in ~6 s, not ~17 s."""
    return tmp_path_factory.mktemp("prefect_home")


_RUNS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_run_left_behind() -> Any:
    yield
    while _RUNS:  # a failed test's run: SIGKILL, so its server goes with it
        run = _RUNS.pop()
        if run.poll() is None:
            run.kill()
            run.wait(timeout=10)


def _server_of(run: subprocess.Popen) -> tuple[int, int]:
    """(pid, port) of the `prefect server start` the run started, found in its process tree."""
    psutil = pytest.importorskip("psutil")
    for child in psutil.Process(run.pid).children(recursive=True):
        if "server" in child.cmdline() and "start" in child.cmdline():
            ports = [c.laddr.port for c in psutil.net_connections("tcp")
                     if c.pid == child.pid and c.status == psutil.CONN_LISTEN]
            if ports:
                return child.pid, ports[0]
    raise AssertionError("the run has no listening prefect server")


def _start_run(home: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PREFECT_HOME=str(home), PYTHONPATH=str(PROJECT_ROOT))
    env.pop("PREFECT_API_URL", None)
    process = subprocess.Popen([sys.executable, "-c", RUN, str(home)], env=env, cwd=PROJECT_ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _RUNS.append(process)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen, deadline = [], time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if line.startswith("RUNNING "):
            return process, line.split()[1]
    process.kill()
    raise AssertionError("the run never started its flow:\n" + "".join(seen))


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _gone_within(port: int, pid: int, seconds: float) -> float | None:
    """Seconds until the port closed and the process was gone; None if not within `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if not _listening(port) and not Path(f"/proc/{pid}").exists():
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def _stacks(pid: int) -> str:
    """Where a stuck process's threads are (py-spy when installed), for the failure message."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return "(no py-spy to show the threads)"
    done = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


def _flow_run_state(home: Path, flow_run_id: str) -> str | None:
    with sqlite3.connect(home / "prefect.db") as db:
        row = db.execute("select state_type from flow_run where id = ?", (flow_run_id,)).fetchone()
    return row[0] if row else None


@pytest.mark.slow
def test_sigterm_stops_the_server_and_crashes_the_flow_run(prefect_home: Path) -> None:
    run, flow_run_id = _start_run(prefect_home)
    pid, port = _server_of(run)
    run.send_signal(signal.SIGTERM)
    try:
        returncode = run.wait(timeout=30)
    except subprocess.TimeoutExpired:
        stacks = _stacks(run.pid)
        run.kill()
        raise AssertionError(f"the run did not exit within 30 s of a SIGTERM:\n{stacks}") from None
    assert returncode == 128 + signal.SIGTERM
    assert _gone_within(port, pid, 5) is not None, "the server outlived its run"
    assert server_module.read_pid_file(prefect_home) is None  # the run cleaned up after itself
    assert _flow_run_state(prefect_home, flow_run_id) == "CRASHED"


@pytest.mark.slow
def test_sigkill_stops_the_server_and_the_next_run_crashes_the_flow_run(prefect_home: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run, flow_run_id = _start_run(prefect_home)
    pid, port = _server_of(run)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=10)
    assert _gone_within(port, pid, 5) is not None, "the server outlived its run"
    record = server_module.read_pid_file(prefect_home)
    assert record and record["pid"] == pid and record["port"] == port  # nobody cleaned up: the next run must
    assert _flow_run_state(prefect_home, flow_run_id) == "RUNNING"

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    messages: list[str] = []
    with server_module.prefect_api(prefect_home, echo=messages.append) as server:
        assert server_module.read_pid_file(prefect_home)["pid"] == server.process.pid
    assert any(f"pid {pid}" in m and "dead run" in m for m in messages), messages
    assert any(m.startswith("marked ") and "flow run(s)" in m for m in messages), messages
    assert _flow_run_state(prefect_home, flow_run_id) == "CRASHED"
    assert server_module.read_pid_file(prefect_home) is None


def test_a_live_server_left_by_a_dead_run_is_stopped(tmp_path: Path) -> None:
    # Stand-in for a server whose run died without taking it along: any process in its own session.
    stale = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        ticks = server_module._start_ticks(stale.pid)
        (tmp_path / "conan-server.json").write_text(json.dumps(
            {"pid": stale.pid, "start_ticks": ticks, "port": 1, "api_url": "http://127.0.0.1:1/api",
             "owner_pid": 999999}))
        messages: list[str] = []
        assert server_module.reap_stale_server(tmp_path, echo=messages.append)["pid"] == stale.pid
        assert stale.wait(timeout=5) == -signal.SIGTERM
        assert not (tmp_path / "conan-server.json").exists()
        assert messages and "stopping the Prefect server" in messages[0]
    finally:
        stale.kill()
        stale.wait()


def test_a_home_owned_by_a_live_run_is_not_shared(tmp_path: Path) -> None:
    (tmp_path / "conan-server.json").write_text(json.dumps({"pid": 1, "port": 1, "api_url": "http://127.0.0.1:1/api",
                                                            "owner_pid": 4242}))
    with open(tmp_path / "conan-server.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(server_module.PrefectServerError, match="another conan run \\(pid 4242\\)"):
            server_module.start_server(tmp_path)
    assert (tmp_path / "conan-server.json").exists()  # left alone


@pytest.mark.slow
def test_the_ui_calls_the_api_of_its_own_server(prefect_home: Path) -> None:
    """The server listens on a free port; its UI must call that port's API (not 4200)."""
    run, _ = _start_run(prefect_home)
    _, port = _server_of(run)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as response:
        settings = json.load(response)
    run.kill()
    run.wait(timeout=30)
    assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
