"""`conan server start|status|stop`: a kept Prefect server that outlives the command that started it, that
`conan run` uses, and that the nightly deployment gets its scheduled runs from.

The fast tests use stand-ins (a `sleep` in its own session named in the pid file, a patched health check);
the slow ones start real servers on free ports in temporary PREFECT_HOMEs."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import flows.server as server_module
from conan_cli.main import app
from conan_core.paths import PROJECT_ROOT

PREFECT = str(Path(sys.executable).parent / "prefect")


# ---- stand-ins ------------------------------------------------------------------------------------------

_STAND_INS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_stand_in_left() -> Iterator[None]:
    yield
    while _STAND_INS:
        process = _STAND_INS.pop()
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _stand_in(script: str = "sleep 600 & wait") -> subprocess.Popen:
    """A process group like a server's: a shell leading it and a child."""
    process = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    _STAND_INS.append(process)
    time.sleep(0.2)  # the child is forked
    return process


def _write_record(home: Path, pid: int, *, kept: bool, port: int = 1, owner_pid: int | None = None) -> dict:
    record = {"pid": pid, "start_ticks": server_module._start_ticks(pid), "port": port,
              "api_url": f"http://127.0.0.1:{port}/api", "owner_pid": pid if kept else owner_pid,
              "kept": kept, "log": str(home / f"server-{port}.log")}
    home.mkdir(parents=True, exist_ok=True)
    (home / server_module.PID_FILE).write_text(json.dumps(record))
    return record


def _group_gone(pgid: int) -> bool:
    return not server_module._group_alive(pgid)


