"""LLM prompt -> response pairs from instruction / chat data (Conan-embedding §3.1: 11.7% of the corpus).

Each assistant turn is paired with the user turn before it (optionally with earlier turns as context);
system prompts are dropped. Filters, each counted by reason: refusals and disclaimers (Chinese and
English), responses too short / too long, tool calls and function JSON, empty or non-text turns,
template boilerplate. Then the clean stage's normalisation, rules and dedup. Records are tagged
`source=llm:<dataset>`.
"""

from __future__ import annotations

import json
import re
from contextlib import closing
from pathlib import Path
from typing import Any

from conan_core.clean.config import ExtractConfig
from conan_core.clean.stage import UnitOutput, UnitResult, filter_records, finish_stage, pack_unit
from conan_core.io.catalog import resolve_inputs
from conan_core.io.conversations import ASSISTANT, ConversationError, conversation_turns, prompt_response_pairs
from conan_core.io.readers import ReadSpec, ReadUnit, plan_units, unit_lines
from conan_core.raymap import fanout_workers, input_bytes, iter_units
from conan_core.schema import KIND_PAIR, make_quarantine_row, make_record

REFUSAL = "refusal"
TOOL_CALL = "tool_call"
NON_TEXT = "non_text_turn"
EMPTY_TURN = "empty_turn"
RESPONSE_TOO_SHORT = "response_too_short"
RESPONSE_TOO_LONG = "response_too_long"
PROMPT_TOO_SHORT = "prompt_too_short"
PROMPT_TOO_LONG = "prompt_too_long"
BOILERPLATE = "boilerplate"

_REFUSAL = re.compile(
    r"^\s*(?:i'?m sorry|i am sorry|sorry, (?:but )?i|i apologi[sz]e|as an ai|as a language model|"
    r"i (?:cannot|can't|am unable to|am not able to|won't) (?:help|assist|provide|answer|do|fulfil)|"
    r"抱歉|对不起|很抱歉|非常抱歉|作为(?:一个)?(?:人工智能|AI|语言模型|ai)|我(?:无法|不能)(?:回答|提供|帮助|协助))"
    r"|as an ai language model|我是一个?(?:人工智能|AI|语言模型)|i don'?t have (?:personal|the ability)",
    re.IGNORECASE,
)
_BOILERPLATE = re.compile(
    r"^\s*(?:<\|[a-z_]+\|>|\[INST\]|###\s*(?:Instruction|Response)|Below is an instruction)|"
    r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|\{\{\s*\w+\s*\}\}|\[/INST\]",
    re.IGNORECASE,
)


def _looks_like_function_json(text: str) -> bool:
    stripped = text.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return False
    try:
        obj = json.loads(stripped)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and ("name" in obj and ("arguments" in obj or "parameters" in obj)
                                      or "function" in obj or "tool_calls" in obj)


def pair_reason(prompt: str | None, response: Any, config: ExtractConfig) -> str | None:
    """Why an extracted (prompt, response turn) pair is dropped, or None."""
    if prompt is None or response.text is None:
        return NON_TEXT
    if not prompt.strip() or not response.text.strip():
        return EMPTY_TURN
    text = response.text
    if config.drop_tool_calls and (response.is_tool_call or _looks_like_function_json(text)):
        return TOOL_CALL
    if config.drop_refusals and _REFUSAL.search(text[:300]):
        return REFUSAL
    if config.drop_boilerplate and (_BOILERPLATE.search(text) or _BOILERPLATE.search(prompt)):
        return BOILERPLATE
    if len(text.strip()) < config.min_response_chars:
        return RESPONSE_TOO_SHORT
    if len(text) > config.max_response_chars:
        return RESPONSE_TOO_LONG
    if len(prompt.strip()) < config.min_prompt_chars:
        return PROMPT_TOO_SHORT
    if len(prompt) > config.max_prompt_chars:
        return PROMPT_TOO_LONG
    return None


