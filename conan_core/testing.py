"""Small fixtures for tests: a randomly initialised tiny BERT with a real WordPiece tokenizer."""

from __future__ import annotations

import string
from collections.abc import Iterable

from conan_core.model import ConanEmbedder, ModelConfig

_BASE_WORDS = ("the a is of and to in on for with what how why who query answer positive negative text "
               "cat dog car house tree water food music book city good bad new old big small").split()


def tiny_vocab(extra_texts: Iterable[str] = ()) -> list[str]:
    """Special tokens, ASCII characters (and their ## forms), some words, and every character of extra_texts."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    extra = sorted({ch for text in extra_texts for ch in text if not ch.isspace()} - set(chars))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars] + list(_BASE_WORDS)
    return list(dict.fromkeys(tokens + extra))


def tiny_model(vocab_texts: Iterable[str] = (), *, expand_dim: int | None = None, seed: int = 0,
               matryoshka_dims: list[int] | None = None, max_seq_length: int = 32,
               dropout: float = 0.0) -> ConanEmbedder:
    """A 2-layer, hidden-32 BERT with random weights: fast, deterministic for a seed, no download.
    dropout: its hidden and attention dropout (0: a train-mode forward is deterministic)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(seed)
    # transformers 5 takes the WordPiece vocabulary as `vocab` (a {token: id} dict); `vocab_file=` is ignored.
    vocab = {token: index for index, token in enumerate(tiny_vocab(vocab_texts))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    encoder = BertModel(config)  # with the [CLS] pooler, as real BERTs: ConanEmbedder sets it aside
    model_config = ModelConfig(base="tiny-random-bert", expand_dim=expand_dim, matryoshka_dims=matryoshka_dims,
                               max_seq_length=max_seq_length)
    return ConanEmbedder(encoder, tokenizer, model_config)
