"""Quality and ablation benchmark (issue #7): one script, one fixed budget, on the shared eval sets.

Table 1: the base model (all-MiniLM-L6-v2 after vocabulary extension) vs our pipeline's model (pretrain +
CBB finetune with dynamic hard-negative mining) vs sentence-transformers MultipleNegativesRankingLoss
trained on the same data (every (query, positive) our pipeline trains on) for the same number of steps.

Table 2: the paper's ablation at our scale, all four finetuned from the same pretrained checkpoint with the
same steps: vanilla (one random task per step, fixed negatives), +CBB, +DHNM, both.

    .venv/bin/python bench/bench_quality.py --config configs/bench-quality.yaml --out work/bench_quality

Data stages, model init and mining are cached in --out (rerunning skips what exists). Every number printed
is measured in this run; nothing is copied from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from conan_core.paths import offline_env

offline_env()

from conan_core.clean.stage import run_clean  # noqa: E402
from conan_core.config import PipelineConfig, load_config  # noqa: E402
from conan_core.eval.config import EvalConfig  # noqa: E402
from conan_core.eval.report import summarize  # noqa: E402
from conan_core.eval.run import run_eval  # noqa: E402
from conan_core.eval.tasks import resolve_task_names  # noqa: E402
from conan_core.extract import run_extract  # noqa: E402
from conan_core.io.dataset import read_dataset  # noqa: E402
from conan_core.mining.pool import run_mine  # noqa: E402
from conan_core.model_init import init_model  # noqa: E402
from conan_core.train.trainer import run_finetune, run_pretrain  # noqa: E402
from flows.plan import input_files, resolve_input  # noqa: E402

BAR = {"LCQMC": 0.434, "STSB": 0.648}  # sentence-transformers MNRL, 560 steps, 37 min (DEVELOPERS.md)
PAPER_ABLATION = {"vanilla": 68.8, "+CBB": 70.4, "+DHNM": 71.2, "CBB+DHNM": 72.62}


def _once(marker: Path, build) -> Any:
    """Run `build` unless `marker` exists (data stages and model init are shared by every variant)."""
    if not marker.exists():
        build()
    return marker


def prepare(config: PipelineConfig, out: Path) -> dict[str, Path]:
    data = config.data
    paths = {"pretrain": out / "data" / "pretrain", "finetune": out / "data" / "finetune",
             "llm": out / "data" / "llm_pairs", "init": out / "models" / "init", "candidates": out / "candidates"}
    _once(paths["pretrain"] / "manifest.json", lambda: run_clean(
        [Path(resolve_input(i)) for i in data.pretrain], paths["pretrain"], config.clean, workers=data.workers))
    _once(paths["finetune"] / "manifest.json", lambda: run_clean(
        [Path(resolve_input(i)) for i in data.finetune], paths["finetune"], config.clean, workers=data.workers))
    _once(paths["llm"] / "manifest.json", lambda: run_extract(
        [Path(resolve_input(i)) for i in data.instruct], paths["llm"], config.extract, workers=data.workers))
    model = config.model
    _once(paths["init"] / "modules.json", lambda: init_model(
        model.base, paths["init"], pooling=model.pooling, expand_dim=model.expand_dim,
        matryoshka_dims=model.matryoshka_dims, max_seq_length=model.max_seq_length,
        extend_vocab_from=[str(p) for p in input_files(model.extend_vocab_from)],
        vocab_min_freq=model.vocab_min_freq, vocab_max_new=model.vocab_max_new))
    _once(paths["candidates"] / "manifest.json", lambda: run_mine(
        paths["init"], paths["finetune"], paths["candidates"], config.mining, workers=config.mining.workers))
    return paths


def training_pairs(dirs: list[Path], sts_min_score: float) -> tuple[list[str], list[str]]:
    """Every (query, positive) of the datasets, as MNRL sees data: pairs, retrieval positives, and STS
    pairs scored at least `sts_min_score` (of a 0-5 scale; 0/1 pair labels: 1)."""
    anchors, positives = [], []
    for directory in dirs:
        rows = read_dataset(directory).to_pylist()
        top_score: dict[str, float] = {}  # each source's scale: 0/1 labels or 0-5 scores
        for row in rows:
            if row["kind"] == "sts" and row["score"] is not None:
                top_score[row["source"]] = max(top_score.get(row["source"], 0.0), row["score"])
        for row in rows:
            if not row["positive"]:
                continue
            if row["kind"] == "sts":
                top = 1.0 if top_score.get(row["source"], 0.0) <= 1.0 else 5.0
                if row["score"] is None or row["score"] < sts_min_score * top / 5.0:
                    continue
            anchors.append(row["query"])
            positives.append(row["positive"])
    return anchors, positives


def train_mnrl(model_dir: Path, anchors: list[str], positives: list[str], steps: int, batch: int,
               lr: float, max_length: int, out: Path) -> float:
    """sentence-transformers' own trainer and loss: the baseline as its users run it."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = max_length
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st_trainer"), per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=lr, warmup_ratio=0.05, report_to="none", save_strategy="no", use_cpu=True,
        dataloader_drop_last=True, seed=0, logging_steps=50)
    started = time.perf_counter()
    SentenceTransformerTrainer(model=model, args=args, loss=MultipleNegativesRankingLoss(model),
                               train_dataset=Dataset.from_dict({"anchor": anchors, "positive": positives})).train()
    seconds = time.perf_counter() - started
    model.save(str(out / "model"))
    return seconds


