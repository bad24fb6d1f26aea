"""Training speed as users run it: `conan train pretrain` / `conan train finetune` (the CLI, Ray Train) vs
sentence-transformers' `SentenceTransformerTrainer` on the same real Chinese data, in one run.

Data and start model: the quality bench's (`bench_quality.prepare` with configs/bench-quality.yaml: the
cleaned shared pretraining / finetuning sets and all-MiniLM-L6-v2 with its vocabulary extended; cached
under work/bench_quality, built there first if missing). Every side trains at max length 64 with a global
batch of 32 pairs; each runs in its own process so peak RSS is its own.

- conan pretrain: in-batch InfoNCE, `--workers 1` (the shipped bench layout: one Ray Train worker with
  both threads) and `--workers 2` (what Ray offers here: two workers of one thread, gradients all-reduced).
- ST MNRL: `MultipleNegativesRankingLoss`, batch 32, `NO_DUPLICATES` (the same pairs as conan's).
- ST CachedMNRL: `CachedMultipleNegativesRankingLoss` at batch 128 (mini-batch 32): the large-batch way.
- conan finetune (CBB: 32 queries + positives + 2 hard negatives each, and 32 STS pairs per step) vs ST
  MNRL on (anchor, positive, 2 negatives) triplets at batch 32: compared in texts encoded per second.

Per side: pairs/s (texts/s for finetune) over the steps after the first `--warmup`, the ratio to ST MNRL,
MFU (training FLOPs of the real tokens, from the model's shape, over the fp32 matmul FLOP/s measured in
this run; the same dataset-mean tokens per text for every side) and peak RSS (conan: the rank-0 training
worker; ST: its process).

With `--bf16`, pretraining also runs both sides in bf16 autocast on the CPU (conan: `cpu_bf16=true`; ST:
`bf16=True`), their MFU against the bf16 matmul rate measured in this run.

    .venv/bin/python bench/bench_train.py [--steps 30] [--warmup 3] [--skip-finetune] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benches
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_quality import prepare, step_clock, training_pairs  # noqa: E402
from bench_train_step import matmul_flops, step_flops  # noqa: E402

from conan_core.config import load_config  # noqa: E402
from conan_core.io.dataset import read_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "bench-quality.yaml"
MAX_LEN, BATCH = 64, 32


# ---- one side per process --------------------------------------------------------------------------
def run_conan(stage: str, data: list[Path], model: Path, out: Path, steps: int, workers: int,
              batch_per_worker: int | None, bf16: bool = False) -> dict[str, Any]:
    """`conan train <stage>` as a user launches it; step times and RSS from its metrics.jsonl."""
    command = [str(Path(sys.executable).parent / "conan"), "train", stage, "--model", str(model), "--out", str(out),
               "--config", str(CONFIG), "--steps", str(steps), "--workers", str(workers)]
    for directory in data:
        command += ["--data", str(directory)]
    if batch_per_worker is not None:
        command += ["--batch-size", str(batch_per_worker)]
    command += ["--set", "checkpoint_every=1000"]  # a step, not a checkpoint, is timed (saves are not in it)
    if bf16:
        command += ["--set", "cpu_bf16=true"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_times": [r["step_seconds"] for r in rows],
            "rss_mb": max(r.get("rss_peak_mb", 0.0) for r in rows), "wall_s": wall}


def run_st_child(kind: str, pairs_file: Path, model: Path, steps: int, batch: int, bf16: bool = False
                 ) -> dict[str, Any]:
    """A sentence-transformers side in its own process (its peak RSS is then its own)."""
    command = [sys.executable, __file__, "--child", kind, "--pairs-file", str(pairs_file), "--model", str(model),
               "--steps", str(steps), "--batch", str(batch)] + (["--bf16"] if bf16 else [])
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def st_child(kind: str, pairs_file: Path, model_dir: Path, steps: int, batch: int, bf16: bool) -> None:
    """Train with SentenceTransformerTrainer for `steps`; print {step_times, rss_mb} as the last line."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )

    columns = json.loads(pairs_file.read_text())
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = MAX_LEN
    loss = (CachedMultipleNegativesRankingLoss(model, mini_batch_size=BATCH) if kind == "cached"
            else MultipleNegativesRankingLoss(model))
    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps, learning_rate=5e-5,
            warmup_steps=0.1, batch_sampler=BatchSamplers.NO_DUPLICATES, report_to="none", save_strategy="no",
            use_cpu=True, bf16=bf16, dataloader_drop_last=True, seed=0, logging_steps=1000)
        clock = step_clock()
        SentenceTransformerTrainer(model=model, args=args, loss=loss, callbacks=[clock],
                                   train_dataset=Dataset.from_dict(columns)).train()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_times": clock.times, "rss_mb": rss}))


