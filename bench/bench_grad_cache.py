"""Gradient caching at large batches: peak RSS and seconds per step, plain step vs GradCache.

One pretraining step as training runs it (`train_step` over a `PretrainWorkload`, one worker, as in
bench_train_step.py) with the shipped model (all-MiniLM-L6-v2, fp32 on CPU), on pairs of random vocabulary
words that fill 64 tokens, at batch 32, 128 and 512 pairs (queries and positives are two encode calls of
`batch` texts each), plain vs `grad_cache_chunk` 32. Each configuration runs in a fresh subprocess; its
peak RSS is `getrusage(RUSAGE_SELF).ru_maxrss` read after its steps (the resident memory of the whole
process, torch's allocations included: tracemalloc would see Python's only). The RSS before the first
step (model loaded, data tokenised) is printed too, so the step's own share is visible. Prints a table and
the GradCache / plain ratios of peak RSS and of seconds per step.

    .venv/bin/python bench/bench_grad_cache.py [--batches 32,128,512] [--chunk 32] [--steps 2]
        [--warmup 1] [--threads N] [--model DIR] [--device cpu|cuda]

Memory: the plain step keeps the activations of all 2 x batch texts; at batch 512 that is ~15 GB on CPU
in fp32 (MiniLM-L6, 64 tokens), so check free memory first. On cuda (bf16 autocast) the peak of
torch.cuda.max_memory_allocated is printed as well.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("CONAN_WORK_DIR", tempfile.mkdtemp(prefix="bench-work-"))
from conan_core.paths import offline_env  # noqa: E402

offline_env()

import torch  # noqa: E402

MAX_LEN = 64
WORDS_PER_TEXT = 80  # more than 64 tokens' worth: every text is truncated to exactly MAX_LEN


def make_pairs(n: int, vocab: list[str], seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choices(vocab, k=WORDS_PER_TEXT)), " ".join(rng.choices(vocab, k=WORDS_PER_TEXT)))
            for _ in range(n)]


def rss_mb() -> float:
    """Current resident set size (Linux /proc), MB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def write_pairs(pairs: list[tuple[str, str]]) -> Path:
    from conan_core.io.dataset import write_dataset
    from conan_core.schema import make_record, records_table

    data = Path(tempfile.mkdtemp(prefix="bench-data-"))
    records = [make_record(kind="pair", query=q, positive=p, source="bench", lang="en") for q, p in pairs]
    write_dataset(data, records_table(records), None, config={}, inputs=[], counts={})
    return data


def vocabulary(model) -> list[str]:
    return sorted(w for w in model.tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2)


def run_child(batch: int, chunk: int | None, steps: int, warmup: int, model_dir: str, device: str) -> dict:
    """One configuration in this (fresh) process: its seconds per step and memory, as a dict."""
    from bench_train_step import timed_steps  # the same clock as the step benchmark

    from conan_core.model import ConanEmbedder
    from conan_core.train.config import PretrainConfig
    from conan_core.train.loop import make_encoder, make_optimizer, train_step
    from conan_core.train.workload import PretrainWorkload

    model = ConanEmbedder.load(model_dir).float().to(device)
    model.train()
    data = write_pairs(make_pairs(batch * (steps + warmup), vocabulary(model)))
    config = PretrainConfig(batch_size=batch, max_length=MAX_LEN, lr=2e-5, steps=steps + warmup,
                            log_every=1000, checkpoint_every=1000, grad_cache_chunk=chunk)
    encode = make_encoder(model, config, torch.device(device))
    task = PretrainWorkload(config, [data], encode.bank, encode)
    optimizer = make_optimizer(model, config)
    before = rss_mb()
    times = timed_steps(lambda step: train_step(step, config.steps, config, model, optimizer, task, encode),
                        steps, warmup, device)
    out = {"batch": batch, "chunk": chunk, "seconds_per_step": statistics.median(times),
           "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}
    if device == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_config(args: argparse.Namespace, batch: int, chunk: int | None) -> dict:
    """Run one configuration in a fresh subprocess (its own peak RSS); None values when it failed."""
    command = [sys.executable, __file__, "--child", str(batch), str(chunk or 0), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--model", args.model, "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        print(f"  batch {batch} chunk {chunk}: failed (exit {done.returncode}) {tail[0]}", file=sys.stderr)
        return {"batch": batch, "chunk": chunk, "seconds_per_step": None, "rss_before_mb": None,
                "peak_rss_mb": None}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cell(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "failed"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def print_table(rows: list[tuple[dict, dict]], chunk: int, cuda: bool) -> None:
    gpu = " plain GPU MB | GC GPU MB |" if cuda else ""
    print(f"| batch | plain s/step | GradCache (chunk {chunk}) s/step | time GC/plain | RSS before step MB "
          f"| plain peak RSS MB | GC peak RSS MB | peak RSS GC/plain |{gpu}")
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if cuda else ""))
    for plain, cached in rows:
        line = (f"| {plain['batch']} | {_cell(plain['seconds_per_step'], '.2f')} "
                f"| {_cell(cached['seconds_per_step'], '.2f')} "
                f"| {_ratio(cached['seconds_per_step'], plain['seconds_per_step'])} "
                f"| {_cell(plain['rss_before_mb'], '.0f')} | {_cell(plain['peak_rss_mb'], '.0f')} "
                f"| {_cell(cached['peak_rss_mb'], '.0f')} | {_ratio(cached['peak_rss_mb'], plain['peak_rss_mb'])} |")
        if cuda:
            line += f" {_cell(plain.get('cuda_peak_mb'), '.0f')} | {_cell(cached.get('cuda_peak_mb'), '.0f')} |"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="32,128,512", help="pairs per step, comma-separated")
    parser.add_argument("--chunk", type=int, default=32, help="GradCache texts per chunk")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="model dir (default: the shipped one)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--child", nargs=2, type=int, metavar=("BATCH", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from conan_core.model import resolve_base

    model_dir = str(resolve_base(args.model))
    if args.child:
        batch, chunk = args.child
        print(json.dumps(run_child(batch, chunk or None, args.steps, args.warmup, model_dir, args.device)))
        return
    name, args.model = args.model, model_dir
    print(f"device {args.device}; torch {torch.__version__}; threads {args.threads or torch.get_num_threads()}; "
          f"model {name}; {MAX_LEN} tokens per text; {args.steps} timed step(s) after "
          f"{args.warmup} warmup; one fresh process per configuration")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        rows.append((run_config(args, batch, None), run_config(args, batch, args.chunk)))
    print_table(rows, args.chunk, args.device == "cuda")


if __name__ == "__main__":
    main()
