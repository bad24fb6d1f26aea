"""Training-step throughput: our step vs SentenceTransformerTrainer + MultipleNegativesRankingLoss.

Same pairs, same model (the shipped all-MiniLM-L6-v2), batch 32, max length 128, one worker (this
process, 2 threads on the reference machine), in one run. Prints pairs/s of both, the ratio, and MFU:
the step's achieved FLOP/s (forward + backward, real tokens only, counted from the model's shape)
divided by the fp32 matmul FLOP/s measured here in the same run.

    .venv/bin/python bench/bench_train_step.py [--steps 8] [--warmup 2] [--which short,long]
        [--threads 2] [--model DIR] [--device cpu|cuda] [--bf16]

On cuda, and on the CPU with --bf16 (ours: `cpu_bf16`; sentence-transformers: `bf16=True` with
`use_cpu`), both sides use bf16 autocast and MFU is against the bf16 matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("CONAN_WORK_DIR", tempfile.mkdtemp(prefix="bench-work-"))
from conan_core.paths import offline_env  # noqa: E402

offline_env()

import torch  # noqa: E402

BATCH, MAX_LEN = 32, 128


def make_pairs(kind: str, n: int, vocab: list[str]) -> list[tuple[str, str]]:
    """Random words from the model's vocab: short (10-30 words) or long (enough to fill 128 tokens)."""
    rng = random.Random(0)
    low, high = (10, 30) if kind == "short" else (160, 200)
    return [(" ".join(rng.choices(vocab, k=rng.randint(low, high))),
             " ".join(rng.choices(vocab, k=rng.randint(low, high)))) for _ in range(n)]


def matmul_flops(device: str, bf16: bool, seconds: float = 3.0) -> float:
    """Best matmul FLOP/s here (current torch threads) in fp32 or bf16; 2048^3 (CPU) / 8192^3 (GPU)."""
    size = 2048 if device == "cpu" else 8192
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def step_flops(lengths: list[int], layers: int, hidden: int, inter: int) -> float:
    """Training FLOPs of a BERT over sequences of these (real) lengths: 3x forward (backward = 2x).
    Forward per token per layer: 2*(4*h*h + 2*h*inter) for the projections and FFN, 4*L*h for attention."""
    forward = sum(n * layers * (2 * (4 * hidden * hidden + 2 * hidden * inter) + 4 * n * hidden) for n in lengths)
    return 3.0 * forward


def timed_steps(run_step: Callable[[int], None], steps: int, warmup: int, device: str,
                before: Callable[[int], None] | None = None) -> list[float]:
    """Seconds of each of `steps` calls of `run_step(step)` after `warmup` untimed ones (steps count from
    1); `before(step)`, if given, runs outside the clock; on cuda the clock waits for the device."""
    times = []
    for step in range(1, steps + warmup + 1):
        if before is not None:
            before(step)
        started = time.perf_counter()
        run_step(step)
        if device == "cuda":
            torch.cuda.synchronize()
        if step > warmup:
            times.append(time.perf_counter() - started)
    return times


