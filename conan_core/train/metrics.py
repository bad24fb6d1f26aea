"""Per-step training metrics: a JSONL log, TensorBoard event files, and a PNG of the loss curves; and the
starts log (`starts.jsonl`: one line each time the worker loop starts, fresh or from a checkpoint), which the
driver tails to say whether and from where a run resumed."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
STARTS_FILE = "starts.jsonl"


class MetricsLog:
    """Appends one JSON line per logged step (rank 0 only). After a restart from a checkpoint at step s,
    lines of steps > s (written before the crash, about to be redone) are dropped first."""

    def __init__(self, out_dir: Path, *, resume_step: int = 0, tensorboard: bool = True) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / METRICS_FILE
        _truncate_after(self.path, resume_step)
        self._writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step hides events a crashed attempt wrote after the checkpoint we resume from.
            self._writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=resume_step + 1)

    def write(self, metrics: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._writer.add_scalar(f"train/{key}", value, metrics["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def record_start(out_dir: Path, *, start_step: int, total_steps: int, checkpoint: str | None,
                 schedule: str) -> None:
    """Rank 0, once per start of the loop (after the metrics log was cut back to `start_step`)."""
    entry = {"start_step": start_step, "total_steps": total_steps, "checkpoint": checkpoint,
             "checkpoints": schedule, "time": time.time()}
    with open(Path(out_dir) / STARTS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def read_starts(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a starts log (a line being written is left for the next read)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        if line.strip():
            rows.append(json.loads(line))
    return rows


def start_message(entry: dict[str, Any]) -> str:
    """What the console says about one start: resumed from which step and checkpoint, or from scratch."""
    total, step = entry["total_steps"], entry["start_step"]
    if entry.get("checkpoint"):
        text = f"resumed from step {step}/{total} (checkpoint {entry['checkpoint']})"
    else:
        text = f"starting at step 0/{total} (no checkpoint)"
    return f"{text}; checkpoints {entry['checkpoints']}" if entry.get("checkpoints") else text


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """Loss curves (total and per task) against the step; None when there is nothing to plot."""
    rows = read_metrics(metrics_path)
    keys = [k for k in ("loss", "loss_retrieval", "loss_sts") if any(k in r for r in rows)]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker="." if len(points) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
