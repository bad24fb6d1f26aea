"""What a training checkpoint holds, and how it is written and read back.

A checkpoint dir has:
  model.safetensors   the model's weights (safetensors: no pickle)
  optimizer.pt        AdamW state (read with torch.load(weights_only=True))
  state.json          step, every data stream's (epoch, index), the RNG states of every worker, the
                      LR schedule, DHNM's negatives state
The LR schedule is a pure function of the step, so the step is its whole state.

When: `CheckpointSchedule`. Every `checkpoint_interval(checkpoint_every, total)` steps (never more than half
the run, so even a run shorter than `checkpoint_every` has a checkpoint before its end), at the last step,
and when `checkpoint_every_s` seconds passed since the last checkpoint (rank 0's clock, broadcast, so every
rank reports at the same step as Ray Train requires).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from conan_core.distributed import world_info
from conan_core.errors import ConanError

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
FORMAT = 1


class CheckpointError(ConanError):
    """A checkpoint dir is missing files or was written by an incompatible run."""


@dataclass
class TrainState:
    """Everything besides weights that a resumed run needs to continue exactly."""

    step: int = 0
    streams: dict[str, dict[str, int]] = field(default_factory=dict)
    rng: list[dict[str, Any]] = field(default_factory=list)  # one per worker, in rank order
    dhnm: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """This process's python / numpy / torch RNG states as JSON-safe data."""
    np_state = np.random.get_state()
    return {"python": _listify(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, tuple | list) else value


def save_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(directory / MODEL_FILE))
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    payload = {"format": FORMAT, "step": state.step, "streams": state.streams, "rng": state.rng,
               "dhnm": state.dhnm, "extra": state.extra}
    (directory / STATE_FILE).write_text(json.dumps(payload))
    return directory


def load_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                    ) -> TrainState:
    """Load weights (and optimizer state) in place; returns the rest of the state."""
    missing = [f for f in (MODEL_FILE, STATE_FILE) if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} lacks {', '.join(missing)}")
    payload = json.loads((directory / STATE_FILE).read_text())
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {directory} has format {payload.get('format')}, expected {FORMAT}")
    device = next(model.parameters()).device
    try:
        model.load_state_dict(load_file(str(directory / MODEL_FILE), device=str(device)))
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {directory} does not fit this model: "
                              f"{str(err).splitlines()[0]}") from None
    if optimizer is not None and (directory / OPTIMIZER_FILE).is_file():
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location=device,
                                             weights_only=True))
    return TrainState(step=payload["step"], streams=payload["streams"], rng=payload["rng"],
                      dhnm=payload["dhnm"], extra=payload.get("extra", {}))


def checkpoint_interval(checkpoint_every: int, total: int) -> int:
    """Steps between checkpoints: `checkpoint_every`, but at most half the run (rounded up), so a run of
    `total` steps always has a checkpoint before its last step (when total >= 2)."""
    return max(1, min(checkpoint_every, math.ceil(total / 2)))


class CheckpointSchedule:
    """Decides at which steps a checkpoint is reported: every `interval` steps, at the last step, and, on
    steps where `timed` is true (logged steps: they sync the device already), when `every_s` seconds passed
    since the last checkpoint. The time decision is rank 0's, broadcast to every rank (all ranks must call
    `ray.train.report` together)."""

    def __init__(self, checkpoint_every: int, checkpoint_every_s: float | None, total: int, *,
                 device: torch.device | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = checkpoint_interval(checkpoint_every, total)
        self.every_s = checkpoint_every_s
        self.total = total
        self.device = device or torch.device("cpu")
        self._clock = clock
        self._last = clock()

    def due(self, step: int, *, timed: bool = True) -> bool:
        if step % self.interval == 0 or step == self.total:
            return True
        if self.every_s is None or not timed:
            return False
        late = self._clock() - self._last >= self.every_s
        world = world_info()
        if world.size > 1:
            import torch.distributed as dist

            flag = torch.tensor([1 if late else 0], dtype=torch.int32, device=self.device)
            dist.broadcast(flag, src=0)
            late = bool(flag.item())
        return late

    def done(self) -> None:
        """A checkpoint was just reported: the time interval starts again."""
        self._last = self._clock()

    def describe(self) -> str:
        text = f"every {self.interval} steps"
        return text + (f" or {self.every_s:g} s" if self.every_s is not None else "")


def wait_until_taken(timeout_s: float = 30.0, poll_s: float = 0.05) -> bool:
    """Block until Ray Train's controller has taken this worker's last report (True), or `timeout_s`.

    Ray Train V2 queues a report in the worker until the controller's next poll (every 2 s): a checkpoint is
    on storage once `ray.train.report` returns, but only registered as the run's latest (the one a restart
    or a rerun resumes from) when the controller took every worker's report. A worker that dies before
    that poll loses the checkpoint, so a crash soon after a checkpoint would restart from the one before,
    or from step 0. Not in a Ray Train V2 worker (or when its internals change): returns False at once.
    """
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        results = get_train_context().execution_context.result_queue
    except Exception:  # noqa: BLE001 - an optimisation of Ray internals; never fail a run over it
        return False
    deadline = time.monotonic() + timeout_s
    while not results.empty():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True
