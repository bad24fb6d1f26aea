"""`conan train pretrain` and `conan train finetune` (Ray Train)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from conan_cli.config_opts import ConfigOpt, build_section
from conan_cli.errors import one_line_errors
from conan_cli.main import app

train_app = typer.Typer(help="Train on Ray Train: weakly-supervised pretraining, CBB finetuning.",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")

DataOpt = Annotated[list[Path], typer.Option("--data", help="Dataset dir (from `conan clean`); repeatable.")]
ModelOpt = Annotated[str, typer.Option(help="Model dir to start from, or 'all-MiniLM-L6-v2'.")]
OutOpt = Annotated[Path, typer.Option(help="Output dir: model/, metrics.jsonl, loss.png, tensorboard/, "
                                           "checkpoints/ (rerunning with the same dir resumes from the last "
                                           "checkpoint; the first line says from which step).")]
WorkersOpt = Annotated[int | None, typer.Option(help="Ray Train workers (default: one per GPU, else one per node).")]
StepsOpt = Annotated[int | None, typer.Option(help="Total optimizer steps (wins over --epochs).")]
EpochsOpt = Annotated[float | None, typer.Option(help="Passes over the data.")]
LrOpt = Annotated[float | None, typer.Option(help="Peak learning rate.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a key of the section: key=value "
                                                                "(e.g. layout.sts_workers=0); repeatable.")]
MiningSetOpt = Annotated[list[str] | None, typer.Option(
    "--mining-set", help="Override a key of the mining section (the pipeline config's mining:, a sibling of "
                         "finetune:): key=value (e.g. dhnm.check_every=20); repeatable.")]
RayOpt = Annotated[str | None, typer.Option(help="Join this Ray cluster (default RAY_ADDRESS, else local).")]
StorageOpt = Annotated[str | None, typer.Option(help="Checkpoint storage: a path or pyarrow/fsspec URI "
                                                     "(default <out>/checkpoints).")]


def _print_progress(step: int, total: int, metrics: dict[str, Any]) -> None:
    losses = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("loss") and v is not None)
    typer.echo(f"step {step}/{total} {losses} lr={metrics['lr']:.2e} {metrics['pairs_per_s']:.1f} pairs/s")


def _report(result: Any) -> None:
    typer.echo(json.dumps({"model_dir": str(result.model_dir), "steps": result.steps,
                           "metrics": str(result.metrics_path), "plot": str(result.plot_path),
                           "final": {k: v for k, v in result.final_metrics.items() if k.startswith("loss")}}))


@train_app.command("pretrain")
@one_line_errors
def pretrain(data: DataOpt, model: ModelOpt, out: OutOpt, workers: WorkersOpt = None, steps: StepsOpt = None,
             epochs: EpochsOpt = None, batch_size: Annotated[int | None, typer.Option(
                 help="Pairs per worker per step (global batch = x workers).")] = None,
             lr: LrOpt = None, config: ConfigOpt = None, set_: SetOpt = None, ray_address: RayOpt = None,
             storage: StorageOpt = None) -> None:
    """In-batch InfoNCE over the global batch (paper §2.1)."""
    from conan_core.train.config import PretrainConfig
    from conan_core.train.trainer import run_pretrain

    cfg = build_section(PretrainConfig, "pretrain", config, set_, steps=steps, epochs=epochs,
                        batch_size=batch_size, lr=lr)
    _report(run_pretrain(cfg, data, model, out, workers=workers, ray_address=ray_address,
                         progress_callback=_print_progress, storage_path=storage, notice_callback=typer.echo))


def finetune_sections(config: Path | None = None, sets: list[str] | None = None,
                      mining_sets: list[str] | None = None, **shortcuts: Any) -> tuple[Any, Any]:
    """`conan train finetune`'s FinetuneConfig and MiningConfig: each from its section of `config` (a
    finetune-only YAML leaves mining at its defaults), then `sets` / `mining_sets`, then the shortcuts."""
    from conan_core.config import load_sibling, parse_overrides
    from conan_core.mining.config import MiningConfig
    from conan_core.train.config import FinetuneConfig

    return (build_section(FinetuneConfig, "finetune", config, sets, **shortcuts),
            load_sibling(MiningConfig, "mining", config, parse_overrides(mining_sets)))


@train_app.command("finetune")
@one_line_errors
def finetune(data: DataOpt, model: ModelOpt, out: OutOpt, workers: WorkersOpt = None, steps: StepsOpt = None,
             epochs: EpochsOpt = None, lr: LrOpt = None,
             mode: Annotated[str | None, typer.Option(help="cbb (every task every step) or vanilla "
                                                           "(one random task per step).")] = None,
             candidates: Annotated[Path | None, typer.Option(help="Candidates dir from `conan mine`: "
                                                                   "dynamic hard negatives.")] = None,
             config: ConfigOpt = None, set_: SetOpt = None, mining_set: MiningSetOpt = None,
             ray_address: RayOpt = None, storage: StorageOpt = None) -> None:
    """CBB loss: InfoNCE with the group's hard negatives + beta * CoSENT, every task every step (§2.3).

    `--set` is relative to the finetune section, `--mining-set` to the mining section (DHNM's settings,
    `dhnm.*`, and the between-epoch re-mine's)."""
    from conan_core.train.trainer import run_finetune

    cfg, mining = finetune_sections(config, set_, mining_set, steps=steps, epochs=epochs, lr=lr, mode=mode)
    _report(run_finetune(cfg, data, model, out, candidates_dir=candidates, mining=mining, workers=workers,
                         ray_address=ray_address, progress_callback=_print_progress, storage_path=storage,
                         notice_callback=typer.echo))