BAR_TASKS = ["LCQMC-dev", "STSB"]


def evaluate(model_dir: Path, out_json: Path, eval_config: EvalConfig) -> dict[str, Any]:
    """The config's tasks with its caps, except the bar's tasks, which always run in full."""
    if out_json.exists():
        return json.loads(out_json.read_text())
    full = run_eval(model_dir, tasks=BAR_TASKS, task_dirs=[], output=out_json.with_suffix(".bar.json"),
                    config=eval_config.model_copy(update={"tasks": [], "max_pairs": None}))
    names = [t.name for t in resolve_task_names(eval_config.tasks or ["zh-default"]) if t.name not in BAR_TASKS]
    capped = run_eval(model_dir, tasks=names, task_dirs=[], output=out_json.with_suffix(".rest.json"),
                      config=eval_config.model_copy(update={"tasks": []}))
    result = summarize(full["model"], full["revision"], full["tasks"] + capped["tasks"])
    out_json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def step_seconds(run_dir: Path) -> float:
    """Time spent in training steps, from the run's metrics (correct also when a rerun resumed it)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    by_step = {row["step"]: row.get("step_seconds", 0.0) for row in map(json.loads, lines) if "step" in row}
    return sum(by_step.values())


def scores_of(result: dict[str, Any]) -> dict[str, float]:
    return {t["name"]: t["main_score"] for t in result["tasks"]}


def table(rows: list[tuple[str, dict[str, Any], float | None]], columns: list[str]) -> str:
    header = "| model | " + " | ".join(columns) + " | avg | train min |"  # ours: time in steps
    lines = [header, "|" + "---|" * (len(columns) + 3)]
    for name, result, seconds in rows:
        scores = scores_of(result)
        cells = [f"{scores[c]:.3f}" if c in scores else "-" for c in columns]
        minutes = f"{seconds / 60:.1f}" if seconds is not None else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['average']:.3f} | {minutes} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/bench-quality.yaml")
    parser.add_argument("--out", default="work/bench_quality")
    parser.add_argument("--skip-ablation", action="store_true")
    parser.add_argument("--skip-mnrl", action="store_true")
    args = parser.parse_args()
    config = load_config(args.config)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = prepare(config, out)
    print(f"data + init + mining ready in {time.perf_counter() - started:.0f} s", flush=True)

    results: dict[str, tuple[dict[str, Any], float | None]] = {}
    results["base (vocab-extended)"] = (evaluate(paths["init"], out / "eval" / "base.json", config.eval), None)

    pretrain_dir = out / "runs" / "pretrain"
    t0 = time.perf_counter()
    pretrained = run_pretrain(config.pretrain, [paths["pretrain"], paths["llm"]], paths["init"], pretrain_dir,
                              workers=config.workers)
    pretrain_seconds = step_seconds(pretrain_dir)
    print(f"pretrain: {pretrained.steps} steps, {pretrain_seconds:.0f} s in steps "
          f"({time.perf_counter() - t0:.0f} s wall this run)", flush=True)

    variants = {"CBB+DHNM": ("cbb", True)}
    if not args.skip_ablation:
        variants = {"vanilla": ("vanilla", False), "+CBB": ("cbb", False), "+DHNM": ("vanilla", True),
                    "CBB+DHNM": ("cbb", True)}
    ablation: dict[str, tuple[dict[str, Any], float]] = {}
    for name, (mode, dhnm) in variants.items():
        finetune_config = config.finetune.model_copy(update={"mode": mode, "dhnm": dhnm})
        run_dir = out / "runs" / f"finetune-{mode}-{'dhnm' if dhnm else 'fixed'}"
        t0 = time.perf_counter()
        tuned = run_finetune(finetune_config, [paths["finetune"]], pretrained.model_dir, run_dir,
                             candidates_dir=paths["candidates"], mining=config.mining, workers=config.workers)
        seconds = step_seconds(run_dir)
        print(f"finetune {name}: {tuned.steps} steps, {seconds:.0f} s in steps "
              f"({time.perf_counter() - t0:.0f} s wall this run)", flush=True)
        ablation[name] = (evaluate(tuned.model_dir, out / "eval" / f"{name}.json", config.eval), seconds)
    ours, ours_finetune_seconds = ablation["CBB+DHNM"]
    results["conan pipeline (pretrain + CBB + DHNM)"] = (ours, pretrain_seconds + ours_finetune_seconds)

    total_steps = pretrained.steps + config.finetune.steps
    if not args.skip_mnrl:
        anchors, positives = training_pairs([paths["pretrain"], paths["llm"], paths["finetune"]], sts_min_score=4.0)
        mnrl_dir = out / "runs" / "mnrl"
        seconds = train_mnrl(paths["init"], anchors, positives, total_steps, 32, config.pretrain.lr,
                             config.pretrain.max_length, mnrl_dir)
        print(f"MNRL: {total_steps} steps on {len(anchors)} pairs in {seconds:.0f} s", flush=True)
        results[f"sentence-transformers MNRL ({total_steps} steps, batch 32)"] = (
            evaluate(mnrl_dir / "model", out / "eval" / "mnrl.json", config.eval), seconds)

    columns = [t["name"] for t in results["base (vocab-extended)"][0]["tasks"]]
    report = ["## Table 1: base vs conan vs sentence-transformers MNRL", "",
              table([(n, r, s) for n, (r, s) in results.items()], columns), "",
              f"Bar (DEVELOPERS.md, MNRL 560 steps / 37 min on the reference data): LCQMC {BAR['LCQMC']}, "
              f"STSB {BAR['STSB']}.", ""]
    if not args.skip_ablation:
        report += ["## Table 2: ablation (finetuning from the same pretrained checkpoint, same steps)", "",
                   table([(n, r, s) for n, (r, s) in ablation.items()], columns), "",
                   "Paper (C-MTEB avg): " + ", ".join(f"{k} {v}" for k, v in PAPER_ABLATION.items()), ""]
    report.append(f"budget: pretrain {pretrained.steps} steps, finetune {config.finetune.steps} steps per variant, "
                  f"{config.workers} Ray workers; total wall {(time.perf_counter() - started) / 60:.1f} min")
    text = "\n".join(report)
    (out / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
