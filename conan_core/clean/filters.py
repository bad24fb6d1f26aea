"""Rule filters of the clean stage: each returns the quarantine reason of a record, or None to keep it."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from conan_core.clean.config import CleanConfig
from conan_core.clean.normalise import approx_token_count, detect_lang
from conan_core.schema import KIND_CLASSIFICATION, KIND_STS

EMPTY_SIDE = "empty_side"
IDENTICAL_SIDES = "identical_sides"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
INVALID_SCORE = "invalid_score"
MISSING_LABEL = "missing_label"
LANGUAGE = "language"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near_duplicate"
TEACHER_SCORE = "teacher_score_below_min"
EVAL_OVERLAP = "eval_overlap"


@lru_cache(maxsize=4)
def _hf_token_counter(tokenizer_dir: str) -> Callable[[str], int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_counter(config: CleanConfig) -> Callable[[str], int]:
    return _hf_token_counter(config.tokenizer) if config.tokenizer else approx_token_count


def sides(record: dict[str, Any]) -> list[str]:
    """The texts a record's length rules apply to: query, positive (not for classification), negatives."""
    texts = [record["query"]]
    if record["kind"] != KIND_CLASSIFICATION:
        texts.append(record["positive"])
    return texts + list(record["negatives"])


def _length_reason(text: str, config: CleanConfig, count_tokens: Callable[[str], int]) -> str | None:
    if len(text) < config.min_chars:
        return TOO_SHORT
    if len(text) > config.max_chars:
        return TOO_LONG
    if config.min_tokens > 1 or config.tokenizer or len(text) > config.max_tokens:
        tokens = count_tokens(text)  # only when it can matter: a text shorter than max_tokens chars is fine
        if tokens < config.min_tokens:
            return TOO_SHORT
        if tokens > config.max_tokens:
            return TOO_LONG
    return None


def rule_reason(record: dict[str, Any], config: CleanConfig) -> str | None:
    """Why a normalised record should be dropped by the rules, or None."""
    texts = sides(record)
    if any(not text for text in texts[:2]):
        return EMPTY_SIDE
    if record["kind"] == KIND_STS and (record["score"] is None or not math.isfinite(record["score"])):
        return INVALID_SCORE
    if record["kind"] == KIND_CLASSIFICATION and not record["label"]:
        return MISSING_LABEL
    if (config.drop_identical_sides and record["kind"] != KIND_CLASSIFICATION
            and record["query"] == record["positive"]):
        return IDENTICAL_SIDES
    count_tokens = token_counter(config)
    for text in texts:
        reason = _length_reason(text, config, count_tokens) if text else EMPTY_SIDE
        if reason:
            return reason
    if config.langs is not None and detect_lang(record["query"]) not in config.langs:
        return LANGUAGE
    return None
