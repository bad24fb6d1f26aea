"""The one pipeline config: every stage's section, loaded from YAML, with `a.b=c` overrides.

Each section is owned by its stage (`CleanConfig`, `ExtractConfig`, `MiningConfig`, `PretrainConfig`,
`FinetuneConfig`, `EvalConfig`); this file only composes them, adds the input groups and the model-init
options, and rejects unknown keys anywhere (a typo fails with the key's dotted path).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conan_core.clean.config import CleanConfig, ExtractConfig
from conan_core.errors import ConanError
from conan_core.eval.config import EvalConfig
from conan_core.mining.config import MiningConfig
from conan_core.train.config import FinetuneConfig, PretrainConfig


class ConfigError(ConanError):
    """A config file or override does not validate."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Raw inputs of each data stage: files, dirs, or `group:<name>` from the data catalog."""

    pretrain: list[str] = Field(default_factory=list, description="weak pairs for pretraining")
    finetune: list[str] = Field(default_factory=list, description="retrieval / STS / classification data")
    instruct: list[str] = Field(default_factory=list, description="LLM chat data for `conan extract`")
    workers: int = Field(default=2, gt=0,
                         description="workers of the data stages (local processes, or Ray tasks on a running Ray)")


class ModelInitConfig(_Strict):
    """How the starting model is built (`conan model init`)."""

    base: str = "all-MiniLM-L6-v2"
    pooling: Literal["mean", "cls"] = "mean"
    expand_dim: int | None = Field(default=None, gt=0)
    matryoshka_dims: list[int] | None = None
    max_seq_length: int = Field(default=128, gt=0)
    extend_vocab_from: list[str] = Field(default_factory=list)
    vocab_min_freq: int = Field(default=1, gt=0)
    vocab_max_new: int = Field(default=10_000, ge=0)
    vocab_init: Literal["mean", "cjk_mean", "unk"] = Field(
        default="mean", description="new embedding rows start at the mean of the old rows (or of its CJK rows, "
                                    "or the [UNK] row) + N(0, 0.02^2)")


class PipelineConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelInitConfig = Field(default_factory=ModelInitConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    mining: MiningConfig = Field(default_factory=MiningConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    workers: int | None = Field(default=None, gt=0,
                                description="Ray Train workers; default: one per GPU, else one per node")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """Set dotted keys: `["pretrain.lr=1e-4", "finetune.layout.sts_workers=0"]` (values parsed as YAML,
    so numbers, booleans, lists and null work) or `{"pretrain.lr": 1e-4}`. Returns a new dict."""
    result = _deep_copy(data)
    items = overrides.items() if isinstance(overrides, Mapping) else [_split(o) for o in overrides or []]
    for dotted, value in items:
        node = result
        *parents, leaf = str(dotted).split(".")
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {key} is not a section")
            node = child
        node[leaf] = value
    return result


def parse_overrides(overrides: Sequence[str] | None) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` as flat dotted keys `{"a.b": 1, "c": "x"}` (a later repeat wins), ready to be
    merged with more keys and handed to `apply_overrides` / `load_section`."""
    return dict(_split(o) for o in overrides or [])


def _split(override: str) -> tuple[str, Any]:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not of the form a.b=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def validate(model: type[BaseModel], data: dict[str, Any], where: str) -> Any:
    """Validate, turning pydantic's report into one line naming the first bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        location = ".".join(str(part) for part in first["loc"]) or "(top level)"
        more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(f"{where}: {location}: {first['msg']}{more}") from None


def load_config(path: str | Path | None = None,
                overrides: Mapping[str, Any] | Sequence[str] | None = None) -> PipelineConfig:
    """The pipeline config from a YAML file (None: all defaults) plus overrides."""
    data = read_yaml(path) if path is not None else {}
    return validate(PipelineConfig, apply_overrides(data, overrides), str(path or "config"))


def load_section(model: type[BaseModel], section: str, path: str | Path | None,
                 overrides: Mapping[str, Any] | Sequence[str] | None = None) -> Any:
    """One section (e.g. `pretrain`) from a pipeline YAML (its `section:` key) or from a YAML that holds
    only that section; overrides are relative to the section (`lr=1e-4`)."""
    data = read_yaml(path) if path is not None else {}
    if section in data:
        data = data[section] or {}
    elif set(data) & set(PipelineConfig.model_fields) and not set(data) & set(model.model_fields):
        data = {}  # a pipeline config without this section: defaults
    return validate(model, apply_overrides(data, overrides), f"{path or 'config'} [{section}]")


def load_sibling(model: type[BaseModel], section: str, path: str | Path | None,
                 overrides: Mapping[str, Any] | Sequence[str] | None = None) -> Any:
    """A section a command needs besides its own (e.g. `mining` for `conan train finetune`): the pipeline
    YAML's `section:` key, or the defaults when `path` holds another section alone; overrides are relative
    to the section."""
    data = read_yaml(path) if path is not None else {}
    return validate(model, apply_overrides(data.get(section) or {}, overrides), f"{path or 'config'} [{section}]")
