"""The Ray Train worker loop shared by pretraining and finetuning.

Each step: the workload hands this worker its share of the global batch and its objective; one backward (or,
with `grad_cache_chunk`, GradCache's chunked one: `train.grad_cache`); gradients averaged over workers
(one flat all-reduce); clipping; AdamW; the LR from a pure function of the step. Rank 0 appends metrics
to `<out>/metrics.jsonl` (the driver tails it for progress) and, on the steps `CheckpointSchedule` picks
(every `checkpoint_every` steps but at most half the run, the last step, and every `checkpoint_every_s`
seconds), a checkpoint goes to Ray Train (`ray.train.report`), which keeps the newest `keep_checkpoints`
under the run's storage. On a restart (a crash under FailureConfig, or the same command rerun)
`ray.train.get_checkpoint()` hands the last checkpoint back and the loop continues at the next step with
the same data position and RNG state, so no batch is repeated or skipped. Each start is recorded in
`<out>/starts.jsonl` (fresh, or which step and checkpoint it resumed from) for the driver.
"""

from __future__ import annotations

import math
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from conan_core.distributed import world_info
from conan_core.model import ConanEmbedder, set_encoder_dropout
from conan_core.paths import offline_env
from conan_core.train.checkpoint import (
    CheckpointSchedule,
    TrainState,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    wait_until_taken,
)
from conan_core.train.config import TrainCommon
from conan_core.train.data import TokenBank
from conan_core.train.metrics import MetricsLog, _truncate_after, record_start
from conan_core.train.objective import StepEncoder, average_gradients
from conan_core.train.spec import FaultInjection, TrainSpec
from conan_core.train.workload import FinetuneWorkload, PretrainWorkload, Workload

FINAL_MODEL_DIR = "model"
HARDNESS_FILE = "hardness.jsonl"


def lr_at(step: int, total: int, config: TrainCommon) -> float:
    """Linear warmup over warmup_ratio of the steps, then linear / cosine decay or constant."""
    warmup = round(config.warmup_ratio * total)
    if step <= warmup:
        return config.lr * step / max(1, warmup)
    if config.schedule == "constant":
        return config.lr
    progress = (step - warmup) / max(1, total - warmup + 1)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * (1 - progress)


def make_optimizer(model: torch.nn.Module, config: TrainCommon) -> torch.optim.Optimizer:
    """AdamW, fused (one pass over each parameter; the unfused CPU path is several times slower), with the
    usual transformer groups: the input word embeddings at `lr * embedding_lr_scale` (the rows added by
    vocabulary extension start near the mean and must move far), and no weight decay on embeddings,
    LayerNorm weights and biases. Each group's `lr_scale` is applied to the schedule's lr every step."""
    groups = parameter_groups(model, config)
    for group in groups:
        group["lr"] = config.lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=True)


def parameter_groups(model: torch.nn.Module, config: TrainCommon) -> list[dict[str, Any]]:
    """[word embeddings (scaled lr, no decay), other no-decay params, decayed params]; empty groups left out."""
    word_embeddings = _word_embeddings(model)
    embed, no_decay, decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if word_embeddings is not None and param is word_embeddings:
            embed.append(param)
        elif param.ndim < 2 or "norm" in name.lower() or "embeddings" in name:
            no_decay.append(param)  # biases, LayerNorm, position / token-type embeddings
        else:
            decay.append(param)
    groups = [{"name": "word_embeddings", "params": embed, "weight_decay": 0.0,
               "lr_scale": config.embedding_lr_scale},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
              {"name": "decay", "params": decay, "weight_decay": config.weight_decay, "lr_scale": 1.0}]
    return [g for g in groups if g["params"]]


def _word_embeddings(model: torch.nn.Module) -> torch.nn.Parameter | None:
    encoder = getattr(model, "encoder", None)
    if encoder is None or not hasattr(encoder, "get_input_embeddings"):
        return None
    return encoder.get_input_embeddings().weight


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr, times each group's `lr_scale` (the word embeddings' multiplier)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def total_steps(config: TrainCommon, steps_per_epoch: int) -> int:
    return config.steps or max(1, math.ceil(config.epochs * steps_per_epoch))


