"""Cleaning throughput (rows/s, MinHash included): in-process pure Python vs 1 and 2 Ray workers.

Input: the shared data's pretraining and finetuning pairs, repeated with perturbations (a character
dropped or swapped, a suffix added) to at least --rows rows, written as 8 JSON-lines files. Each
configuration cleans the same files into its own dataset; wall time includes Ray start-up.

    .venv/bin/python bench/bench_clean.py --rows 100000
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from conan_core.clean.config import CleanConfig
from conan_core.clean.stage import run_clean
from conan_core.io.catalog import catalog_entries, read_file


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    config = CleanConfig(decontaminate=False, lines_per_unit=5_000)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = build_input(Path(tmp), args.rows)
        results = {}
        for label, workers in (("in-process (workers=0)", 0), ("ray 1 worker", 1), ("ray 2 workers", 2)):
            start = time.perf_counter()
            manifest = run_clean(inputs, Path(tmp) / f"out{workers}", config, workers=workers, progress=False)
            seconds = time.perf_counter() - start
            results[label] = (seconds, manifest)
            print(f"{label:<24} {args.rows / seconds:8.0f} rows/s  ({seconds:.1f} s, kept {manifest['counts']['kept']},"
                  f" dropped {manifest['counts']['dropped']})", flush=True)
    baseline = results["in-process (workers=0)"][0]
    shards = {label: r[1]["shards"] for label, r in results.items()}
    assert len({json.dumps(s) for s in shards.values()}) == 1, "outputs differ between configurations"
    for label, (seconds, _) in results.items():
        print(f"ratio vs in-process: {label:<24} {baseline / seconds:.2f}x")
    print("identical output across configurations: yes")


if __name__ == "__main__":
    main()
