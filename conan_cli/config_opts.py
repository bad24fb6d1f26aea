"""The config options every stage command shares: `--config FILE` and repeatable `--set key=value`.

A command's settings are its section of the pipeline config (`conan_core.config`): the YAML's section
(or a YAML holding the section alone), then the `--set` overrides (keys relative to the section), then the
command's shortcut options the user gave. A shortcut's typer default is None, meaning "the config's
value", so every default has one owner: the section's pydantic model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="YAML: a pipeline config (its section is used) or the section alone.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a key of the section: key=value (value parsed as YAML); repeatable.")]


def build_section(model: type[BaseModel], section: str, config: Path | None, sets: list[str] | None,
                  **shortcuts: Any) -> Any:
    """The section from `config`, then `sets`, then the shortcuts that are not None (dotted keys relative to
    the section, `dhnm__check_every` for `dhnm.check_every`). ConfigError (one line) naming a bad key."""
    from conan_core.config import load_section, parse_overrides

    overrides = parse_overrides(sets)
    overrides.update({key.replace("__", "."): value for key, value in shortcuts.items() if value is not None})
    return load_section(model, section, config, overrides)
