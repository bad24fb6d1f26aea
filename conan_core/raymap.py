"""The generic map of the data stages (clean, extract): fn(unit, *args) over a list of units.

`iter_units` yields the results in unit order as soon as each one and those before it are done, so
the caller's ordered pass over unit i runs while the workers compute the next ones. Where the units run:

- `workers=0`: in this process.
- a Ray is running in this process (the pipeline flow's, a test's) or RAY_ADDRESS names a cluster: Ray
  tasks, at most `workers` running and as many queued, the shared arguments put in the object store once.
- otherwise: `workers` local processes (multiprocessing). Starting a local Ray only to fan out over this
  machine's cores would cost more than the work at the sizes users clean: ray.init, its dashboard, agent and
  two worker processes burn ~7 CPU-seconds here (2 cores), as much as cleaning 100k rows in one process.
  On Linux the processes are forked, so they inherit the imported stage: two start in ~0.05 s.

`fanout_workers` is the rule for when a fan-out pays at all (FANOUT_MIN_BYTES; a cluster named by RAY_ADDRESS
gets every input of two units or more). A progress bar counts finished units.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

# Input size from which a fan-out beats one process, measured with bench/bench_clean.py --every-size on the
# 2-core dev machine (2026-12-03, rows of ~160 bytes): 2 local processes were faster from the smallest
# size tried (1.3 MB: 0.3 s vs 0.5 s), 1 local process (only the driver's dedup overlaps) broke even at
# 7.9 MB, 2 tasks on a running Ray at 7.9 MB (0.99x; 1.2-1.3x at 16 MB: its fresh workers first import the
# stage). One unit (a small file) is never fanned out: there is nothing to spread.
FANOUT_MIN_BYTES = {"processes": 1 << 20, "one_process": 8 << 20, "ray": 16 << 20}
IN_FLIGHT_PER_WORKER = 2  # queued units per worker: one running, one ready to start when it finishes


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


def uses_ray() -> bool:
    """Whether a fan-out from this process runs on Ray (see the module docstring) rather than processes."""
    return ray_is_running() or bool(os.environ.get("RAY_ADDRESS"))


def fanout_min_bytes(workers: int) -> int:
    """The measured crossover (FANOUT_MIN_BYTES) for `workers` on the backend a fan-out would use now.

    A cluster named by RAY_ADDRESS gets every input of two units or more: its user asked for the work to run
    there (its nodes may have cores and data this machine has not), and the crossovers were measured on one
    2-core machine's own Ray, which says nothing about someone else's cluster."""
    if os.environ.get("RAY_ADDRESS"):
        return 0
    if uses_ray():
        return FANOUT_MIN_BYTES["ray"]
    return FANOUT_MIN_BYTES["processes" if workers > 1 else "one_process"]


def fanout_workers(workers: int, work_bytes: int, units: int, *, min_bytes: int | None = None,
                   desc: str = "map") -> int:
    """`workers`, or 0 (this process) when a fan-out would not pay: `units` < 2 or `work_bytes` (the input
    size) under `min_bytes` (None: `fanout_min_bytes`; 0: fan out whatever the input)."""
    if workers == 0:
        return 0
    if min_bytes == 0:
        return workers
    min_bytes = fanout_min_bytes(workers) if min_bytes is None else min_bytes
    if units >= 2 and work_bytes >= min_bytes:
        return workers
    log.info("%s: %d unit(s), %.1f MB of input, under the %.1f MB from which %d worker(s) pay; running in this "
             "process", desc, units, work_bytes / 1e6, min_bytes / 1e6, workers)
    return 0


def _progress_bar(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="unit")


def iter_units(fn: Callable[..., T], units: list[Any], args: tuple, *, workers: int,
               progress: bool, desc: str) -> Iterator[T]:
    """fn(unit, *args) for every unit, yielded in unit order; `workers` workers (0: this process)."""
    if workers == 0:
        runner = _in_process(fn, units, args)
    elif uses_ray():
        runner = _on_ray(fn, units, args, workers)
    else:
        runner = _on_processes(fn, units, args, workers)
    with closing(_progress_bar(len(units), progress, desc)) as bar:
        for result in runner:
            bar.update()
            yield result


def map_units(fn: Callable[..., T], units: list[Any], args: tuple, *, workers: int,
              progress: bool, desc: str) -> list[T]:
    """fn(unit, *args) for every unit, results in unit order (`iter_units` as a list)."""
    return list(iter_units(fn, units, args, workers=workers, progress=progress, desc=desc))


def _in_process(fn: Callable[..., T], units: list[Any], args: tuple) -> Iterator[T]:
    for unit in units:
        yield fn(unit, *args)


# ---------------------------------------------------------------- local processes

_task: tuple[Callable[..., Any], tuple] | None = None  # a worker process's fn and shared args


def _init_worker(fn: Callable[..., Any], args: tuple) -> None:
    global _task
    _task = (fn, args)


def _run_unit(unit: Any) -> Any:
    assert _task is not None
    fn, args = _task
    return fn(unit, *args)


def _on_processes(fn: Callable[..., T], units: list[Any], args: tuple, workers: int) -> Iterator[T]:
    import multiprocessing

    # Linux: fork (its default before Python 3.14), so the workers inherit the imported stage and `args`
    # instead of importing and unpickling them, and no main module is re-run (spawn and forkserver re-run
    # an unguarded calling script in every child). The children run only `fn`: pure Python plus numpy and
    # Arrow (fork-safe), no lock another parent thread could hold. Elsewhere: the platform's default.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    pool = context.Pool(workers, initializer=_init_worker, initargs=(fn, args))
    return _ordered_results(pool, units, workers)


def _ordered_results(pool: Any, units: list[Any], workers: int) -> Iterator[Any]:
    with pool:  # terminates the workers on the way out, also when the caller stops early
        pending: deque[Any] = deque()
        for unit in units:
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                yield pending.popleft().get()
            pending.append(pool.apply_async(_run_unit, (unit,)))
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------- Ray

def _on_ray(fn: Callable[..., T], units: list[Any], args: tuple, workers: int) -> Iterator[T]:
    import ray

    from conan_core.raysession import ray_session

    with ray_session(num_cpus=workers):
        yield from _iter_on_ray(ray, fn, units, args, workers)


def _iter_on_ray(ray: Any, fn: Callable[..., T], units: list[Any], args: tuple, workers: int) -> Iterator[T]:
    remote = ray.remote(num_cpus=1)(fn)
    arg_refs = [ray.put(arg) for arg in args]  # shared once, not copied per task
    window = workers * IN_FLIGHT_PER_WORKER  # tasks in flight plus results waiting for their turn
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
