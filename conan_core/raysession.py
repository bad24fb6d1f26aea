"""One way to get a Ray session: use the running one, join RAY_ADDRESS, or start a local one in the work dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from conan_core.paths import offline_env, work_dir


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray (a flow's, a trainer's, a test's); else join `address` / RAY_ADDRESS, or start a
    local Ray with its temp dir under the work dir (token auth stays on). Workers get the offline env.

    Shuts down only a Ray this call started, from the thread that started it (a Ray started in one thread
    and shut down from another took 15 s to stop here).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    env = offline_env()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        temp_dir = work_dir() / "ray"
        temp_dir.mkdir(parents=True, exist_ok=True)
        ray.init(num_cpus=num_cpus, _temp_dir=str(temp_dir), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
    try:
        yield
    finally:
        ray.shutdown()
