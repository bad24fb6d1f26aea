"""Quality benchmark (issue #10): conan vs sentence-transformers MNRL from the same start model, same data,
same training wall-clock; and the CBB / DHNM ablation over seeds.

Table 1 (default invocation; budget ~75 min on 2 cores, of which ~2 x 25 min of training):
  (a) the `conan model init` start model (all-MiniLM-L6-v2, vocabulary extended), untrained;
  (c) the conan pipeline: pretrain -> mine hard negatives with the *pretrained* model -> CBB + DHNM finetune
      (step counts from the config); its training time is the seconds spent in training steps (the runs'
      `step_seconds` metrics, pretrain + finetune: no Ray start, model load or checkpoint writes);
  (b) sentence-transformers `SentenceTransformerTrainer` + `MultipleNegativesRankingLoss` (batch 32,
      `BatchSamplers.NO_DUPLICATES`, lr 5e-5, linear schedule with 10 % warmup, max_seq_length = the
      pretrain max_length) from the same start model on the same cleaned pairs, given (c)'s training
      seconds: an 8-step probe measures its seconds per step, max_steps = budget / that, so the linear
      schedule completes; a callback also stops it once its step time exceeds the budget by 10 %.
All three are scored by one evaluator: the config's tasks (zh-default), LCQMC-dev, STSB and
CMRC2018TrialRetrieval (the goal tasks) in full, the others with the config's caps. It prints every task,
the average, (c) - (b) and (c) - (a), the issue's goal checks (PASS/FAIL, measured), and the DHNM evidence
of (c)'s finetune run (its hardness.jsonl: checks, negatives replaced, mean negative score around each
replacement, paper Fig. 2).

Table 2 (`--ablation`, instead of table 1): vanilla / +CBB / +DHNM / CBB+DHNM, each finetuned from the
same pretrained checkpoint (the one of table 1, trained here if missing) with the same steps
(`--ablation-steps`), for each of `--seeds` seeds (0, 1, ...); scored on LCQMC-dev and STSB capped at
`--ablation-max-pairs` pairs and on CMRC2018TrialRetrieval with the eval caps; mean and spread (max - min
over seeds) per task and average, and per idea whether its gain over vanilla exceeds the spread.

    .venv/bin/python bench/bench_quality.py --config configs/bench-quality.yaml --out work/bench_quality
    .venv/bin/python bench/bench_quality.py --config configs/bench-quality.yaml --out work/bench_quality --ablation
    .venv/bin/python bench/bench_quality.py --smoke               # end to end in minutes: small data, few steps
    .venv/bin/python bench/bench_quality.py --smoke --ablation    # (out dir work/bench_quality_smoke)

`--skip-mnrl` leaves (b) out. Data stages and the start model are cached in --out (delete the dir after
changing data or model settings); training runs, mining and evaluations are cached under a key of their
settings and rerun when those change. report.md (table 1) / report-ablation.md go to --out. Every number
printed is measured in this run or read from this --out's cached runs; nothing is copied from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conan_core.paths import offline_env, shared_data_dir

offline_env()

from conan_core.clean.stage import run_clean  # noqa: E402
from conan_core.config import PipelineConfig, load_config  # noqa: E402
from conan_core.eval.config import EvalConfig  # noqa: E402
from conan_core.eval.report import summarize  # noqa: E402
from conan_core.eval.run import run_eval  # noqa: E402
from conan_core.eval.tasks import resolve_task_names  # noqa: E402
from conan_core.extract import run_extract  # noqa: E402
from conan_core.io.dataset import read_dataset  # noqa: E402
from conan_core.mining.run import run_mine  # noqa: E402
from conan_core.model_init import init_model  # noqa: E402
from conan_core.raysession import ray_session  # noqa: E402
from conan_core.train.trainer import run_finetune, run_pretrain  # noqa: E402
from flows.plan import input_files, resolve_input  # noqa: E402

GOAL_TASKS = ["LCQMC-dev", "STSB", "CMRC2018TrialRetrieval"]  # scored in full (except with --smoke)
# The ablation's tasks: the two STS bars and the retrieval task (CBB and DHNM are retrieval ideas), the
# latter with the eval caps.
FAST_TASKS = ["LCQMC-dev", "STSB", "CMRC2018TrialRetrieval"]
GOAL_MARGIN = 0.03  # (c) average >= (b) average + 3 points
GOAL_FLOORS = {"LCQMC-dev": 0.50, "STSB": 0.72}
MNRL_BATCH, MNRL_LR, MNRL_WARMUP, MNRL_OVERRUN = 32, 5e-5, 0.1, 1.10
PROBE_STEPS = 8
ABLATION = {"vanilla": ("vanilla", False), "+CBB": ("cbb", False), "+DHNM": ("vanilla", True),
            "CBB+DHNM": ("cbb", True)}
PAPER_ABLATION = {"vanilla": 68.8, "+CBB": 70.4, "+DHNM": 71.2, "CBB+DHNM": 72.62}  # C-MTEB avg, 35 tasks

# --smoke: the first rows of small files (written under <out>/smoke_inputs), few steps, tiny eval caps.
SMOKE_FILES = {"pretrain": [("pairs/csl_title_keywords_abstract/ts/dev.tsv", 1000)],
               "instruct": [("instruct/belle_open_source_1k/Belle_open_source_1k.jsonl", 1000)],
               "finetune": [("pairs/text2vec_bge_zh/bge_finetune_data.jsonl", 400),
                            ("eval/chinese_stsb/train.txt", 1000)]}
SMOKE_OVERRIDES: dict[str, Any] = {
    "pretrain.steps": 4, "pretrain.checkpoint_every": 2, "finetune.steps": 4, "finetune.checkpoint_every": 2,
    "mining.dhnm.check_every": 1, "eval.max_pairs": 150, "eval.max_docs": 150, "eval.max_queries": 30,
    "eval.tasks": [*GOAL_TASKS, "ATEC"],
}
SMOKE_PROBE_STEPS, SMOKE_ABLATION_STEPS, SMOKE_ABLATION_MAX_PAIRS = 3, 2, 200


def smoke_overrides(out: Path) -> dict[str, Any]:
    """SMOKE_OVERRIDES plus data inputs: the first rows of SMOKE_FILES, copied to <out>/smoke_inputs."""
    folder = out / "smoke_inputs"
    folder.mkdir(parents=True, exist_ok=True)
    inputs: dict[str, list[str]] = {}
    for stage, files in SMOKE_FILES.items():
        for relative, rows in files:
            target = folder / Path(relative).name
            if not target.exists():
                with open(shared_data_dir() / relative, encoding="utf-8") as source:
                    target.write_text("".join(line for _, line in zip(range(rows), source, strict=False)),
                                      encoding="utf-8")
            inputs.setdefault(stage, []).append(str(target))
    return {**SMOKE_OVERRIDES, **{f"data.{k}": v for k, v in inputs.items()},
            "model.extend_vocab_from": [f for files in inputs.values() for f in files]}


# ---- caching --------------------------------------------------------------------------------------
def _once(marker: Path, build: Callable[[], Any]) -> Path:
    """Run `build` unless `marker` exists (data stages and model init are shared by every variant)."""
    if not marker.exists():
        build()
    return marker


def cached_run(run_dir: Path, key: dict[str, Any], build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`build()`'s info, cached in `run_dir` under `key`: a finished run with the same key is reused, an
    unfinished one is continued (Ray Train resumes from its checkpoint), another key's run is deleted."""
    key_file, done_file = run_dir / "bench_key.json", run_dir / "bench_done.json"
    key = json.loads(json.dumps(key, default=str))
    if key_file.exists() and json.loads(key_file.read_text()) != key:
        shutil.rmtree(run_dir)
    if done_file.exists():
        return json.loads(done_file.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(key, indent=1))
    info = build()
    done_file.write_text(json.dumps(info, indent=1, default=str))
    return info