def _cli(home: Path, *args: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PREFECT_HOME", str(home))
    return CliRunner().invoke(app, ["server", *args])


# ---- fast: status and stop without a real server --------------------------------------------------------

def test_status_and_stop_without_a_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    status = _cli(tmp_path, "status", monkeypatch=monkeypatch)
    assert status.exit_code == 1 and status.output.startswith("no Prefect server runs on "), status.output
    stop = _cli(tmp_path, "stop", monkeypatch=monkeypatch)
    assert stop.exit_code == 0 and "nothing to stop" in stop.output, stop.output


def test_stop_ends_the_kept_servers_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in = _stand_in()
    _write_record(tmp_path, stand_in.pid, kept=True)
    status = _cli(tmp_path, "status", monkeypatch=monkeypatch)
    assert status.exit_code == 1 and "does not answer" in status.output, status.output  # alive, no API
    stop = _cli(tmp_path, "stop", monkeypatch=monkeypatch)
    assert stop.exit_code == 0 and stop.output.startswith("stopped the Prefect server"), stop.output
    assert stand_in.poll() == -signal.SIGTERM
    assert _group_gone(stand_in.pid)  # the shell's child went too
    assert not (tmp_path / server_module.PID_FILE).exists()


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    stand_in = _stand_in("trap '' TERM; sleep 600 & wait")  # the child inherits the ignored SIGTERM
    _write_record(tmp_path, stand_in.pid, kept=True)
    started = time.monotonic()
    message = server_module.stop_kept_server(tmp_path, timeout_s=1.0)
    assert message.startswith("stopped"), message
    assert time.monotonic() - started < 10
    assert stand_in.poll() == -signal.SIGKILL and _group_gone(stand_in.pid)


def test_stop_removes_the_pid_file_of_a_server_that_exited(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    record = _write_record(tmp_path, gone.pid, kept=True)
    record["start_ticks"] = 1  # a start time no live process has: the pid is not that server any more
    (tmp_path / server_module.PID_FILE).write_text(json.dumps(record))
    stop = _cli(tmp_path, "stop", monkeypatch=monkeypatch)
    assert stop.exit_code == 0 and "has exited; removed its pid file" in stop.output, stop.output
    assert not (tmp_path / server_module.PID_FILE).exists()


def test_stop_leaves_a_live_runs_server_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in = _stand_in()
    _write_record(tmp_path, stand_in.pid, kept=False, owner_pid=os.getpid())
    with open(tmp_path / server_module.LOCK_FILE, "a+") as lock:  # held by the "run": this test process
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        stop = _cli(tmp_path, "stop", monkeypatch=monkeypatch)
    assert stop.exit_code == 2, stop.output
    assert f"belongs to conan run pid {os.getpid()} and stops when that run ends" in stop.output
    assert len(stop.output.strip().splitlines()) == 1
    assert stand_in.poll() is None and (tmp_path / server_module.PID_FILE).exists()


def test_start_reports_the_server_already_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in = _stand_in()
    record = _write_record(tmp_path, stand_in.pid, kept=True, port=4311)
    monkeypatch.setattr(server_module, "api_is_healthy", lambda url, **_: url == record["api_url"])
    monkeypatch.setattr(server_module, "_launch", lambda *a, **k: pytest.fail("started a second server"))
    with open(tmp_path / server_module.LOCK_FILE, "a+") as lock:  # the kept server holds its home's lock
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        start = _cli(tmp_path, "start", monkeypatch=monkeypatch)
        assert start.exit_code == 0 and "already running" in start.output, start.output
        assert "UI:  http://127.0.0.1:4311\n" in start.output
        status = _cli(tmp_path, "status", monkeypatch=monkeypatch)
        assert status.exit_code == 0 and status.output.startswith("running: UI http://127.0.0.1:4311"), status.output
        other_port = _cli(tmp_path, "start", "--port", "4312", monkeypatch=monkeypatch)
        assert other_port.exit_code == 2 and "on port 4311; `conan server stop` first" in other_port.output


def test_start_refuses_while_a_run_owns_the_home(tmp_path: Path) -> None:
    stand_in = _stand_in()
    _write_record(tmp_path, stand_in.pid, kept=False, owner_pid=os.getpid())
    with open(tmp_path / server_module.LOCK_FILE, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(server_module.PrefectServerError, match="has its own Prefect server"):
            server_module.start_kept_server(tmp_path)


def test_start_refuses_a_port_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "_launch", lambda *a, **k: pytest.fail("launched on a busy port"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = _cli(tmp_path, "start", "--port", str(port), monkeypatch=monkeypatch)
    assert start.exit_code == 2 and f"error: port {port} on 127.0.0.1 is in use" in start.output, start.output
    assert not (tmp_path / server_module.PID_FILE).exists()
    lock = server_module._try_lock(tmp_path)  # released again
    assert lock is not None
    lock.close()


def test_conan_run_uses_the_kept_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in = _stand_in()
    record = _write_record(tmp_path, stand_in.pid, kept=True, port=4313)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(server_module, "api_is_healthy", lambda url, **_: url == record["api_url"])
    monkeypatch.setattr(server_module, "start_server", lambda *a, **k: pytest.fail("started a server"))
    messages: list[str] = []
    server = server_module.connect_or_start(tmp_path, echo=messages.append)
    assert server.api_url == record["api_url"] and not server.started_here
    assert any("`conan server start` keeps" in m for m in messages), messages
    server_module.stop_server(server)  # a joined server is left alone
    assert stand_in.poll() is None


def test_an_explicit_api_url_wins_over_the_kept_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in = _stand_in()
    _write_record(tmp_path, stand_in.pid, kept=True, port=4314)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4999/api")
    monkeypatch.setattr(server_module, "api_is_healthy", lambda url, **_: True)
    server = server_module.connect_or_start(tmp_path, echo=lambda _: None)
    assert server.api_url == "http://127.0.0.1:4999/api"


def test_without_a_server_conan_run_starts_its_own_and_says_how_to_keep_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    started: list[Path] = []
    monkeypatch.setattr(server_module, "start_server",
                        lambda home, **_: started.append(home) or server_module.PrefectServer(api_url="x"))
    messages: list[str] = []
    server_module.connect_or_start(tmp_path, echo=messages.append)
    assert started == [tmp_path]
    assert any("it stops when the run ends" in m and "`conan server start`" in m for m in messages), messages


# ---- slow: a real kept server -----------------------------------------------------------------------------

def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, PREFECT_HOME=str(home), CONAN_WORK_DIR=str(home.parent), PYTHONPATH=str(PROJECT_ROOT))
    env.pop("PREFECT_API_URL", None)
    return env


def _conan(home: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conan_cli", *args], env=_env(home), cwd=PROJECT_ROOT, text=True,
                          capture_output=True, timeout=timeout)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_on(home: Path) -> list[int]:
    """Pids of the live processes whose environment says PREFECT_HOME=`home`."""
    wanted = f"\0PREFECT_HOME={home}\0".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if wanted in b"\0" + environ.read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.fixture
def kept_home(tmp_path: Path) -> Iterator[Path]:
    """A PREFECT_HOME whose kept server (if a test started one) is killed afterwards, whatever happened."""
    home = tmp_path / "prefect_home"
    yield home
    record = server_module.read_pid_file(home)
    if record and server_module._is_alive(record["pid"], record.get("start_ticks")):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record["pid"], signal.SIGKILL)


# A flow run against the kept server: prints the link the `conan run` hook announces, and the run's id.
LINK_FLOW = """
from prefect import flow
from prefect.runtime import flow_run
from flows.server import drain_prefect_clients, flow_run_link_hook

@flow(name="link-check", persist_result=False)
def link_check():
    print("ID", flow_run.id, flush=True)

link_check.with_options(on_running=[flow_run_link_hook(lambda link: print("LINK", link, flush=True))])()
drain_prefect_clients()
"""


@pytest.mark.slow
def test_conan_server_start_status_stop(kept_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = server_module.free_port()
    start = _conan(kept_home, "server", "start", "--port", str(port))
    assert start.returncode == 0, start.stdout + start.stderr
    assert f"UI:  http://127.0.0.1:{port}\n" in start.stdout
    record = server_module.read_pid_file(kept_home)
    assert record and record["kept"] and record["port"] == port
    # The command has exited; its server answers, and its UI calls this server's API.
    assert _get_json(f"http://127.0.0.1:{port}/api/health") is True
    assert _get_json(f"http://127.0.0.1:{port}/ui-settings")["api_url"] == f"http://127.0.0.1:{port}/api"

    status = _conan(kept_home, "server", "status")
    assert status.returncode == 0 and status.stdout.startswith(f"running: UI http://127.0.0.1:{port}"), status.stdout
    again = _conan(kept_home, "server", "start")
    assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
    assert server_module.read_pid_file(kept_home)["pid"] == record["pid"]

    # `conan run` would use it (starts none), and a flow run's announced link is its page in this UI.
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = server_module.connect_or_start(kept_home, echo=lambda _: None)
    assert server.api_url == f"http://127.0.0.1:{port}/api" and not server.started_here
    env = dict(_env(kept_home), PREFECT_API_URL=server.api_url)
    flow_run = subprocess.run([sys.executable, "-c", LINK_FLOW], env=env, cwd=PROJECT_ROOT, text=True,
                              capture_output=True, timeout=180)
    lines = dict(line.split(" ", 1) for line in flow_run.stdout.splitlines() if line.startswith(("ID ", "LINK ")))
    assert flow_run.returncode == 0 and "LINK" in lines, flow_run.stdout + flow_run.stderr[-3000:]
    assert lines["LINK"] == f"http://127.0.0.1:{port}/runs/flow-run/{lines['ID']}"
    page = urllib.request.Request(lines["LINK"], headers={"Accept": "text/html"})  # as a browser asks for it
    with urllib.request.urlopen(page, timeout=10) as response:
        assert response.status == 200 and b"<html" in response.read().lower()

    assert record["pid"] in _processes_on(kept_home)
    stop = _conan(kept_home, "server", "stop")
    assert stop.returncode == 0 and stop.stdout.startswith("stopped the Prefect server"), stop.stdout + stop.stderr
    assert not _listening(port)
    # No process is left: not its group, nor any process of that PREFECT_HOME (a zombie waiting for init
    # to reap it has no environment and counts as gone).
    assert _group_gone(record["pid"]) and not server_module._is_alive(record["pid"], record["start_ticks"])
    assert _processes_on(kept_home) == []
    assert server_module.read_pid_file(kept_home) is None
    assert _conan(kept_home, "server", "status").returncode == 1
    stop_again = _conan(kept_home, "server", "stop")
    assert stop_again.returncode == 0 and "nothing to stop" in stop_again.stdout


# ---- slow: the nightly deployment's schedule --------------------------------------------------------------

def _scheduled_runs(api_url: str, deployment_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    scheduled = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=scheduled, sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                                     deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _read_deployment(api_url: str, name: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


@pytest.mark.slow
def test_the_nightly_deployment_has_its_cron_and_scheduled_runs(kept_home: Path) -> None:
    cronsim = pytest.importorskip("cronsim")
    start = _conan(kept_home, "server", "start", "--port", str(server_module.free_port()))
    assert start.returncode == 0, start.stdout + start.stderr
    record = server_module.read_pid_file(kept_home)
    api_url = record["api_url"]
    try:
        # As the README's "Deployments and schedules" says, from the project root.
        env = dict(_env(kept_home), PREFECT_API_URL=api_url)
        prefect_yaml = PROJECT_ROOT / "deployments" / "prefect.yaml"
        for command in (["work-pool", "create", "conan-process", "--type", "process"],
                        ["--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_yaml)]):
            done = subprocess.run([PREFECT, *command], env=env, cwd=PROJECT_ROOT, text=True, capture_output=True,
                                  timeout=180)
            assert done.returncode == 0, done.stdout + done.stderr
        declared = yaml.safe_load(prefect_yaml.read_text())["deployments"][0]["schedules"][0]

        deployment = _read_deployment(api_url, "conan-pipeline/conan-nightly")
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == [
            (declared["cron"], declared["timezone"], True)]
        assert not deployment.paused

        # The server's scheduler (its recent-deployments loop runs every 5 s) creates the next runs itself.
        deadline, runs = time.monotonic() + 90, []
        while time.monotonic() < deadline and len(runs) < 3:  # the scheduler's min_runs is 3
            time.sleep(2)
            runs = _scheduled_runs(api_url, deployment.id)
        assert runs, "the server scheduled no runs of conan-pipeline/conan-nightly within 90 s"
        assert all(run.auto_scheduled and run.state.name == "Scheduled" for run in runs)
        expected = cronsim.CronSim(declared["cron"], datetime.now(UTC))
        times = [run.expected_start_time.astimezone(UTC) for run in runs]
        assert times == [next(expected) for _ in times], times
        assert all(run.parameters["config"] == "configs/demo.yaml" for run in runs)
    finally:
        stop = _conan(kept_home, "server", "stop")
    assert stop.returncode == 0 and stop.stdout.startswith("stopped"), stop.stdout + stop.stderr
    assert not _listening(record["port"])
