"""Conan on engines started separately, the way a user with a cluster runs it: a Ray head started with
`ray start --head` in its own process (token auth on, 127.0.0.1 only) and a Prefect server started with
`prefect server start`, both before and apart from conan.

- `conan run` with RAY_ADDRESS, the head's token and PREFECT_API_URL set (nothing else: no Ray switch for
  the loopback address, conan_core/raysession.py joins it as it is) runs cleaning (Ray tasks), the mining actor pool and
  Ray Train on that cluster (the head's state API lists them under the run's own driver job), starts no Ray
  and no Prefect server of its own (none appears in its process tree while it runs), records its flow run
  and task runs on that server, and leaves both engines running afterwards.
- `prefect deployment run` of the cron deployment (deployments/prefect.yaml), picked up by a process worker
  whose environment names the cluster: the flow run's subprocess is a driver job on that same cluster,
  with the same Ray work under it, and starts no Ray of its own.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect_helpers import stop_worker, sync_client, wait_for_deployment_run
from test_flow_pipeline import STAGES, write_tiny_pipeline

from conan_core.paths import PROJECT_ROOT
from flows.server import api_is_healthy, free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PREFECT, RAY, CONAN = str(BIN / "prefect"), str(BIN / "ray"), str(BIN / "conan")
CLEAN_TASK = "process_unit"        # conan_core.clean.stage: one Ray task per input unit (raymap.map_units)
MINING_ACTOR = "ShardWorker"       # conan_core.mining.actor.ShardActor: the mining actor pool
TRAIN_WORKER = "RayTrainWorker"    # Ray Train's worker actors (pretrain and finetune)
LOCAL_RAY_PROCESSES = ("gcs_server", "raylet")  # what a Ray started by conan itself would run

# Run with the head's token, so it stays out of the pytest process: what the head's state API (through
# its dashboard) lists.
INSPECT = r"""
import dataclasses, json, sys
from ray.util.state import list_actors, list_jobs, list_nodes, list_tasks

def rows(items):
    out = []
    for item in items:
        if dataclasses.is_dataclass(item):
            out.append(dataclasses.asdict(item))
        elif hasattr(item, "model_dump"):
            out.append(item.model_dump())
        else:
            out.append(dict(item))
    return out

address = sys.argv[1]
kwargs = {"address": address, "limit": 10000, "raise_on_missing_output": False}
print(json.dumps({"nodes": rows(list_nodes(**kwargs)), "jobs": rows(list_jobs(address=address)),
                  "actors": rows(list_actors(**kwargs)), "tasks": rows(list_tasks(**kwargs))}, default=str))
"""


# ---- the engines, each started in its own process group ---------------------------------------------

def _stop_group(process: subprocess.Popen, timeout_s: float = 30.0, *, leader_only: bool = False) -> None:
    """SIGTERM the process's group (or only its leader, which then stops the rest), SIGKILL the group if
    the leader is still there after `timeout_s`."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        if process.poll() is None:
            try:
                if leader_only and sig == signal.SIGTERM:
                    os.kill(process.pid, sig)
                else:
                    os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # any child still in the group
    except ProcessLookupError:
        pass


