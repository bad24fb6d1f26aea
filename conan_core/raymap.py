"""The generic Ray map of the data stages (clean, extract): fn(unit, *args) over a list of units.

`iter_units` yields the results in unit order as soon as each one and those before it are done, so
the caller's ordered pass over unit i runs while the workers compute the next ones. A few more tasks
than workers are in flight, so no worker waits for the driver; the shared arguments are put in the
object store once (`workers=0`: everything runs in this process, no Ray). A progress bar counts
finished units.

`fanout_workers` is the rule for when a fan-out pays at all (see FANOUT_MIN_BYTES).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

# Input size from which fanning out beats one process, measured with bench/bench_clean.py on the 2-core
# dev machine (2026-12-03; see the figures there). Without a running Ray the fan-out must first earn
# back starting one (ray.init, two worker processes importing the stage, ray.shutdown: ~6 s there);
# with the flow's Ray running, only the workers' first import and the shipping of results.
FANOUT_MIN_BYTES = {"start_ray": 64 << 20, "running_ray": 4 << 20}
IN_FLIGHT_PER_WORKER = 2  # queued tasks per worker: one running, one ready to start when it finishes


def input_bytes(paths: list[Path]) -> int:
    """Total size of the input files (a directory: every file in it)."""
    total = 0
    for path in map(Path, paths):
        files = (p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        total += sum(p.stat().st_size for p in files if p.exists())
    return total


def ray_is_running() -> bool:
    """Whether this process is connected to a Ray (without importing ray, ~1 s, when it is not)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def fanout_workers(workers: int, work_bytes: int, *, min_bytes: int | None = None, desc: str = "map") -> int:
    """`workers`, or 0 (this process) when the input is too small for a fan-out to pay.

    `min_bytes` None: FANOUT_MIN_BYTES for whether a Ray is running (a flow's, a test's) or would have to
    be started (or joined through RAY_ADDRESS); 0: fan out whatever the size."""
    if workers == 0:
        return 0
    if min_bytes is None:
        min_bytes = FANOUT_MIN_BYTES["running_ray" if ray_is_running() else "start_ray"]
    if work_bytes >= min_bytes:
        return workers
    log.info("%s: %.1f MB of input, under the %.0f MB from which %d Ray workers pay; running in this process",
             desc, work_bytes / 1e6, min_bytes / 1e6, workers)
    return 0


def _progress_bar(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="unit")


def iter_units(fn: Callable[..., T], units: list[Any], args: tuple, *, workers: int,
               progress: bool, desc: str) -> Iterator[T]:
    """fn(unit, *args) for every unit, yielded in unit order; `workers` Ray workers (0: this process)."""
    bar = _progress_bar(len(units), progress, desc)
    try:
        if workers == 0:
            for unit in units:
                yield fn(unit, *args)
                bar.update()
            return
        import ray

        from conan_core.raysession import ray_session

        with ray_session(num_cpus=workers):
            yield from _iter_on_ray(ray, fn, units, args, workers, bar)
    finally:
        bar.close()


def map_units(fn: Callable[..., T], units: list[Any], args: tuple, *, workers: int,
              progress: bool, desc: str) -> list[T]:
    """fn(unit, *args) for every unit, results in unit order (`iter_units` as a list)."""
    return list(iter_units(fn, units, args, workers=workers, progress=progress, desc=desc))


def _iter_on_ray(ray: Any, fn: Callable[..., T], units: list[Any], args: tuple, workers: int,
                 bar: Any) -> Iterator[T]:
    remote = ray.remote(num_cpus=1)(fn)
    arg_refs = [ray.put(arg) for arg in args]  # shared once, not copied per task
    window = max(1, workers) * IN_FLIGHT_PER_WORKER  # tasks in flight plus results waiting for their turn
    pending: dict[Any, int] = {}
    finished: dict[int, Any] = {}  # unit index -> ref of its finished result, until its turn comes
    next_submit = next_yield = 0
    while next_yield < len(units):
        while next_submit < len(units) and len(pending) + len(finished) < window:
            pending[remote.remote(units[next_submit], *arg_refs)] = next_submit
            next_submit += 1
        if next_yield in finished:
            yield ray.get(finished.pop(next_yield))
            next_yield += 1
            continue
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            finished[pending.pop(ref)] = ref
            bar.update()

