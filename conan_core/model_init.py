"""`conan model init`: a new model directory from a base encoder, optionally with a wider vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from conan_core.model import ConanEmbedder
from conan_core.vocab import VocabInit, extend_vocabulary, iter_texts


def init_model(base: str | Path, out: str | Path, *, expand_dim: int | None = None,
               pooling: Literal["mean", "cls"] = "mean", extend_vocab_from: Sequence[str | Path] = (),
               matryoshka_dims: Sequence[int] | None = None, max_seq_length: int = 128,
               vocab_min_freq: int = 1, vocab_max_new: int = 10_000, vocab_init: VocabInit = "mean") -> dict:
    """Build the model, extend its vocabulary from text files if given, save it; returns a report."""
    model = ConanEmbedder.from_base(base, pooling=pooling, expand_dim=expand_dim,
                                    matryoshka_dims=matryoshka_dims, max_seq_length=max_seq_length)
    report: dict = {"base": str(base), "out": str(out), "dim": model.dim, "pooling": pooling,
                    "expand_dim": expand_dim, "matryoshka_dims": list(matryoshka_dims or [])}
    card: dict = {"stage": "init", "base": str(base)}
    if extend_vocab_from:
        texts = list(iter_texts(extend_vocab_from))
        vocab = extend_vocabulary(model, texts, min_freq=vocab_min_freq, max_new_tokens=vocab_max_new,
                                  init=vocab_init)
        vocab.files = len(extend_vocab_from)
        report["vocab"] = vocab.as_dict()
        card.update(added_tokens=vocab.added_tokens, vocab_init=vocab_init,
                    unk_rate_before=round(vocab.unk_rate_before, 4),
                    unk_rate_after=round(vocab.unk_rate_after, 4))
    model.save(out, card=card)
    report["fingerprint"] = model.fingerprint()
    return report