def train_loop(loop_config: dict[str, TrainSpec]) -> None:
    """Ray Train's train_loop_per_worker; loop_config["spec"] is the driver's TrainSpec (train/spec.py)."""
    offline_env()
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, context.get_local_world_size())))
    device = ray.train.torch.get_device()
    spec = loop_config["spec"]
    config, out_dir = spec.config, spec.out_dir
    world = world_info()
    torch.manual_seed(config.seed + world.rank)

    model = ConanEmbedder.load(spec.model_path).to(device)
    set_encoder_dropout(model.encoder, config.hidden_dropout, config.attention_dropout)
    if config.gradient_checkpointing:
        model.encoder.gradient_checkpointing_enable()
    model.train()
    optimizer = make_optimizer(model, config)
    encode = make_encoder(model, config, device)
    workload = build_workload(spec, encode, world.rank)
    total = total_steps(config, workload.steps_per_epoch())
    workload.last_step = total
    start, restored_from = _restore(model, optimizer, workload, out_dir, world.rank)
    schedule = CheckpointSchedule(config.checkpoint_every, config.checkpoint_every_s, total, device=device)
    # train_step reads its metrics on checkpoint steps: those of the effective interval.
    step_config = config.model_copy(update={"checkpoint_every": schedule.interval})
    log = MetricsLog(out_dir, resume_step=start) if world.rank == 0 else None
    if world.rank == 0:  # after the log was cut back to `start`: the driver tails both
        record_start(out_dir, start_step=start, total_steps=total, checkpoint=restored_from,
                     schedule=schedule.describe())
    try:
        for step in range(start + 1, total + 1):
            metrics = train_step(step, total, step_config, model, optimizer, workload, encode)
            _maybe_crash(spec.fault_injection, step, world.rank)
            if log is not None and metrics is not None:
                log.write(metrics)
            if schedule.due(step, timed=metrics is not None):
                _report_checkpoint(step, model, optimizer, workload,
                                   metrics if metrics is not None else {"step": step, "total_steps": total})
                schedule.done()
    finally:
        if log is not None:
            log.close()
    if world.rank == 0:
        model.save(out_dir / FINAL_MODEL_DIR, card=_card(spec, total, world.size, workload))


def make_encoder(model: torch.nn.Module, config: TrainCommon, device: torch.device) -> StepEncoder:
    """The step's encoder: the config's max length, bf16 autocast on GPU (`bf16`) or on the CPU
    (`cpu_bf16`), gradient caching when configured."""
    bf16 = {"cuda": config.bf16, "cpu": config.cpu_bf16}.get(device.type, False)
    return StepEncoder(model, TokenBank(model.tokenizer, config.max_length), device,
                       bf16=bf16, grad_cache_chunk=config.grad_cache_chunk)


def build_workload(spec: TrainSpec, encode: StepEncoder, rank: int) -> Workload:
    """The stage's workload for this rank: its data, and for finetuning DHNM and the between-epoch re-mine."""
    if spec.stage == "pretrain":
        return PretrainWorkload(spec.config, spec.data_dirs, encode.bank, encode)
    dyn = _dynamic_negatives(spec, rank)
    mining = spec.mining_config if dyn is not None else None
    remine_dir = spec.out_dir if mining and mining.dhnm.remine_between_epochs != "off" else None
    return FinetuneWorkload(spec.config, spec.data_dirs, encode.bank, encode, dyn=dyn, mining=mining,
                        out_dir=remine_dir)


def _dynamic_negatives(spec: TrainSpec, rank: int):
    """DHNM over the candidate lists, when a candidates dir is given and `dhnm` is on (in either mode:
    the ablation's "+DHNM" row is vanilla task sampling with dynamic negatives)."""
    config = spec.config
    if spec.candidates_dir is None or not config.dhnm:
        return None
    from conan_core.mining.candidates import CandidateLists
    from conan_core.mining.dhnm import DynamicNegatives

    metrics = spec.out_dir / HARDNESS_FILE if rank == 0 else None
    n_total = config.layout.retrieval_group * config.negatives_per_rank
    return DynamicNegatives(CandidateLists.load(spec.candidates_dir), n_total, spec.mining_config.dhnm,
                            metrics_path=metrics)


