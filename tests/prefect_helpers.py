"""Helpers of the tests that talk to a real Prefect server: a sync client on a given API, waiting for a
deployment's run, stopping a process worker."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any


def sync_client(api_url: str) -> Any:
    """A sync Prefect client on `api_url` (use as a context manager)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return get_client(sync_client=True)


def wait_for_deployment_run(api_url: str, deployment_name: str, timeout_s: float) -> Any:
    """The first run of `deployment_name` that reached a final state, polled every 2 s."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with sync_client(api_url) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            finished = [run for run in client.read_flow_runs(deployment_filter=only_this)
                        if run.state and run.state.is_final()]
            if finished:
                return finished[0]
            time.sleep(2)
    raise AssertionError(f"no run of {deployment_name} finished within {timeout_s:.0f} s")


def stop_worker(worker: subprocess.Popen) -> None:
    """A process worker needs SIGINT twice to stop (measured here); SIGKILL its group if it still lingers."""
    for _ in range(2):
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGINT)
            try:
                worker.wait(timeout=8)
            except subprocess.TimeoutExpired:
                pass
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
