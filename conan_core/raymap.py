"""The generic Ray map of the data stages (clean, extract): fn(unit, *args) over a list of units.

Results come back in unit order whichever worker finished first; at most `workers` Ray tasks are in
flight, and the shared arguments are put in the object store once (`workers=0`: everything runs in this
process, no Ray). A progress bar counts finished units.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _progress_bar(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="unit")


def map_units(fn: Callable[..., T], units: list[Any], args: tuple, *, workers: int,
              progress: bool, desc: str) -> list[T]:
    """fn(unit, *args) for every unit, results in unit order; at most `workers` Ray tasks in flight."""
    bar = _progress_bar(len(units), progress, desc)
    if workers == 0:
        results = []
        for unit in units:
            results.append(fn(unit, *args))
            bar.update()
        bar.close()
        return results
    import ray

    from conan_core.raysession import ray_session

    with ray_session(num_cpus=workers):
        return _map_on_ray(ray, fn, units, args, workers, bar)


def _map_on_ray(ray: Any, fn: Callable[..., T], units: list[Any], args: tuple, workers: int,
                bar: Any) -> list[T]:
    try:
        remote = ray.remote(num_cpus=1)(fn)
        arg_refs = [ray.put(arg) for arg in args]  # shared once, not copied per task
        results: list[T | None] = [None] * len(units)
        pending: dict[Any, int] = {}
        next_index = 0
        while next_index < len(units) or pending:
            while next_index < len(units) and len(pending) < workers:
                pending[remote.remote(units[next_index], *arg_refs)] = next_index
                next_index += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
                bar.update()
        return results  # type: ignore[return-value]
    finally:
        bar.close()