def _restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, workload: Workload, out_dir: Path,
             rank: int) -> tuple[int, str | None]:
    """Continue from Ray Train's latest checkpoint of this run, if any; returns the last finished step and
    where the checkpoint is (None: starting fresh)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, None
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(Path(directory), model, optimizer)
    for name, stream in workload.streams.items():
        if name in state.streams:
            stream.load_state_dict(state.streams[name])
    if len(state.rng) == world_info().size:
        set_rng_state(state.rng[rank])
    workload.load_state_dict(state.dhnm)
    if rank == 0:
        _truncate_after(out_dir / HARDNESS_FILE, state.step)
    return state.step, str(checkpoint.path)


def train_step(step: int, total: int, config: TrainCommon, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer, workload: Workload, encode: StepEncoder) -> dict[str, Any] | None:
    """One optimizer step; its metrics on log and checkpoint steps (None otherwise: reading them means
    a device sync and a collective)."""
    started = time.perf_counter()
    tokens_before = encode.tokens
    lr = lr_at(step, total, config)
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    result = workload.step(step)
    encode.backward(result.objective)  # one backward, or GradCache's chunked one
    params = [p for p in model.parameters() if p.requires_grad]
    average_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip or float("inf"))
    optimizer.step()
    extra = workload.after_step(step, result)
    if step % config.log_every and step % config.checkpoint_every and step != total:
        return None
    sums = _global_sums(result, encode.tokens - tokens_before, encode.device)
    seconds = time.perf_counter() - started
    metrics = {"step": step, "total_steps": total, "loss": sums["loss"], "lr": lr,
               "grad_norm": float(grad_norm), "pairs_per_s": result.pairs / seconds,
               "tokens_per_s": sums["tokens"] / seconds, "step_seconds": seconds,
               "rss_peak_mb": _peak_rss_mb(), **sums["tasks"], **extra}
    if config.log_batch_ids:
        metrics["batch_ids"] = result.batch_ids
    return metrics


def _peak_rss_mb() -> float:
    """This worker process's peak resident memory so far (Linux reports KiB), for memory benchmarks."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _global_sums(result, tokens: int, device: torch.device) -> dict[str, Any]:
    """Global loss (mean of the workers' objectives), each task's loss, and tokens, in one all-reduce."""
    names = list(result.losses)
    values = [result.objective.detach().float(), torch.tensor(float(tokens), device=device)]
    for name in names:
        loss = result.losses[name]
        values += [loss.float() if loss is not None else torch.zeros((), device=device),
                   torch.tensor(1.0 if loss is not None else 0.0, device=device)]
    packed = torch.stack([v.to(device).reshape(()) for v in values])
    size = world_info().size
    if size > 1:
        dist.all_reduce(packed)
    tasks = {}
    for i, name in enumerate(names):
        count = float(packed[3 + 2 * i])
        tasks[name] = float(packed[2 + 2 * i]) / count if count else None
    return {"loss": float(packed[0]) / size, "tokens": float(packed[1]), "tasks": tasks}


def _report_checkpoint(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, workload: Workload,
                       metrics: dict[str, Any]) -> None:
    """Every worker reports (Ray Train needs all of them); rank 0 attaches the checkpoint, holding the
    RNG states of all workers. Returns once Ray Train's controller has taken the report."""
    import ray.train

    world = world_info()
    states: list[Any] = [None] * world.size
    if world.size > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    report = {k: v for k, v in metrics.items() if k != "batch_ids"}
    if world.rank != 0:
        ray.train.report(report)
    else:
        state = TrainState(step=step, streams={n: s.state_dict() for n, s in workload.streams.items()}, rng=states,
                           dhnm=workload.state_dict())
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), model, optimizer, state)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    # Registered only once the controller took every rank's report: a crash before that would lose it.
    wait_until_taken()


def _maybe_crash(fault: FaultInjection | None, step: int, rank: int) -> None:
    """Tests: the last rank exits hard at the fault's step, once (its marker file records that it did)."""
    if not fault or step != fault.step or rank != world_info().size - 1:
        return
    if fault.marker.exists():
        return
    fault.marker.write_text(f"crashed at step {step}\n")
    os._exit(1)


def _card(spec: TrainSpec, steps: int, workers: int, workload: Workload) -> dict[str, Any]:
    stage, config = spec.stage, spec.config
    losses = ("in-batch InfoNCE over the global batch (Eq. 1)" if stage == "pretrain" else
              "CBB: InfoNCE with group negatives + beta*CoSENT (Eq. 3)" if config.mode == "cbb" else
              "vanilla: one task per step (InfoNCE or CoSENT)")
    card = {"stage": stage, "data": [str(d) for d in spec.data_dirs], "losses": losses, "steps": steps,
            "workers": workers, "lr": config.lr, "examples": workload.counts}
    if workload.matryoshka.dims:
        card["matryoshka_dims"] = list(workload.matryoshka.dims)
    if stage == "finetune":
        card["layout"] = config.layout.model_dump()
        card["dhnm"] = bool(spec.candidates_dir and config.dhnm)
    return card