# ---- data for the ST sides -------------------------------------------------------------------------
def finetune_triplets(directory: Path, limit: int = 20_000) -> dict[str, list[str]]:
    """(anchor, positive, negative_1, negative_2) from the finetune set's retrieval rows with 2+ negatives."""
    columns: dict[str, list[str]] = {"anchor": [], "positive": [], "negative_1": [], "negative_2": []}
    for row in read_dataset(directory).to_pylist():
        if row["kind"] == "retrieval" and row["positive"] and len(row["negatives"]) >= 2:
            for name, text in zip(columns, [row["query"], row["positive"], *row["negatives"][:2]], strict=False):
                columns[name].append(text)
        if len(columns["anchor"]) >= limit:
            break
    return columns


def tokens_per_text(model_dir: Path, texts: list[str]) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_LEN)["input_ids"]]
    return statistics.mean(lengths)


# ---- report ----------------------------------------------------------------------------------------
def rate(result: dict[str, Any], per_step: float, warmup: int) -> float:
    times = result["step_times"][warmup:] or result["step_times"]
    return per_step / statistics.mean(times)


def line(name: str, per_s: float, baseline: float, unit: str, mfu: float, rss: float) -> str:
    return (f"| {name} | {per_s:.1f} {unit}/s | {per_s / baseline:.2f}x | {100 * mfu:.0f}% | {rss:,.0f} MB |")


