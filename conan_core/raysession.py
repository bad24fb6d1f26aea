"""One way to get a Ray session: use the running one, join RAY_ADDRESS, or start a local one in the work dir.

A local Ray listens on loopback only. Ray 2.60 binds its gRPC servers (GCS, raylet, object manager, every
worker and the driver) to every interface, and its agents and metrics servers to 0.0.0.0 or the machine
address, unless the node IP is loopback; then all of them bind 127.0.0.1. But `ray.init` turns a node IP of
127.0.0.1 into the machine's address (`services.resolve_ip_for_localhost`) unless
`ray_constants.ENABLE_RAY_CLUSTER` is off, which by default it is only on macOS/Windows. So we turn it off
for the length of `ray.init`. Metrics collection is off too, so the dashboard agent serves no Prometheus
exporter page (it answered 200 without a token on the machine address). Token auth stays on (Ray's default).
`include_dashboard=False` still starts a dashboard head process (Ray runs its usage-stats module there).

What still answers without a token, on 127.0.0.1 only: the autoscaler monitor's and the dashboard head's
Prometheus pages (fixed ports 44217 and 44227; Ray's own process counters) and the dashboard agent's
`/api/healthz` and `/api/local_raylet_healthz` (port 52365; its other paths answer 401). Not Ray's:
torch.distributed's TCPStore, which a Ray Train worker group with a process group opens on its rank-0
worker, listens on every interface (`*:port`); torch has no bind-address option for it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from conan_core.errors import ConanError
from conan_core.paths import offline_env, work_dir

LOOPBACK = "127.0.0.1"


class RaySessionError(ConanError):
    """A local Ray could not be started as configured."""


def local_init_kwargs(num_cpus: int | None = None) -> dict[str, Any]:
    """The `ray.init` options of a local Ray: temp dir under the work dir, loopback node IP, no dashboard,
    no metrics exporter, workers with the offline env. Pass them through `start_local_ray`, which also makes
    Ray keep the loopback node IP."""
    temp_dir = work_dir() / "ray"
    temp_dir.mkdir(parents=True, exist_ok=True)
    return {"num_cpus": num_cpus, "_temp_dir": str(temp_dir), "include_dashboard": False, "log_to_driver": False,
            "_node_ip_address": LOOPBACK, "_system_config": {"enable_metrics_collection": False},
            "runtime_env": {"env_vars": offline_env()}}


@contextmanager
def _keep_loopback_node_ip() -> Iterator[None]:
    # The switch `ray.init` consults, through services.get_node_ip_address, when it resolves a loopback
    # node IP; read at call time, so setting it here is enough. Restored so a later join of a cluster by
    # address still resolves this machine's routable address.
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


def is_loopback_address(address: str) -> bool:
    """True for a `host:port` (or `ray://host:port`) address whose host is loopback (127.x, ::1, localhost)."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_local_ray(num_cpus: int | None = None, **overrides: Any) -> None:
    """`ray.init` a local Ray on loopback (see the module docstring); `overrides` replace init options."""
    import ray

    with _keep_loopback_node_ip():
        ray.init(**{**local_init_kwargs(num_cpus), **overrides})
    node_ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node_ip).is_loopback:
        ray.shutdown()
        raise RaySessionError(f"the local Ray took node IP {node_ip}, not loopback: its services would listen "
                              f"on the network; refusing to run (check the Ray version against "
                              f"conan_core/raysession.py)")


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray (a flow's, a trainer's, a test's); else join `address` / RAY_ADDRESS, or start a
    local Ray on loopback with its temp dir under the work dir (token auth stays on). Workers get the
    offline env.

    Shuts down only a Ray this call started, from the thread that started it (a Ray started in one thread
    and shut down from another took 15 s to stop here).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A head on loopback (`ray start --head --node-ip-address 127.0.0.1`): `ray.init` would turn the
        # 127.0.0.1 of the address into the machine's address, where that head does not listen.
        keep = _keep_loopback_node_ip() if is_loopback_address(address) else contextlib.nullcontext()
        with keep:
            ray.init(address=address, runtime_env={"env_vars": offline_env()}, log_to_driver=False)
    else:
        start_local_ray(num_cpus)
    try:
        yield
    finally:
        ray.shutdown()
