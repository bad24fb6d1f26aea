"""A conan model as an mteb 2 encoder (mteb's EncoderProtocol: encode a DataLoader, cosine similarity).

mteb files results under the model's name and revision; we give it `conan/<model dir name>` and the
model's weight fingerprint, so results are never filed under "no_model_name".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction

from conan_core.model import ConanEmbedder


def model_name_for(model_path: Path) -> str:
    """`conan/<dir name>` with characters mteb cannot file under replaced."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model_path).resolve().name) or "model"
    return f"conan/{stem}"


class ConanMtebEncoder(AbsEncoder):
    """Encodes mteb's batches with `ConanEmbedder.encode` (L2-normalised float32, cosine similarity)."""

    def __init__(self, model: ConanEmbedder, name: str, revision: str, batch_size: int = 64) -> None:
        self.model = model
        self.batch_size = batch_size
        self.mteb_model_meta = ModelMeta.create_empty(overwrites={
            "name": name,
            "revision": revision,
            "embed_dim": model.dim,
            "max_tokens": model.config.max_seq_length,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "similarity_fn_name": ScoringFunction.COSINE,
            "framework": ["PyTorch", "Sentence Transformers"],
            "open_weights": True,
        })

    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
               prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        # conan models take no prompts: queries and documents are encoded the same way.
        texts = [text for batch in inputs for text in batch["text"]]
        batch_size = int(kwargs.get("batch_size") or self.batch_size)
        return self.model.encode(texts, batch_size=batch_size, normalize=True, show_progress=False)