# ---- data and start model -------------------------------------------------------------------------
def prepare(config: PipelineConfig, out: Path) -> dict[str, Path]:
    data = config.data
    paths = {"pretrain": out / "data" / "pretrain", "finetune": out / "data" / "finetune",
             "llm": out / "data" / "llm_pairs", "init": out / "models" / "init"}
    _once(paths["pretrain"] / "manifest.json", lambda: run_clean(
        [Path(resolve_input(i)) for i in data.pretrain], paths["pretrain"], config.clean, workers=data.workers))
    _once(paths["finetune"] / "manifest.json", lambda: run_clean(
        [Path(resolve_input(i)) for i in data.finetune], paths["finetune"], config.clean, workers=data.workers))
    _once(paths["llm"] / "manifest.json", lambda: run_extract(
        [Path(resolve_input(i)) for i in data.instruct], paths["llm"], config.extract, workers=data.workers))
    model = config.model
    extra = {"vocab_init": model.vocab_init} if hasattr(model, "vocab_init") else {}
    _once(paths["init"] / "modules.json", lambda: init_model(
        model.base, paths["init"], pooling=model.pooling, expand_dim=model.expand_dim,
        matryoshka_dims=model.matryoshka_dims, max_seq_length=model.max_seq_length,
        extend_vocab_from=[str(p) for p in input_files(model.extend_vocab_from)],
        vocab_min_freq=model.vocab_min_freq, vocab_max_new=model.vocab_max_new, **extra))
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