def bench_ours(pairs: list[tuple[str, str]], steps: int, warmup: int, model_dir: str, device: str,
               bf16: bool, attention_dropout: float | None) -> tuple[list[float], list[float]]:
    """Seconds per step and FLOPs per step of our training step (the Ray worker's `train_step`)."""
    from conan_core.io.dataset import write_dataset
    from conan_core.model import ConanEmbedder, set_encoder_dropout
    from conan_core.schema import make_record, records_table
    from conan_core.train.config import PretrainConfig
    from conan_core.train.data import TokenBank
    from conan_core.train.loop import make_optimizer, train_step
    from conan_core.train.objective import StepEncoder
    from conan_core.train.workload import PretrainWorkload

    data = Path(tempfile.mkdtemp(prefix="bench-data-"))
    records = [make_record(kind="pair", query=q, positive=p, source="bench", lang="en") for q, p in pairs]
    write_dataset(data, records_table(records), None, config={}, inputs=[], counts={})
    config = PretrainConfig(batch_size=BATCH, max_length=MAX_LEN, lr=2e-5, steps=steps + warmup,
                            log_every=1000, checkpoint_every=1000,  # ST logs nothing either
                            attention_dropout=attention_dropout)
    model = ConanEmbedder.load(model_dir).float().to(device)
    set_encoder_dropout(model.encoder, config.hidden_dropout, config.attention_dropout)  # as train_loop does
    model.train()
    encode = StepEncoder(model, TokenBank(model.tokenizer, MAX_LEN), torch.device(device), bf16=bf16)
    task = PretrainWorkload(config, [data], encode.bank, encode)
    optimizer = make_optimizer(model, config)
    enc_cfg = model.encoder.config
    texts_of_step: dict[int, list[str]] = {}

    def note_texts(step: int) -> None:  # the batch the step is about to draw, for its FLOPs
        state = task.streams["pairs"].state_dict()
        batch = task.streams["pairs"].epoch_plan(state["epoch"])[state["index"]]
        texts_of_step[step] = [task.pairs.queries[i] for i in batch] + [task.pairs.positives[i] for i in batch]

    times = timed_steps(lambda step: train_step(step, config.steps, config, model, optimizer, task, encode),
                        steps, warmup, device, before=note_texts)
    flops = [step_flops(list(encode.bank.lengths(texts_of_step[step])), enc_cfg.num_hidden_layers,
                        enc_cfg.hidden_size, enc_cfg.intermediate_size)
             for step in range(warmup + 1, steps + warmup + 1)]
    return times, flops


def bench_sentence_transformers(pairs: list[tuple[str, str]], steps: int, warmup: int, model_dir: str,
                                device: str, bf16: bool, attention_dropout: float | None) -> list[float]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    from conan_core.model import set_encoder_dropout

    model = SentenceTransformer(model_dir, device=device).float()
    set_encoder_dropout(model[0].auto_model, attention=attention_dropout)  # the same math on both sides
    model.max_seq_length = MAX_LEN
    timer = Timer()
    out = tempfile.mkdtemp(prefix="bench-st-")
    args = Args(output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps + warmup, learning_rate=2e-5,
                report_to="none", save_strategy="no", use_cpu=device == "cpu", bf16=bf16,
                dataloader_drop_last=True, seed=0,
                logging_strategy="no")
    dataset = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
    SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                               loss=MultipleNegativesRankingLoss(model), callbacks=[timer]).train()
    return timer.times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--which", default="short,long")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="model dir (default: the shipped one)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="CPU: bf16 autocast on both sides (always on cuda)")
    parser.add_argument("--attention-dropout", type=float, default=None,
                        help="attention dropout on both sides (default: the model's, 0.1); 0 runs SDPA fused")
    args = parser.parse_args()
    bf16 = args.bf16 or args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    from conan_core.model import ConanEmbedder, resolve_base

    model_dir = str(resolve_base(args.model))
    vocab = [w for w in ConanEmbedder.load(model_dir).tokenizer.get_vocab()
             if w.isalpha() and w.isascii() and len(w) > 2]
    vocab.sort()
    peak = matmul_flops(args.device, bf16)
    kind = "bf16" if bf16 else "fp32"
    print(f"device {args.device}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{kind} matmul peak {peak / 1e9:.1f} GFLOP/s")
    for kind in args.which.split(","):
        pairs = make_pairs(kind, BATCH * (args.steps + args.warmup) * 2, vocab)
        st_times = bench_sentence_transformers(pairs, args.steps, args.warmup, model_dir, args.device, bf16,
                                               args.attention_dropout)
        our_times, our_flops = bench_ours(pairs, args.steps, args.warmup, model_dir, args.device, bf16,
                                          args.attention_dropout)
        st_rate = BATCH / statistics.median(st_times)
        our_rate = BATCH / statistics.median(our_times)
        achieved = statistics.median(f / t for f, t in zip(our_flops, our_times, strict=True))
        print(f"[{kind} pairs] sentence-transformers MNRL: {st_rate:.2f} pairs/s "
              f"({statistics.median(st_times):.3f} s/step) | ours: {our_rate:.2f} pairs/s "
              f"({statistics.median(our_times):.3f} s/step) | ratio {our_rate / st_rate:.2f}x | "
              f"our achieved {achieved / 1e9:.1f} GFLOP/s = MFU {achieved / peak:.1%}")


if __name__ == "__main__":
    main()
