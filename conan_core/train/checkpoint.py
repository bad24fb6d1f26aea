"""What a training checkpoint holds, and how it is written and read back.

A checkpoint dir has:
  model.safetensors   the model's weights (safetensors: no pickle)
  optimizer.pt        AdamW state (read with torch.load(weights_only=True))
  state.json          step, every data stream's (epoch, index), the RNG states of every worker, the
                      LR schedule, DHNM's negatives state
The LR schedule is a pure function of the step, so the step is its whole state.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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