# ---- conan training -------------------------------------------------------------------------------
def step_seconds(run_dir: Path) -> float:
    """Time spent in training steps, from the run's metrics (correct also when a rerun resumed it)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    by_step = {row["step"]: row.get("step_seconds", 0.0) for row in map(json.loads, lines) if "step" in row}
    return sum(by_step.values())


def pretrain(config: PipelineConfig, paths: dict[str, Path], out: Path) -> dict[str, Any]:
    run_dir = out / "runs" / "pretrain"
    key = {"pretrain": config.pretrain.model_dump(mode="json"), "workers": config.workers,
           "data": [str(paths["pretrain"]), str(paths["llm"])], "init": str(paths["init"])}

    def build() -> dict[str, Any]:
        result = run_pretrain(config.pretrain, [paths["pretrain"], paths["llm"]], paths["init"], run_dir,
                              workers=config.workers)
        return {"model_dir": str(result.model_dir), "steps": result.steps, "seconds": step_seconds(run_dir)}

    info = cached_run(run_dir, key, build)
    info["key"] = key
    return info


def mine_with(model_dir: Path, model_key: dict[str, Any], config: PipelineConfig, paths: dict[str, Path],
              out_dir: Path) -> dict[str, Any]:
    """Initial hard negatives for the finetune data, mined with `model_dir` (the pretrained model)."""
    key = {"model": model_key, "mining": config.mining.model_dump(mode="json", exclude={"dhnm"})}

    def build() -> dict[str, Any]:
        started = time.perf_counter()
        manifest = run_mine(model_dir, paths["finetune"], out_dir, config.mining)
        return {"dir": str(out_dir), "seconds": time.perf_counter() - started,
                "counts": manifest.get("counts") if isinstance(manifest, dict) else None}

    return cached_run(out_dir, key, build)


def finetune(config: PipelineConfig, paths: dict[str, Path], pretrained: dict[str, Any], candidates: Path,
             run_dir: Path, **update: Any) -> dict[str, Any]:
    finetune_config = config.finetune.model_copy(update=update)
    key = {"finetune": finetune_config.model_dump(mode="json"), "pretrain": pretrained["key"],
           "mining": config.mining.model_dump(mode="json"), "workers": config.workers}

    def build() -> dict[str, Any]:
        result = run_finetune(finetune_config, [paths["finetune"]], pretrained["model_dir"], run_dir,
                              candidates_dir=candidates, mining=config.mining, workers=config.workers)
        return {"model_dir": str(result.model_dir), "steps": result.steps, "seconds": step_seconds(run_dir)}

    return cached_run(run_dir, key, build)


# ---- sentence-transformers MNRL -------------------------------------------------------------------
def steps_for_budget(budget_s: float, seconds_per_step: float) -> int:
    """Steps that fit the budget at the probed speed (at least 1)."""
    return max(1, int(budget_s / seconds_per_step)) if seconds_per_step > 0 else 1


def step_clock(stop_after_s: float | None = None) -> Any:
    """A SentenceTransformerTrainer callback timing each step (on_step_begin -> on_step_end) in `.times`;
    it stops training once the steps took `stop_after_s` seconds in all."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            self.times.append(time.perf_counter() - self._start)
            if stop_after_s is not None and sum(self.times) > stop_after_s:
                control.should_training_stop = True

    return StepClock()


