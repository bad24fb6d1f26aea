"""Settings of `conan clean` and `conan extract` (pydantic; every field has a default)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CleanConfig(BaseModel):
    """Rule cleaning, dedup and the optional teacher-score filter (Conan-embedding §3.1)."""

    model_config = ConfigDict(extra="forbid")

    nfkc: bool = True
    fix_mojibake: bool = True  # ftfy
    strip_html: bool = True
    traditional_to_simplified: bool = False  # opencc t2s
    min_chars: int = Field(1, ge=0)  # per side, after normalisation
    max_chars: int = Field(4096, ge=1)
    min_tokens: int = Field(1, ge=0)
    max_tokens: int = Field(1024, ge=1)
    tokenizer: str | None = None  # HF tokenizer dir for token counts; None: CJK char = 1 token, word = 1 token
    langs: list[str] | None = None  # keep only rows whose detected language is one of these (zh, en, other)
    drop_identical_sides: bool = True
    exact_dedup: bool = True
    near_dedup: bool = True
    # Kinds whose near-duplicates are dropped. STS and classification rows are labelled: two STS pairs that
    # differ by one word but carry different scores are the very signal CoSENT learns from, so by default
    # they get exact dedup only.
    near_dedup_kinds: list[str] = ["pair", "retrieval"]
    minhash_threshold: float = Field(0.9, gt=0.0, le=1.0)  # Jaccard of character n-grams
    minhash_num_perm: int = Field(128, ge=16)
    minhash_ngram: int = Field(3, ge=1)  # characters, so Chinese works without a segmenter
    minhash_seed: int = 1
    min_teacher_score: float = 0.4  # the paper's cut-off
    teacher_kinds: list[str] = ["pair", "retrieval"]  # kinds whose two sides should be semantically close
    teacher_batch_size: int = Field(64, ge=1)
    decontaminate: bool = True  # drop rows repeating a catalogued eval pair (or eval text, for classification)
    # Work unit of a line file: small enough that two workers get even shares of a 100k-line file (20 units),
    # large enough that a unit's fixed costs (task, file seek, numpy passes) stay well under 1% of its work.
    lines_per_unit: int = Field(5_000, ge=1)
    shard_rows: int = Field(200_000, ge=1)


class ExtractConfig(BaseModel):
    """(prompt, response) extraction from LLM instruction/chat data (Conan-embedding §3.1)."""

    model_config = ConfigDict(extra="forbid")

    context_turns: int = Field(0, ge=0)  # earlier turns prepended to the prompt (0: the user turn only)
    min_response_chars: int = Field(8, ge=0)
    max_response_chars: int = Field(4096, ge=1)
    min_prompt_chars: int = Field(2, ge=0)
    max_prompt_chars: int = Field(4096, ge=1)
    drop_refusals: bool = True
    drop_tool_calls: bool = True
    drop_boilerplate: bool = True
    clean: CleanConfig = CleanConfig(max_chars=8192, max_tokens=4096)  # normalisation + dedup settings