def iter_items(unit: ReadUnit) -> list[tuple[str, Any, str | None]]:
    """(raw text, parsed JSON item or None, error reason or None) of a JSON-lines or JSON-array unit."""
    items: list[tuple[str, Any, str | None]] = []
    if unit.spec.format == "instruct_json":
        data = Path(unit.path).read_bytes()
        try:
            parsed = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return [(f"{unit.path}: {err}", None, "malformed_json")]
        for item in parsed if isinstance(parsed, list) else [parsed]:
            items.append((json.dumps(item, ensure_ascii=False), item, None))
        return items
    for line in unit_lines(unit):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            items.append((line.decode("utf-8", errors="replace"), None, "invalid_utf8"))
            continue
        if not text.strip():
            continue
        try:
            items.append((text, json.loads(text), None))
        except json.JSONDecodeError:
            items.append((text, None, "malformed_json"))
    return items


def _pairs_of_item(item: Any, raw: str, spec: ReadSpec, config: ExtractConfig,
                   out: UnitOutput) -> list[dict[str, Any]]:
    try:
        turns = conversation_turns(item)
    except ConversationError as err:
        out.quarantine.append(make_quarantine_row(source=spec.source, reason=err.reason, raw=raw))
        return []
    records = []
    for prompt, response, context in prompt_response_pairs(turns, context_turns=config.context_turns):
        if response.role != ASSISTANT:
            continue
        reason = pair_reason(prompt, response, config)
        query = f"{context}\n{prompt}" if context and prompt else prompt
        if reason:
            partial = {"kind": KIND_PAIR, "query": query, "positive": response.text, "lang": spec.lang}
            out.quarantine.append(make_quarantine_row(source=spec.source, reason=reason, raw=raw, record=partial))
            continue
        records.append(make_record(kind=KIND_PAIR, query=query or "", positive=response.text or "",
                                   source=spec.source, lang=spec.lang))
    return records


def process_instruct_unit(unit: ReadUnit, config: ExtractConfig) -> UnitResult:
    """Extract, filter, normalise and sign the pairs of one unit."""
    out = UnitOutput()
    records: list[dict[str, Any]] = []
    for raw, item, error in iter_items(unit):
        if error:
            out.quarantine.append(make_quarantine_row(source=unit.spec.source, reason=error, raw=raw))
            continue
        records += _pairs_of_item(item, raw, unit.spec, config, out)
    filter_records(records, config.clean, None, out)
    return pack_unit(out, config.clean)


def _instruct_spec(spec: ReadSpec) -> ReadSpec:
    """Catalog/sniffed spec of an instruct file, with the `llm:` source tag."""
    if spec.format not in ("instruct_json", "instruct_jsonl"):
        fmt = "instruct_json" if spec.format in ("json_array",) else "instruct_jsonl"
        spec = ReadSpec(fmt, spec.source, spec.lang)
    source = spec.source if spec.source.startswith("llm:") else f"llm:{spec.source}"
    return ReadSpec(spec.format, source, spec.lang)


def run_extract(inputs: list[Path], output: Path, config: ExtractConfig, *, workers: int = 2,
                progress: bool = True, min_fanout_bytes: int | None = None) -> dict:
    """Extract (prompt, response) pairs from `inputs` (files or `group:instruct`) into a dataset; the
    fan-out as in `run_clean`."""
    entries = [(path, _instruct_spec(spec)) for path, spec in resolve_inputs(inputs)]
    units = [unit for path, spec in entries
             for unit in plan_units(path, spec, lines_per_unit=config.clean.lines_per_unit)]
    workers = fanout_workers(workers, input_bytes([path for path, _ in entries]), len(units),
                             min_bytes=min_fanout_bytes, desc="extract")
    config_dump = {"stage": "extract", "extract": config.model_dump()}
    with closing(iter_units(process_instruct_unit, units, (config,), workers=workers, progress=progress,
                            desc="extract")) as outputs:
        return finish_stage(outputs, Path(output), config_dump, config.clean, [path for path, _ in entries], None)