def train_mnrl(model_dir: Path, anchors: list[str], positives: list[str], *, steps: int, max_length: int,
               out: Path, stop_after_s: float | None, save: bool = True) -> dict[str, Any]:
    """sentence-transformers' own trainer and loss, as its users run it. Returns the time in its steps
    (per step: callback on_step_begin -> on_step_end) and the steps done."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )

    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = max_length
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st_trainer"), per_device_train_batch_size=MNRL_BATCH, max_steps=steps,
        learning_rate=MNRL_LR, warmup_steps=MNRL_WARMUP, lr_scheduler_type="linear",
        batch_sampler=BatchSamplers.NO_DUPLICATES, report_to="none", save_strategy="no", use_cpu=True,
        dataloader_drop_last=True, seed=0, logging_steps=50)
    clock = step_clock(stop_after_s)
    SentenceTransformerTrainer(model=model, args=args, loss=MultipleNegativesRankingLoss(model), callbacks=[clock],
                               train_dataset=Dataset.from_dict({"anchor": anchors, "positive": positives})).train()
    if save:
        model.save(str(out / "model"))
    return {"seconds": sum(clock.times), "steps": len(clock.times), "step_times": clock.times}


def mnrl_baseline(paths: dict[str, Path], config: PipelineConfig, budget_s: float, out: Path,
                  probe_steps: int) -> dict[str, Any]:
    anchors, positives = training_pairs([paths["pretrain"], paths["llm"], paths["finetune"]], sts_min_score=4.0)
    run_dir = out / "runs" / "mnrl"
    key = {"budget_s": round(budget_s), "pairs": len(anchors), "batch": MNRL_BATCH, "lr": MNRL_LR,
           "warmup": MNRL_WARMUP, "max_length": config.pretrain.max_length, "probe_steps": probe_steps,
           "init": str(paths["init"])}

    def build() -> dict[str, Any]:
        probe = train_mnrl(paths["init"], anchors, positives, steps=probe_steps, max_length=config.pretrain.max_length,
                           out=run_dir / "probe", stop_after_s=None, save=False)
        timed = probe["step_times"][1:] or probe["step_times"]  # the first step warms up
        per_step = statistics.mean(timed)
        steps = steps_for_budget(budget_s, per_step)
        print(f"MNRL probe: {per_step:.2f} s/step over {len(timed)} steps -> max_steps {steps} "
              f"for {budget_s:.0f} s", flush=True)
        shutil.rmtree(run_dir / "probe", ignore_errors=True)
        run = train_mnrl(paths["init"], anchors, positives, steps=steps, max_length=config.pretrain.max_length,
                         out=run_dir, stop_after_s=budget_s * MNRL_OVERRUN)
        return {"model_dir": str(run_dir / "model"), "seconds": run["seconds"], "steps": run["steps"],
                "planned_steps": steps, "probe_s_per_step": per_step, "pairs": len(anchors),
                "stopped_by_budget": run["steps"] < steps}

    return cached_run(run_dir, key, build)


# ---- evaluation -----------------------------------------------------------------------------------
def task_order(eval_config: EvalConfig) -> list[str]:
    return [t.name for t in resolve_task_names(eval_config.tasks or ["zh-default"])]


def evaluate(model_dir: Path, out_json: Path, capped_config: EvalConfig, full_config: EvalConfig,
             names: list[str], full: list[str]) -> dict[str, Any]:
    """`names` scored with one evaluator: those in `full` with `full_config` (no caps in a real run), the
    others with `capped_config`; cached in `out_json` under the configs and names."""
    key = json.loads(json.dumps({"capped": capped_config.model_dump(mode="json"), "names": names, "full": full,
                                 "full_config": full_config.model_dump(mode="json")}))
    if out_json.exists():
        cached = json.loads(out_json.read_text())
        if cached.get("bench_key") == key:
            return cached
    entries: list[dict[str, Any]] = []
    model, revision = str(model_dir), ""
    parts = [([n for n in names if n in full], full_config, ".full.json"),
             ([n for n in names if n not in full], capped_config, ".rest.json")]
    if full_config == capped_config:  # one run, one model load
        parts = [(names, capped_config, ".all.json")]
    for subset, config, suffix in parts:
        if subset:
            part = run_eval(model_dir, tasks=subset, task_dirs=[], output=out_json.with_suffix(suffix),
                            config=config.model_copy(update={"tasks": []}))
            entries += part["tasks"]
            model, revision = part["model"], part["revision"]
    entries.sort(key=lambda t: names.index(t["name"]))
    result = summarize(model, revision, entries)
    result["bench_key"] = key
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def scores_of(result: dict[str, Any]) -> dict[str, float]:
    return {t["name"]: t["main_score"] for t in result["tasks"]}


# ---- pure helpers for the report (tests/test_bench_quality.py) -------------------------------------
def pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def goal_checks(conan: dict[str, float], mnrl: dict[str, float] | None) -> list[tuple[str, bool | None, str]]:
    """The issue's goals for (c), on score dicts (task -> 0..1, plus "average"): (goal, passed, measured).
    passed is None when it cannot be judged (no (b), or a task not scored)."""
    checks: list[tuple[str, bool | None, str]] = []
    if mnrl is None:
        checks.append((f"avg(c) >= avg(b) + {100 * GOAL_MARGIN:.0f}", None, "no (b) run"))
        checks += [(f"(c) > (b) on {task}", None, "no (b) run") for task in GOAL_TASKS]
    else:
        need = mnrl["average"] + GOAL_MARGIN
        checks.append((f"avg(c) >= avg(b) + {100 * GOAL_MARGIN:.0f}", conan["average"] >= need,
                       f"{pct(conan['average'])} vs {pct(mnrl['average'])} + {100 * GOAL_MARGIN:.0f} = {pct(need)}"))
        for task in GOAL_TASKS:
            if task not in conan or task not in mnrl:
                checks.append((f"(c) > (b) on {task}", None, "not scored"))
                continue
            checks.append((f"(c) > (b) on {task}", conan[task] > mnrl[task],
                           f"{pct(conan[task])} vs {pct(mnrl[task])} ({pct(conan[task] - mnrl[task], True)})"))
    for task, floor in GOAL_FLOORS.items():
        if task not in conan:
            checks.append((f"(c) {task} >= {pct(floor)}", None, "not scored"))
        else:
            checks.append((f"(c) {task} >= {pct(floor)}", conan[task] >= floor, pct(conan[task])))
    return checks


def verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[passed]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dhnm_evidence(lines: list[dict[str, Any]], window: int = 5) -> dict[str, Any]:
    """From hardness.jsonl lines: each check (step, observed, stale, replaced) with the mean hard-negative
    score over the `window` steps up to the check and the `window` steps after it (new negatives take
    effect on the step after a check). A rise after a replacing check is paper Fig. 2's jump."""
    step_score: dict[int, float] = {}
    checks: dict[int, dict[str, Any]] = {}
    for line in lines:  # keyed by step: a resumed run may have logged a step twice
        if line.get("kind") == "step" and line.get("mean_neg_score") is not None:
            step_score[int(line["step"])] = float(line["mean_neg_score"])
        elif line.get("kind") == "check":
            checks[int(line["step"])] = line
    rows = []
    for step in sorted(checks):
        check = checks[step]
        before = [step_score[s] for s in range(step - window + 1, step + 1) if s in step_score]
        after = [step_score[s] for s in range(step + 1, step + window + 1) if s in step_score]
        b = statistics.mean(before) if before else None
        a = statistics.mean(after) if after else None
        rows.append({"step": step, "observed": check.get("observed_queries"), "stale": check.get("stale"),
                     "replaced": int(check.get("replaced") or 0), "before": b, "after": a,
                     "rise": None if a is None or b is None else a - b})
    replacing = [r for r in rows if r["replaced"] > 0 and r["rise"] is not None]
    return {"checks": len(rows), "rows": rows, "replaced_total": sum(r["replaced"] for r in rows),
            "replacing_checks": sum(r["replaced"] > 0 for r in rows),
            "rose_after": sum(r["rise"] > 0 for r in replacing), "judged": len(replacing),
            "steps_logged": len(step_score),
            "first_score": step_score[min(step_score)] if step_score else None,
            "last_score": step_score[max(step_score)] if step_score else None}


