"""Cleaning throughput (rows/s, MinHash included): in-process vs 1 and 2 workers, and its growth with size.

Input: the shared data's pretraining and finetuning pairs, repeated with perturbations (a character
dropped or swapped, a suffix added) to --rows rows, written as 8 JSON-lines files. Each configuration
cleans the same files into its own dataset, and the datasets must be byte-identical. Configurations:

- in-process: `workers=0`.
- N workers (local processes): what `conan clean --workers N` does with no Ray running (fan-out forced
  whatever the size).
- 2 workers (Ray running): the same inside an already running Ray, as in the pipeline flow, which starts
  Ray once for all stages (the Ray workers still import the stage in the timed run).
- 2 workers (starts Ray): Ray started and stopped inside the timed run, what the previous version of
  `conan clean` did.
- default: `workers=2` with the automatic choice (`conan_core.raymap.fanout_workers`).

The first size runs every configuration, the others (the growth run) in-process, 2 workers (local
processes), 2 workers (Ray running) and default. Each line carries the 1-minute load average before
and after it, since the machine may be shared; the ratios compare runs of the same invocation. A small
untimed clean first loads what the stage imports lazily, so the first configuration is not charged for it.

    .venv/bin/python bench/bench_clean.py --rows 100000
    .venv/bin/python bench/bench_clean.py --rows 100000,300000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conan_core.clean.config import CleanConfig
from conan_core.clean.stage import run_clean
from conan_core.io.catalog import catalog_entries, read_file
from conan_core.raymap import input_bytes

IN_PROCESS = "in-process (workers=0)"


def _perturb(text: str, rng: random.Random, copy: int) -> str:
    if copy == 0 or len(text) < 4:
        return text if copy == 0 else f"{text} {copy}"
    i = rng.randrange(len(text) - 1)
    choice = rng.random()
    if choice < 0.4:
        return text[:i] + text[i + 1:]  # drop a character: near duplicate
    if choice < 0.8:
        return text[:i] + text[i + 1] + text[i] + text[i + 2:]  # swap two: near duplicate
    return f"{text}（{copy}）"


def build_input(folder: Path, rows: int, files: int = 8) -> list[Path]:
    base = [r for group in ("pretrain_pairs", "finetune") for path, spec in catalog_entries(group)
            for r in read_file(path, spec).records if r["positive"]]
    rng = random.Random(0)
    out = [open(folder / f"part-{i}.jsonl", "w", encoding="utf-8") for i in range(files)]
    for n in range(rows):
        record = base[n % len(base)]
        copy = n // len(base)
        row = {"query": _perturb(record["query"], rng, copy), "title": record["positive"]}
        out[n % files].write(json.dumps(row, ensure_ascii=False) + "\n")
    for handle in out:
        handle.close()
    return [folder / f"part-{i}.jsonl" for i in range(files)]


def _ray() -> AbstractContextManager:
    from conan_core.raysession import ray_session

    return ray_session(num_cpus=2)


@dataclass(frozen=True)
class Config:
    workers: int
    min_fanout_bytes: int | None = 0  # None: the automatic rule
    context: Callable[[], AbstractContextManager] = nullcontext  # what the run happens in
    context_timed: bool = False  # whether entering and leaving it counts


CONFIGS = {
    IN_PROCESS: Config(0),
    "1 worker (local process)": Config(1),
    "2 workers (local processes)": Config(2),
    "2 workers (Ray running)": Config(2, context=_ray),
    "2 workers (starts Ray)": Config(2, context=_ray, context_timed=True),
    "default (workers=2, auto)": Config(2, None),
}
GROWTH = (IN_PROCESS, "2 workers (local processes)", "2 workers (Ray running)", "default (workers=2, auto)")


def _load() -> float:
    return os.getloadavg()[0]


def _timed_clean(spec: Config, inputs: list[Path], output: Path, config: CleanConfig) -> tuple[float, dict]:
    start = time.perf_counter()
    with spec.context() if spec.context_timed else nullcontext():
        manifest = run_clean(inputs, output, config, workers=spec.workers, progress=False,
                             min_fanout_bytes=spec.min_fanout_bytes)
    return time.perf_counter() - start, manifest


def run_config(label: str, inputs: list[Path], output: Path, rows: int, config: CleanConfig) -> dict[str, Any]:
    spec = CONFIGS[label]
    load_before = _load()
    with nullcontext() if spec.context_timed else spec.context():  # a running Ray starts outside the timing
        seconds, manifest = _timed_clean(spec, inputs, output, config)
    result = {"seconds": seconds, "manifest": manifest, "load": (load_before, _load())}
    counts = manifest["counts"]
    print(f"  {label:<30} {rows / seconds:8.0f} rows/s  {seconds:6.1f} s  kept {counts['kept']}, dropped "
          f"{counts['dropped']}  (load {result['load'][0]:.2f} -> {result['load'][1]:.2f})", flush=True)
    return result


def bench_size(rows: int, labels: tuple[str, ...], config: CleanConfig) -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        inputs = build_input(Path(tmp), rows)
        run_clean(inputs[:1], Path(tmp) / "warm-up", config, workers=0, progress=False)
        print(f"{rows} rows ({input_bytes(inputs) / 1e6:.1f} MB of JSON lines, {len(inputs)} files):", flush=True)
        results = {label: run_config(label, inputs, Path(tmp) / f"out{i}", rows, config)
                   for i, label in enumerate(labels)}
    outputs = {json.dumps([r["manifest"]["shards"], r["manifest"]["quarantine_shards"]]) for r in results.values()}
    assert len(outputs) == 1, f"{rows} rows: outputs differ between configurations"
    baseline = results[IN_PROCESS]["seconds"]
    for label, result in results.items():
        print(f"  ratio vs in-process: {label:<30} {baseline / result['seconds']:.2f}x")
    print("  identical output (data and quarantine shards, sha256) across configurations: yes", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="100000", help="comma-separated sizes; the first runs every configuration")
    parser.add_argument("--every-size", action="store_true",
                        help="every configuration at every size (where the automatic choice should switch)")
    args = parser.parse_args()
    sizes = [int(size) for size in args.rows.split(",")]
    config = CleanConfig(decontaminate=False)  # the default unit size
    print(f"cleaning bench: {os.cpu_count()} CPUs, units of {config.lines_per_unit} lines", flush=True)
    growth = {rows: bench_size(rows, tuple(CONFIGS) if i == 0 or args.every_size else GROWTH, config)
              for i, rows in enumerate(sizes)}
    if len(sizes) > 1:
        print("growth (rows/s per size; linear in rows = flat rows/s):")
        for label in GROWTH:
            rates = [rows / growth[rows][label]["seconds"] for rows in sizes]
            cells = "  ".join(f"{rows}: {rate:7.0f}" for rows, rate in zip(sizes, rates, strict=True))
            print(f"  {label:<30} {cells}   rows/s at {sizes[-1]} / at {sizes[0]}: {rates[-1] / rates[0]:.2f}")


if __name__ == "__main__":
    main()