def flops_per_text(tokens: float) -> float:
    return step_flops([round(tokens)], layers=6, hidden=384, inter=1536)  # all-MiniLM-L6-v2's shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="also pretrain both sides in CPU bf16 autocast")
    parser.add_argument("--child", choices=["mnrl", "cached"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        st_child(args.child, args.pairs_file, args.model, args.steps, args.batch, args.bf16)
        return
    paths = prepare(load_config(str(CONFIG)), ROOT / "work" / "bench_quality")
    peak = matmul_flops("cpu", bf16=False)
    print(f"fp32 matmul peak here: {peak / 1e9:.0f} GFLOP/s; steps {args.steps} (first {args.warmup} not timed)")
    bf16_peak = matmul_flops("cpu", bf16=True) if args.bf16 else None
    if bf16_peak is not None:
        print(f"bf16 matmul peak here: {bf16_peak / 1e9:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        pretrain_rows(paths, work, args, peak, bf16_peak)
        if not args.skip_finetune:
            finetune_rows(paths, work, args, peak)


def pretrain_rows(paths: dict[str, Path], work: Path, args: argparse.Namespace, peak: float,
                  bf16_peak: float | None) -> None:
    """Each side's (result, batch, the matmul peak its MFU is against: bf16 rows against the bf16 one)."""
    anchors, positives = training_pairs([paths["pretrain"], paths["llm"]], sts_min_score=4.0)
    pairs_file = work / "pairs.json"
    pairs_file.write_text(json.dumps({"anchor": anchors, "positive": positives}, ensure_ascii=False))
    tokens = tokens_per_text(paths["init"], anchors[:5000] + positives[:5000])
    pair_flops = 2 * flops_per_text(tokens)
    data = [paths["pretrain"], paths["llm"]]
    results = {
        "ST MNRL (batch 32)": (run_st_child("mnrl", pairs_file, paths["init"], args.steps, BATCH), BATCH, peak),
        "ST CachedMNRL (batch 128)": (run_st_child("cached", pairs_file, paths["init"], max(6, args.steps // 3),
                                                   4 * BATCH), 4 * BATCH, peak),
        "conan train pretrain, 1 worker": (run_conan("pretrain", data, paths["init"], work / "c1", args.steps, 1,
                                                     BATCH), BATCH, peak),
        "conan train pretrain, 2 workers": (run_conan("pretrain", data, paths["init"], work / "c2", args.steps, 2,
                                                      BATCH // 2), BATCH, peak),
    }
    if bf16_peak is not None:
        results["ST MNRL (batch 32), bf16"] = (
            run_st_child("mnrl", pairs_file, paths["init"], args.steps, BATCH, bf16=True), BATCH, bf16_peak)
        results["conan train pretrain, 1 worker, cpu_bf16"] = (
            run_conan("pretrain", data, paths["init"], work / "c1b", args.steps, 1, BATCH, bf16=True), BATCH,
            bf16_peak)
    baseline = rate(results["ST MNRL (batch 32)"][0], BATCH, args.warmup)
    print(f"\n## Pretraining: pairs/s at max length 64 ({tokens:.1f} real tokens per text, dataset mean)\n")
    print("| side | throughput | vs ST MNRL | MFU | peak RSS |\n|---|---:|---:|---:|---:|")
    for name, (result, batch, row_peak) in results.items():
        per_s = rate(result, batch, args.warmup)
        print(line(name, per_s, baseline, "pairs", per_s * pair_flops / row_peak, result["rss_mb"]))
    for name, (result, _, _) in results.items():
        if "wall_s" in result:
            print(f"{name}: wall {result['wall_s']:.0f} s for {len(result['step_times'])} steps "
                  f"(Ray start-up, data loading and the model save included)")


def cbb_texts_per_step(finetune: Any) -> int:
    """Texts one CBB step encodes: the group's queries and positives, every group rank's hard negatives per
    query, and both sides of every STS rank's pairs."""
    layout = finetune.layout
    negatives = layout.retrieval_group * finetune.negatives_per_rank
    return finetune.retrieval_batch * (2 + negatives) + 2 * finetune.sts_batch * layout.sts_workers


def finetune_rows(paths: dict[str, Path], work: Path, args: argparse.Namespace, peak: float) -> None:
    triplets = finetune_triplets(paths["finetune"])
    triplets_file = work / "triplets.json"
    triplets_file.write_text(json.dumps(triplets, ensure_ascii=False))
    tokens = tokens_per_text(paths["init"], [t for column in triplets.values() for t in column[:2000]])
    text_flops = flops_per_text(tokens)
    st = run_st_child("mnrl", triplets_file, paths["init"], args.steps, BATCH)
    conan = run_conan("finetune", [paths["finetune"]], paths["init"], work / "f1", args.steps, 1, None)
    st_texts = rate(st, 4 * BATCH, args.warmup)  # anchor + positive + 2 negatives
    conan_per_step = cbb_texts_per_step(load_config(str(CONFIG)).finetune)
    conan_texts = rate(conan, conan_per_step, args.warmup)
    print(f"\n## Finetuning: texts/s ({tokens:.1f} real tokens per text, dataset mean of the triplets)\n")
    print("| side | throughput | vs ST MNRL | MFU | peak RSS |\n|---|---:|---:|---:|---:|")
    print(line("ST MNRL triplets (32 x 4 texts)", st_texts, st_texts, "texts", st_texts * text_flops / peak,
               st["rss_mb"]))
    print(line(f"conan train finetune, CBB, 1 worker ({conan_per_step} texts)", conan_texts, st_texts, "texts",
               conan_texts * text_flops / peak, conan["rss_mb"]))


if __name__ == "__main__":
    main()