def spread_stats(values: list[float]) -> tuple[float, float]:
    """(mean, spread = max - min) over seeds."""
    return statistics.mean(values), (max(values) - min(values)) if len(values) > 1 else 0.0


def gain_verdict(variant: list[float], vanilla: list[float]) -> tuple[float, float, str]:
    """(gain of the mean over vanilla's, the larger of the two spreads, verdict)."""
    (m_v, s_v), (m_0, s_0) = spread_stats(variant), spread_stats(vanilla)
    gain, spread = m_v - m_0, max(s_v, s_0)
    if len(variant) < 2 or len(vanilla) < 2:
        return gain, spread, "one seed: no spread to judge against"
    if gain > spread:
        return gain, spread, "gain exceeds the spread"
    if gain < -spread:
        return gain, spread, "worse than vanilla beyond the spread"
    return gain, spread, "within the spread: no measured gain"


# ---- reports --------------------------------------------------------------------------------------
def dhnm_report(run_dir: Path, check_every: int) -> list[str]:
    path = run_dir / "hardness.jsonl"
    if not path.exists():
        return [f"DHNM evidence: no {path.name} in {run_dir} (DHNM off, or no candidates)."]
    ev = dhnm_evidence(read_jsonl(path), window=max(1, min(5, check_every)))
    w = max(1, min(5, check_every))
    lines = [f"DHNM evidence ((c) finetune, {path}; check every {check_every} step(s)): {ev['checks']} checks, "
             f"{ev['replaced_total']} queries' negatives replaced in {ev['replacing_checks']} checks; "
             f"mean hard-negative score first step {_f(ev['first_score'])}, last step {_f(ev['last_score'])}.",
             f"replaced per check: {', '.join(str(r['replaced']) for r in ev['rows']) or '-'}", "",
             f"| check step | observed queries | stale | replaced | mean neg score, {w} step(s) up to it "
             f"| {w} step(s) after | change |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ev["rows"]:
        lines.append(f"| {r['step']} | {r['observed']} | {r['stale']} | {r['replaced']} | {_f(r['before'])} "
                     f"| {_f(r['after'])} | {_f(r['rise'], True)} |")
    if ev["replacing_checks"] == 0:
        lines.append("\nDHNM did NOT fire: no check replaced any negatives.")
    else:
        lines.append(f"\nDHNM fired: the mean negative score rose after {ev['rose_after']} of {ev['judged']} "
                     f"replacing checks (Fig. 2 expects a rise after each; the mean is over every query of "
                     f"the step, not only the replaced ones). Curve: {run_dir / 'hardness.png'}.")
    return lines


def _f(value: float | None, signed: bool = False) -> str:
    return "-" if value is None else (f"{value:+.3f}" if signed else f"{value:.3f}")


def table1(names: list[str], types: dict[str, str], init: dict[str, Any], conan: dict[str, Any],
           mnrl: dict[str, Any] | None, conan_run: str, mnrl_run: str) -> list[str]:
    a, c = scores_of(init), scores_of(conan)
    b = scores_of(mnrl) if mnrl else {}
    lines = ["| task | type | (a) init | (b) MNRL | (c) conan | (c) - (b) | (c) - (a) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in names:
        diff_b = c[name] - b[name] if name in b and name in c else None
        diff_a = c[name] - a[name] if name in a and name in c else None
        lines.append(f"| {name} | {types.get(name, '')} | {pct(a.get(name))} | {pct(b.get(name))} "
                     f"| {pct(c.get(name))} | {pct(diff_b, True)} | {pct(diff_a, True)} |")
    avg_b = mnrl["average"] if mnrl else None
    lines.append(f"| **average** ({len(names)} tasks) | | **{pct(init['average'])}** | **{pct(avg_b)}** "
                 f"| **{pct(conan['average'])}** | {pct(None if avg_b is None else conan['average'] - avg_b, True)} "
                 f"| {pct(conan['average'] - init['average'], True)} |")
    lines.append(f"| training (s in steps, steps) | | - | {mnrl_run} | {conan_run} | | |")
    return lines


class LoadWatch:
    """Samples the 1-minute load average while the bench runs: the equal-time comparison is only fair on a
    quiet machine (another process slows conan's steps, and (b)'s budget is conan's seconds)."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def summary(self) -> str:
        if not self.samples:
            return "load: no samples"
        cores = os.cpu_count() or 1
        peak = max(self.samples)
        # The bench alone peaks near cores + 2 (mining: two actors and the driver); above that, suspect others.
        note = "" if peak <= cores + 2 else f" (above {cores + 2}: other work may have shared the CPU)"
        return (f"load (1-min average, every 30 s): mean {sum(self.samples) / len(self.samples):.1f}, "
                f"max {peak:.1f} on {cores} cores{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/bench-quality.yaml")
    parser.add_argument("--out", default=None, help="default work/bench_quality (--smoke: work/bench_quality_smoke)")
    parser.add_argument("--skip-mnrl", action="store_true", help="leave (b) out of table 1")
    parser.add_argument("--ablation", action="store_true", help="table 2 (the ablation) instead of table 1")
    parser.add_argument("--seeds", type=int, default=2, help="ablation: seeds 0 .. N-1 per variant")
    parser.add_argument("--ablation-steps", type=int, default=None, help="ablation finetune steps (default 60)")
    parser.add_argument("--ablation-max-pairs", type=int, default=None,
                        help="ablation: pairs per STS task (LCQMC-dev, STSB; default 2000)")
    parser.add_argument("--smoke", action="store_true", help="small data, few steps, tiny eval caps")
    args = parser.parse_args()
    smoke = args.smoke
    ablation_steps = args.ablation_steps or (SMOKE_ABLATION_STEPS if smoke else 60)
    ablation_pairs = args.ablation_max_pairs or (SMOKE_ABLATION_MAX_PAIRS if smoke else 2000)
    out = Path(args.out or ("work/bench_quality_smoke" if smoke else "work/bench_quality")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config, overrides=smoke_overrides(out) if smoke else None)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def mark(name: str, since: float) -> None:
        timings[name] = time.perf_counter() - since
        print(f"[{(time.perf_counter() - started) / 60:.1f} min] {name}: {timings[name]:.0f} s", flush=True)

    with ray_session(), LoadWatch() as load:
        t0 = time.perf_counter()
        paths = prepare(config, out)
        mark("data + start model", t0)
        t0 = time.perf_counter()
        pretrained = pretrain(config, paths, out)
        mark(f"pretrain ({pretrained['steps']} steps, {pretrained['seconds']:.0f} s in steps)", t0)
        t0 = time.perf_counter()
        candidates = Path(mine_with(Path(pretrained["model_dir"]), pretrained["key"], config, paths,
                                    out / "runs" / "candidates-pretrained")["dir"])
        mark("mining with the pretrained model", t0)
        if args.ablation:
            text = run_ablation(config, paths, pretrained, candidates, out, args.seeds, ablation_steps,
                                ablation_pairs, mark)
            name = "report-ablation.md"
        else:
            text = run_table1(config, paths, pretrained, candidates, out, smoke, args.skip_mnrl, mark)
            name = "report.md"
    total = time.perf_counter() - started
    text += ("\n\ntimings (s, this invocation; cached stages ~0): "
             + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
             + f"\ntotal wall time: {total / 60:.1f} min{' (smoke)' if smoke else ''}; config {args.config}"
             + (" + smoke overrides" if smoke else "") + f"; out {out}\n" + load.summary() + "\n")
    (out / name).write_text(text)
    print("\n" + text)


def run_table1(config: PipelineConfig, paths: dict[str, Path], pretrained: dict[str, Any], candidates: Path,
               out: Path, smoke: bool, skip_mnrl: bool, mark: Callable[[str, float], None]) -> str:
    names = task_order(config.eval)
    full_config = config.eval if smoke else config.eval.model_copy(
        update={"max_pairs": None, "max_docs": None, "max_queries": None})

    def score(model_dir: str | Path, out_json: Path) -> dict[str, Any]:
        return evaluate(Path(model_dir), out_json, config.eval, full_config, names, GOAL_TASKS)

    t0 = time.perf_counter()
    init = score(paths["init"], out / "eval" / "init.json")
    mark("eval (a) init", t0)
    run_dir = out / "runs" / "conan-finetune"
    t0 = time.perf_counter()
    tuned = finetune(config, paths, pretrained, candidates, run_dir, mode="cbb", dhnm=True)
    mark(f"finetune CBB+DHNM ({tuned['steps']} steps, {tuned['seconds']:.0f} s in steps)", t0)
    t0 = time.perf_counter()
    conan = score(tuned["model_dir"], run_dir / "eval.json")
    mark("eval (c) conan", t0)
    budget = pretrained["seconds"] + tuned["seconds"]
    conan_run = f"{budget:.0f} s ({pretrained['steps']} + {tuned['steps']})"
    mnrl, mnrl_run, mnrl_info = None, "skipped", None
    if not skip_mnrl:
        t0 = time.perf_counter()
        mnrl_info = mnrl_baseline(paths, config, budget, out, SMOKE_PROBE_STEPS if smoke else PROBE_STEPS)
        mark(f"MNRL ({mnrl_info['steps']} steps, {mnrl_info['seconds']:.0f} s in steps)", t0)
        t0 = time.perf_counter()
        mnrl = score(mnrl_info["model_dir"], out / "runs" / "mnrl" / "eval.json")
        mark("eval (b) MNRL", t0)
        mnrl_run = f"{mnrl_info['seconds']:.0f} s ({mnrl_info['steps']})"
    types = {t["name"]: t["type"] for t in init["tasks"]}
    c_scores = {**scores_of(conan), "average": conan["average"]}
    b_scores = {**scores_of(mnrl), "average": mnrl["average"]} if mnrl else None
    caps = "with the eval caps (--smoke)" if smoke else "in full"
    lines = ["## Table 1: (a) start model vs (b) sentence-transformers MNRL vs (c) conan (scores x100)", "",
             *table1(names, types, init, conan, mnrl, conan_run, mnrl_run), "",
             f"Eval: {', '.join(GOAL_TASKS)} {caps}; the other tasks capped at max_pairs {config.eval.max_pairs}, "
             f"max_docs {config.eval.max_docs}, max_queries {config.eval.max_queries} (seed {config.eval.seed}).",
             f"(c): pretrain {pretrained['steps']} steps ({pretrained['seconds']:.0f} s) -> mining with the "
             f"pretrained model -> CBB+DHNM finetune {tuned['steps']} steps ({tuned['seconds']:.0f} s), "
             f"Ray Train workers: {config.workers or 'what Ray offers'}."]
    if mnrl_info:
        lines.append(f"(b): budget {budget:.0f} s (= (c)'s seconds in steps); probe "
                     f"{mnrl_info['probe_s_per_step']:.2f} s/step -> max_steps {mnrl_info['planned_steps']}; "
                     f"ran {mnrl_info['steps']} steps in "
                     f"{mnrl_info['seconds']:.0f} s ({mnrl_info['seconds'] / budget:.0%} of the budget"
                     f"{', stopped by the budget callback' if mnrl_info['stopped_by_budget'] else ''}); "
                     f"{mnrl_info['pairs']} pairs, batch {MNRL_BATCH}, NO_DUPLICATES, lr {MNRL_LR}, "
                     f"warmup {MNRL_WARMUP:.0%}, max_seq_length {config.pretrain.max_length}.")
    lines += ["", "### Goals for (c) (issue 10)", ""]
    lines += [f"- {verdict(ok)}: {goal} ({measured})" for goal, ok, measured in goal_checks(c_scores, b_scores)]
    lines += ["", "### DHNM in (c)'s finetune", "", *dhnm_report(run_dir, config.mining.dhnm.check_every)]
    return "\n".join(lines)


def run_ablation(config: PipelineConfig, paths: dict[str, Path], pretrained: dict[str, Any], candidates: Path,
                 out: Path, seeds: int, steps: int, max_pairs: int, mark: Callable[[str, float], None]) -> str:
    capped = config.eval.model_copy(update={"max_pairs": max_pairs})
    results: dict[str, list[dict[str, Any]]] = {}
    for name, (mode, dhnm) in ABLATION.items():
        for seed in range(seeds):
            run_dir = out / "runs" / "ablation" / f"{mode}-{'dhnm' if dhnm else 'fixed'}-seed{seed}"
            t0 = time.perf_counter()
            info = finetune(config, paths, pretrained, candidates, run_dir, mode=mode, dhnm=dhnm, seed=seed,
                            steps=steps)
            result = evaluate(Path(info["model_dir"]), run_dir / "eval-fast.json", capped, capped, FAST_TASKS, [])
            hardness = run_dir / "hardness.jsonl"
            replaced = dhnm_evidence(read_jsonl(hardness))["replaced_total"] if hardness.exists() else None
            results.setdefault(name, []).append({**info, "scores": {**scores_of(result), "average": result["average"]},
                                                 "replaced": replaced})
            mark(f"ablation {name} seed {seed} ({info['steps']} steps, {info['seconds']:.0f} s in steps) + eval", t0)
    columns = [*FAST_TASKS, "average"]
    lines = [f"## Table 2: ablation, finetuned from one pretrained checkpoint ({pretrained['steps']} steps), "
             f"{steps} steps each, seeds {', '.join(map(str, range(seeds)))}; scores x100, mean (spread = max - min)",
             "", "| variant | " + " | ".join(columns) + " | negatives replaced | s in steps |",
             "|---|" + "---:|" * (len(columns) + 2)]
    for name, runs in results.items():
        cells = []
        for column in columns:
            m, s = spread_stats([r["scores"][column] for r in runs])
            cells.append(f"{pct(m)} ({100 * s:.1f})")
        replaced = "-" if runs[0]["replaced"] is None else "/".join(str(r["replaced"]) for r in runs)
        seconds = statistics.mean(r["seconds"] for r in runs)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {replaced} | {seconds:.0f} |")
    lines += ["", "Gain over vanilla (difference of means; counts only above the larger spread):"]
    vanilla = results["vanilla"]
    for name in [n for n in ABLATION if n != "vanilla"]:
        parts = []
        for column in columns:
            gain, spread, word = gain_verdict([r["scores"][column] for r in results[name]],
                                              [r["scores"][column] for r in vanilla])
            parts.append(f"{column} {pct(gain, True)} (spread {100 * spread:.1f}: {word})")
        lines.append(f"- {name}: " + "; ".join(parts))
    lines += ["", f"Eval: {', '.join(FAST_TASKS)}; pairs capped at {max_pairs}, retrieval at max_docs "
              f"{config.eval.max_docs} / max_queries {config.eval.max_queries} (seed {config.eval.seed}). Same "
              "seed = same data order; vanilla draws one task per step, so it sees fewer examples per step.",
              "Paper (C-MTEB avg, 35 tasks): " + ", ".join(f"{k} {v}" for k, v in PAPER_ABLATION.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
