"""TrainSpec: everything one training run's workers need, validated once by the driver.

`run_pretrain` / `run_finetune` (train/trainer.py) check the paths and build this object; Ray Train hands it
to every worker (`train_loop_config={"spec": spec}`, pickled by Ray, never turned back into a dict), and
the worker loop (train/loop.py) reads its typed fields. Before this, the stage config went through
`model_dump` and `model_validate` again in every worker, and the mining config twice more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from conan_core.mining.config import MiningConfig
from conan_core.train.config import FinetuneConfig, PretrainConfig

Stage = Literal["pretrain", "finetune"]


class FaultInjection(BaseModel):
    """Tests only: the last rank exits at `step` once (the `marker` file says it already did)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    step: int
    marker: Path


class TrainSpec(BaseModel):
    """One stage's run: its config, inputs and output dir (absolute paths, checked by the driver)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    stage: Stage
    config: PretrainConfig | FinetuneConfig
    data_dirs: list[Path]
    model_path: Path
    out_dir: Path
    candidates_dir: Path | None = None  # finetuning: mined candidate lists (initial negatives, DHNM)
    mining: MiningConfig | None = None  # finetuning: DHNM's rule and the between-epoch re-mine
    fault_injection: FaultInjection | None = None

    @model_validator(mode="before")
    @classmethod
    def _config_of_the_stage(cls, data: Any) -> Any:
        """Parse a dict config as the stage's model (a plain union would pick whichever model fits first)."""
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            model = PretrainConfig if data.get("stage") == "pretrain" else FinetuneConfig
            data = {**data, "config": model.model_validate(data["config"])}
        return data

    @model_validator(mode="after")
    def _stage_matches(self) -> TrainSpec:
        expected = PretrainConfig if self.stage == "pretrain" else FinetuneConfig
        if type(self.config) is not expected:
            raise ValueError(f"a {self.stage} spec needs a {expected.__name__}, got {type(self.config).__name__}")
        if self.stage == "pretrain" and (self.candidates_dir or self.mining):
            raise ValueError("candidates_dir and mining are finetuning inputs")
        return self

    @property
    def mining_config(self) -> MiningConfig:
        """The mining config DHNM runs with: the given one, else the defaults."""
        return self.mining or MiningConfig()