def _ray_env(token: str) -> dict[str, str]:
    """Token auth with this head's token (no ~/.ray/auth_token involved), workers import this checkout."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
                PYTHONPATH=f"{PROJECT_ROOT}{os.pathsep}{path}" if path else str(PROJECT_ROOT))


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, Any]]:
    """`ray start --head --block` on 127.0.0.1 with token auth, in its own process group; stopped by pid
    (never `ray stop`, which stops every Ray on the machine)."""
    psutil = pytest.importorskip("psutil")
    token = secrets.token_hex(32)
    temp_dir = Path(tempfile.mkdtemp(prefix="conan-rayhead-", dir="/tmp"))  # Ray's socket paths must stay short
    gcs_port, dashboard_port = free_port(), free_port()  # ephemeral range: clear of Ray's worker ports
    env = _ray_env(token)
    # A loopback node IP: `ray start` turns --node-ip-address 127.0.0.1 into the machine's address unless
    # this is off (as conan_core/raysession.py does for its local Ray). The monitor's and the dashboard's
    # metrics pages: free ports, not the fixed 44217/44227 another Ray on the machine may hold.
    # Stopped by a SIGTERM of `ray start` alone, which then stops its processes (a SIGTERM of the whole
    # group kills the GCS first, and `ray start` then waits out its drain request); no drain wait.
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", AUTOSCALER_METRIC_PORT="0", DASHBOARD_METRIC_PORT="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    command = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
               "--ray-client-server-port", str(free_port()), "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(dashboard_port), "--dashboard-agent-listen-port", str(free_port()),
               "--num-cpus", "2", "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    # What the processes that join get: the address and the token only (as a user exports them).
    head = {"address": f"127.0.0.1:{gcs_port}", "dashboard": f"http://127.0.0.1:{dashboard_port}",
            "token": token, "env": _ray_env(token), "process": process, "log": log_path}
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, f"ray start exited {process.returncode}:\n{_tail(log_path)}"
            assert time.monotonic() < deadline, f"the Ray head did not start:\n{_tail(log_path)}"
            time.sleep(1)
        state = _inspect_until(head, lambda s: any(n["state"] == "ALIVE" for n in s["nodes"]), 120)
        (node,) = state["nodes"]
        head["node_id"] = node["node_id"]
        head["gcs_pids"] = _pids_named(psutil, process.pid, "gcs_server")
        assert node["node_ip"] == "127.0.0.1", node
        yield head
    finally:
        descendants = _descendants(psutil, process.pid)
        _stop_group(process, leader_only=True)
        for child in descendants:  # any Ray process that left the group (workers, agents)
            try:
                child.kill()
            except psutil.Error:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`prefect server start --host 127.0.0.1 --port <free>` in its own process group and PREFECT_HOME."""
    home = tmp_path_factory.mktemp("external-prefect-home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_UI_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                    "--analytics-off"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not api_is_healthy(api_url):
            assert process.poll() is None, f"prefect server exited {process.returncode}:\n{_tail(log_path)}"
            assert time.monotonic() < deadline, f"the Prefect server did not answer:\n{_tail(log_path)}"
            time.sleep(1)
        yield {"api_url": api_url, "process": process, "log": log_path}
    finally:
        _stop_group(process)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return write_tiny_pipeline(tmp_path_factory.mktemp("external-flow"))


# ---- helpers ------------------------------------------------------------------------------------------

def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _descendants(psutil: Any, pid: int) -> list[Any]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _pids_named(psutil: Any, root: int, name: str) -> set[int]:
    found = set()
    for child in _descendants(psutil, root):
        try:
            if child.name() == name:
                found.add(child.pid)
        except psutil.Error:
            pass
    return found


def _inspect(head: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", INSPECT, head["dashboard"]], env=head["env"], capture_output=True,
                          text=True, timeout=120, cwd=PROJECT_ROOT)
    assert done.returncode == 0, f"the head's state API did not answer:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _inspect_until(head: dict[str, Any], ready: Any, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = _inspect(head)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
            continue
        if ready(state) or time.monotonic() > deadline:
            return state
        time.sleep(2)


class TreeWatch:
    """Every process seen in `root`'s process tree while it runs (polled twice a second): name, cmdline."""

    def __init__(self, root: int) -> None:
        import psutil

        self._psutil, self.root = psutil, root
        self.seen: dict[int, tuple[str, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> TreeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for child in _descendants(self._psutil, self.root):
                if child.pid not in self.seen:
                    try:
                        self.seen[child.pid] = (child.name(), " ".join(child.cmdline())[:200])
                    except self._psutil.Error:
                        pass
            self._stop.wait(0.5)

    def engines_started(self) -> list[str]:
        """The Ray servers and Prefect servers among them."""
        return [f"pid {pid}: {name} {cmdline}" for pid, (name, cmdline) in sorted(self.seen.items())
                if name in LOCAL_RAY_PROCESSES or ("prefect" in cmdline and "server start" in cmdline)]


def _work_of_job(state: dict[str, Any], job_id: str) -> dict[str, Any]:
    """What the head ran for one driver job: task names, actor class names, and the nodes they ran on."""
    tasks = [task for task in state["tasks"] if task["job_id"] == job_id]
    actors = [actor for actor in state["actors"] if actor["job_id"] == job_id]
    return {"tasks": {task["name"] for task in tasks}, "actors": {actor["class_name"] for actor in actors},
            "nodes": {row["node_id"] for row in tasks + actors if row.get("node_id")}}


def _assert_ran_on_the_head(head: dict[str, Any], state: dict[str, Any], job: dict[str, Any]) -> None:
    work = _work_of_job(state, job["job_id"])
    print(f"driver job {job['job_id']} (pid {_driver_pid(job)}) on the head: tasks {sorted(work['tasks'])}, "
          f"actors {sorted(work['actors'])}")
    assert any(name.endswith(CLEAN_TASK) for name in work["tasks"]), f"no cleaning task on the head: {work}"
    assert MINING_ACTOR in work["actors"], f"no mining actor on the head: {work}"
    assert TRAIN_WORKER in work["actors"], f"no Ray Train worker on the head: {work}"
    assert work["nodes"] == {head["node_id"]}, work


def _driver_jobs(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_id"]: job for job in state["jobs"] if job.get("job_id") and "DRIVER" in str(job.get("type"))}


def _driver_pid(job: dict[str, Any]) -> int | None:
    pid = (job.get("driver_info") or {}).get("pid")
    return int(pid) if pid not in (None, "") else None




def _flow_runs(api_url: str) -> list[Any]:
    with sync_client(api_url) as client:
        return client.read_flow_runs()


def _task_states(api_url: str, flow_run_id: Any) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with sync_client(api_url) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.name for run in runs}


def _assert_engines_still_running(head: dict[str, Any], prefect_server: dict[str, Any]) -> None:
    import psutil

    assert head["process"].poll() is None, "the Ray head is gone"
    assert _pids_named(psutil, head["process"].pid, "gcs_server") == head["gcs_pids"], "the head's GCS changed"
    nodes = _inspect(head)["nodes"]
    assert [(n["node_id"], n["state"]) for n in nodes] == [(head["node_id"], "ALIVE")], nodes
    assert prefect_server["process"].poll() is None, "the Prefect server is gone"
    assert api_is_healthy(prefect_server["api_url"]), "the Prefect server does not answer"


# ---- the tests ----------------------------------------------------------------------------------------

def test_the_head_wants_its_token(ray_head: dict[str, Any]) -> None:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(f"{ray_head['dashboard']}/api/v0/nodes", timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(f"{ray_head['dashboard']}/api/v0/nodes",
                                     headers={"Authorization": f"Bearer {ray_head['token']}"})
    with opener.open(request, timeout=10) as response:
        assert response.status == 200


def test_conan_run_uses_the_external_ray_and_prefect(ray_head: dict[str, Any], prefect_server: dict[str, Any],
                                                     tiny: dict[str, Any], tmp_path: Path) -> None:
    work = tmp_path / "work"
    env = dict(ray_head["env"], RAY_ADDRESS=ray_head["address"], PREFECT_API_URL=prefect_server["api_url"],
               CONAN_WORK_DIR=str(work), PREFECT_HOME=str(work / "prefect_home"))
    before = _driver_jobs(_inspect(ray_head))
    log_path = tmp_path / "conan-run.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        run = subprocess.Popen([CONAN, "run", "--config", str(tiny["config"]), "--out-dir", str(tmp_path / "out")],
                               env=env, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
        with TreeWatch(run.pid) as watch:
            try:
                returncode = run.wait(timeout=840)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait(timeout=30)
                raise AssertionError(f"conan run did not finish in 840 s:\n{_tail(log_path)}") from None
    output = log_path.read_text(errors="replace")
    print(f"conan run on the external engines: {time.monotonic() - started:.0f} s")
    assert returncode == 0, output[-4000:]
    # Neither engine of its own: no local Prefect server, no Ray servers in its process tree, no local
    # Ray temp dir in its work dir.
    assert "starting a local Prefect server" not in output, output[-4000:]
    assert f"Prefect API: {prefect_server['api_url']}" in output
    assert watch.engines_started() == [], watch.engines_started()
    assert not (work / "ray").exists()

    # Its stages ran on the head, under its own driver job.
    state = _inspect_until(ray_head, lambda s: any(_driver_pid(j) == run.pid for j in _driver_jobs(s).values()), 60)
    new = {job_id: job for job_id, job in _driver_jobs(state).items() if job_id not in before}
    (job,) = [job for job in new.values() if _driver_pid(job) == run.pid] or [None]
    assert job is not None, f"no driver job of conan run (pid {run.pid}) on the head: {list(new.values())}"
    _assert_ran_on_the_head(ray_head, state, job)

    # Its flow run and task runs are on the external server.
    (flow_run,) = [r for r in _flow_runs(prefect_server["api_url"]) if r.deployment_id is None]
    assert flow_run.state.is_completed(), flow_run.state
    assert _task_states(prefect_server["api_url"], flow_run.id) == {stage: "Completed" for stage in STAGES}
    assert f"{prefect_server['api_url'].removesuffix('/api')}/runs/flow-run/{flow_run.id}" in output  # its link

    _assert_engines_still_running(ray_head, prefect_server)





def test_a_deployment_run_on_a_worker_joins_the_external_ray(ray_head: dict[str, Any],
                                                              prefect_server: dict[str, Any],
                                                              tiny: dict[str, Any], tmp_path: Path) -> None:
    api_url = prefect_server["api_url"]
    work = tmp_path / "work"
    # The worker's environment reaches its flow runs' subprocesses: RAY_ADDRESS names the cluster there.
    env = dict(ray_head["env"], RAY_ADDRESS=ray_head["address"], PREFECT_API_URL=api_url,
               CONAN_WORK_DIR=str(work), PREFECT_HOME=str(work / "prefect_home"),
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="2")
    prefect_yaml = PROJECT_ROOT / "deployments" / "prefect.yaml"
    for command in (["work-pool", "create", "conan-process", "--type", "process"],
                    ["--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_yaml)]):
        done = subprocess.run([PREFECT, *command], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
    with sync_client(api_url) as client:
        deployment = client.read_deployment_by_name("conan-pipeline/conan-nightly")
    assert [schedule.schedule.cron for schedule in deployment.schedules] == ["0 2 * * *"]

    before = _driver_jobs(_inspect(ray_head))
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "conan-process"], env=env,
                                  cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with TreeWatch(worker.pid) as watch:
            params = json.dumps({"config": str(tiny["config"]), "out_dir": str(tmp_path / "out")})
            done = subprocess.run([PREFECT, "deployment", "run", "conan-pipeline/conan-nightly", "--params", params],
                                  env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
            run = wait_for_deployment_run(api_url, "conan-pipeline/conan-nightly", timeout_s=780)
    finally:
        stop_worker(worker)
    assert run.state.is_completed(), (run.state.message, _tail(log_path))
    assert _task_states(api_url, run.id) == {stage: "Completed" for stage in STAGES}
    assert watch.engines_started() == [], watch.engines_started()
    assert not (work / "ray").exists()

    # The flow run's subprocess (a child of the worker) was a driver job on the head, and ran the stages there.
    state = _inspect(ray_head)
    new = [job for job_id, job in _driver_jobs(state).items() if job_id not in before]
    assert len(new) == 1, f"expected one new driver job on the head, got {new}"
    (job,) = new
    assert _driver_pid(job) in watch.seen, (job, watch.seen)
    _assert_ran_on_the_head(ray_head, state, job)
    _assert_engines_still_running(ray_head, prefect_server)
