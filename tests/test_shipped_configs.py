"""Every key of every shipped config reaches the stage that uses it (issue 12: "a knob in a shipped config
must do something").

Two checks per key set in a `configs/*.yaml` file:
- its value arrives, unchanged, in the parameters `flows/plan.py` hands that stage (nothing is dropped or
  re-spelt between the YAML and the stage's typed config);
- the field it sets is read somewhere in the code (an attribute read `.name` outside the config classes):
  a field nothing reads is a knob that does nothing. This is a static check (a name read on some other
  object also counts), so the behaviour tests of single knobs stay where they are, e.g.
  tests/test_train_recipe.py: Matryoshka dims reach the loss.
An unknown key is a validation error (every config model forbids extras), checked here too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from conan_core.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
CODE_DIRS = ("conan_core", "flows", "tasks", "conan_cli")
# Files that declare config fields; a read there (a validator) does not count as a consumer.
CONFIG_FILES = {"conan_core/config.py", "conan_core/train/config.py", "conan_core/mining/config.py",
                "conan_core/clean/config.py", "conan_core/eval/config.py"}


def _leaves(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out: list[tuple[tuple[str, ...], Any]] = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, (*prefix, key))
        else:
            out.append(((*prefix, key), value))
    return out


def _dig(params: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        params = params[key]
    return params


def _planned_values(plan: Any, key: tuple[str, ...]) -> list[Any]:
    """Where the stage parameters hold the value of `key` (one entry per stage that takes it)."""
    section, rest = key[0], key[1:]
    if section == "workers":
        return [plan.pretrain["workers"], plan.finetune["workers"]]
    if section == "data":
        field = rest[0]
        if field == "workers":
            return [plan.clean_pretrain["workers"], plan.clean_finetune["workers"], plan.extract["workers"]]
        stage = {"pretrain": plan.clean_pretrain, "finetune": plan.clean_finetune, "instruct": plan.extract}[field]
        return [stage["inputs"]]
    if section == "model":
        field = rest[0]
        if field == "base":
            return [plan.init_model["base"]]
        if field == "extend_vocab_from":
            return [plan.init_model["vocab_texts"]]
        return [plan.init_model["options"][field]]
    if section in ("clean", "extract"):
        stages = [plan.clean_pretrain, plan.clean_finetune] if section == "clean" else [plan.extract]
        return [_dig(stage["config"], rest) for stage in stages]
    if section == "mining":
        return [_dig(plan.mine["config"], rest), _dig(plan.finetune["mining"], rest)]
    if section == "eval":
        return [_dig(plan.evaluate["config"], rest), _dig(plan.evaluate_start["config"], rest)]
    if section in ("pretrain", "finetune"):
        return [_dig(getattr(plan, section)["config"], rest)]
    raise AssertionError(f"no stage takes {'.'.join(key)}: add it to this test's map")


def _expected(key: tuple[str, ...], value: Any) -> Any:
    """The YAML value as the plan holds it: inputs resolved to paths/files, numbers as the models coerce."""
    from flows.plan import input_files, resolve_input

    if key[0] == "data" and key[1] != "workers":
        return [resolve_input(item) for item in value]
    if key == ("model", "extend_vocab_from"):
        return [str(p) for p in input_files(value)]
    return value


@pytest.fixture(scope="module")
def code_text() -> str:
    parts = []
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            if path.relative_to(ROOT).as_posix() not in CONFIG_FILES:
                parts.append(path.read_text(encoding="utf-8"))
    return "\n".join(parts)


def test_the_shipped_configs_are_found() -> None:
    assert {p.name for p in SHIPPED} >= {"demo.yaml", "bench-quality.yaml", "cluster-gpu.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_key_reaches_its_stage(path: Path, tmp_path: Path) -> None:
    from flows.plan import plan_stages

    config = load_config(path)
    plan = plan_stages(config, tmp_path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key, value in _leaves(raw):
        expected = _expected(key, value)
        try:
            planned_values = _planned_values(plan, key)
        except KeyError as missing:
            raise AssertionError(f"{path.name}: {'.'.join(key)} does not reach its stage (no {missing})") from None
        for planned in planned_values:
            assert planned == expected, f"{path.name}: {'.'.join(key)} = {value!r} reaches its stage as {planned!r}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_key_is_read_by_the_code(path: Path, code_text: str) -> None:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    unread = [".".join(key) for key, _ in _leaves(raw)
              if not re.search(rf"\.{re.escape(key[-1])}\b", code_text)]
    assert not unread, f"{path.name}: keys no code reads (knobs that do nothing): {unread}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_an_unknown_key_in_a_shipped_config_is_an_error(path: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section in ("pretrain", "mining", "model"):
        bad = {**raw, section: {**raw.get(section, {}), "no_such_knob": 1}}
        copy = tmp_path / path.name
        copy.write_text(yaml.safe_dump(bad), encoding="utf-8")
        with pytest.raises(ConfigError, match="no_such_knob"):
            load_config(copy)
