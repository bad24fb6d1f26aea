"""Vocabulary extension: teach an English WordPiece tokenizer the characters it maps to [UNK].

all-MiniLM-L6-v2 knows 244 CJK characters, so most Chinese text becomes a row of [UNK] and every
Chinese sentence embeds to nearly the same vector. We count the characters of some text files that
the tokenizer turns into [UNK], append the frequent ones to the WordPiece vocabulary, and grow the
embedding matrix. New rows start at the mean of the existing rows plus N(0, 0.02^2) noise (the
"mean resizing" of transformers and of Hewitt 2021, with BERT's initializer range as the noise), or, with
`init="cjk_mean"`, at the mean of the CJK characters the vocabulary already has.

Why not the old [UNK] row (what the model used to see for these characters)? Its norm is ~1.2 against
~0.5 of noise, so two new characters started at cosine ~0.8 to each other: the model could not tell
Chinese characters apart and training at lr 5e-5 did not move them far enough (issue 10; untrained
LCQMC dev 0.307 vs 0.429 with the mean init). `init="unk"` keeps that behaviour for comparison.
"""

from __future__ import annotations

import json
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from conan_core.errors import ConanError
from conan_core.model import ConanEmbedder


@dataclass
class VocabReport:
    files: int
    characters_seen: int
    unk_characters: int
    added_tokens: int
    vocab_size_before: int
    vocab_size_after: int
    unk_rate_before: float
    unk_rate_after: float
    examples: list[str]

    def as_dict(self) -> dict:
        return asdict(self)


def iter_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Lines of text files; JSON lines / arrays yield their string values (escapes decoded)."""
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if not file.is_file():
                raise ConanError(f"vocabulary source not found: {file}")
            text = file.read_bytes().decode("utf-8", errors="replace")
            for line in text.split("\n"):
                yield from _strings_of_line(line)


def _strings_of_line(line: str) -> Iterator[str]:
    stripped = line.strip()
    if stripped[:1] in ("{", "[") and "\\u" in stripped:
        try:
            yield from _json_strings(json.loads(stripped))
            return
        except json.JSONDecodeError:
            pass
    if stripped:
        yield stripped


def _json_strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_strings(item)


def is_cjk(char: str) -> bool:
    """The ranges BERT's basic tokenizer splits into single-character words."""
    cp = ord(char)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def unk_rate(tokenizer, texts: list[str]) -> float:
    """Share of produced tokens that are [UNK] (special tokens excluded)."""
    unk_id = tokenizer.unk_token_id
    total = unk = 0
    for start in range(0, len(texts), 1024):
        batch = tokenizer(texts[start:start + 1024], add_special_tokens=False)["input_ids"]
        for ids in batch:
            total += len(ids)
            unk += sum(1 for i in ids if i == unk_id)
    return unk / total if total else 0.0


def unknown_characters(tokenizer, texts: Iterable[str]) -> tuple[Counter, int]:
    """Count characters that the tokenizer maps to [UNK] on their own; also the number of characters seen."""
    char_counts: Counter = Counter()
    for text in texts:
        char_counts.update(ch for ch in unicodedata.normalize("NFKC", text) if not ch.isspace())
    vocab = tokenizer.get_vocab()
    unk_id = tokenizer.unk_token_id
    normalizer = tokenizer.backend_tokenizer.normalizer
    unknown: Counter = Counter()
    for char, count in char_counts.items():
        # Count the form the WordPiece model actually sees (lower-cased, accents stripped, ...).
        seen_form = (normalizer.normalize_str(char) if normalizer is not None else char).strip()
        if len(seen_form) != 1 or seen_form in vocab:
            continue
        if tokenizer(char, add_special_tokens=False)["input_ids"] == [unk_id]:
            unknown[seen_form] += count
    return unknown, len(char_counts)


VocabInit = Literal["mean", "cjk_mean", "unk"]
NEW_ROW_NOISE_STD = 0.02  # BERT's initializer_range


def extend_vocabulary(model: ConanEmbedder, texts: list[str], *, min_freq: int = 1, max_new_tokens: int = 10_000,
                      init: VocabInit = "mean", noise_std: float = NEW_ROW_NOISE_STD, seed: int = 0) -> VocabReport:
    """Add the frequent [UNK] characters of `texts` to the model's tokenizer and embedding matrix, in place.
    init: where new rows start (see the module docstring); noise_std: the N(0, std^2) noise added to each."""
    tokenizer = model.tokenizer
    size_before = len(tokenizer)
    rate_before = unk_rate(tokenizer, texts)
    unknown, seen = unknown_characters(tokenizer, texts)
    chosen = [ch for ch, count in unknown.most_common(max_new_tokens) if count >= min_freq]
    if chosen:
        model.tokenizer = _tokenizer_with_tokens(tokenizer, chosen)
        _grow_embeddings(model, len(model.tokenizer), init=init, noise_std=noise_std, seed=seed)
    return VocabReport(files=0, characters_seen=seen, unk_characters=len(unknown), added_tokens=len(chosen),
                       vocab_size_before=size_before, vocab_size_after=len(model.tokenizer),
                       unk_rate_before=rate_before, unk_rate_after=unk_rate(model.tokenizer, texts),
                       examples=chosen[:20])


def _tokenizer_with_tokens(tokenizer, chars: list[str]):
    """Append characters to the WordPiece vocabulary itself (not as 'added tokens', which would bypass
    normalisation). CJK characters are always split into single-character words by BERT's pre-tokenizer;
    other characters also get their '##' continuation form."""
    from transformers import AutoTokenizer

    new_tokens: list[str] = []
    for char in chars:
        new_tokens.append(char)
        if not is_cjk(char):
            new_tokens.append(f"##{char}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tokenizer_file = Path(tmp) / "tokenizer.json"
        spec = json.loads(tokenizer_file.read_text())
        if spec["model"]["type"] != "WordPiece":
            raise ConanError(f"vocabulary extension supports WordPiece tokenizers, not {spec['model']['type']}")
        vocab: dict[str, int] = spec["model"]["vocab"]
        for token in new_tokens:
            if token not in vocab:
                vocab[token] = len(vocab)
        tokenizer_file.write_text(json.dumps(spec, ensure_ascii=False))
        vocab_txt = Path(tmp) / "vocab.txt"
        if vocab_txt.exists():  # keep the slow-tokenizer file consistent with tokenizer.json
            vocab_txt.write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def _grow_embeddings(model: ConanEmbedder, new_size: int, *, init: VocabInit, noise_std: float, seed: int) -> None:
    embeddings = model.encoder.get_input_embeddings()
    old = embeddings.weight.data
    old_size = old.shape[0]
    start = _start_row(model, old, init)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(new_size - old_size, old.shape[1], generator=generator) * noise_std
    model.encoder.resize_token_embeddings(new_size, mean_resizing=False)
    with torch.no_grad():
        model.encoder.get_input_embeddings().weight[old_size:] = start + noise.to(old.dtype)


def _start_row(model: ConanEmbedder, old: torch.Tensor, init: VocabInit) -> torch.Tensor:
    """The row every new token starts from (before noise)."""
    if init == "unk":
        return old[model.tokenizer.unk_token_id]
    if init == "cjk_mean":
        cjk = [i for token, i in model.tokenizer.get_vocab().items()
               if len(token) == 1 and is_cjk(token) and i < old.shape[0]]
        return old[cjk].mean(dim=0) if cjk else old.mean(dim=0)
    if init == "mean":
        return old.mean(dim=0)
    raise ConanError(f"unknown vocabulary init {init!r} (mean, cjk_mean, unk)")
