"""The embedder: encode, sentence-transformers round trip, loading errors, vocabulary extension."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conan_core.errors import ModelLoadError
from conan_core.model import ConanEmbedder, pool, set_encoder_dropout
from conan_core.paths import shared_data_dir
from conan_core.testing import tiny_model
from conan_core.vocab import extend_vocabulary, iter_texts, unk_rate

TEXTS = ["the cat is on the tree", "a dog", "what is good food for a big dog and a small cat", "water"]


def test_encode_is_normalised_and_keeps_input_order():
    model = tiny_model(expand_dim=48)
    together = model.encode(TEXTS, batch_size=2)
    one_by_one = np.stack([model.encode([t])[0] for t in TEXTS])
    assert together.dtype == np.float32 and together.shape == (4, 48)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_mean_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 2.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 1.0]]


def test_save_load_round_trip_and_sentence_transformers_agree(tmp_path):
    from sentence_transformers import SentenceTransformer

    model = tiny_model(expand_dim=40, matryoshka_dims=[8, 40])
    model.save(tmp_path / "m", card={"stage": "test"})
    loaded = ConanEmbedder.load(tmp_path / "m")
    assert loaded.config.expand_dim == 40 and loaded.config.matryoshka_dims == [8, 40]
    assert loaded.config.stages == [{"stage": "test"}]
    ours = model.encode(TEXTS)
    np.testing.assert_allclose(loaded.encode(TEXTS), ours, atol=1e-6)
    st_vectors = SentenceTransformer(str(tmp_path / "m"), device="cpu").encode(TEXTS)
    assert np.abs(st_vectors - ours).max() < 1e-5
    modules = json.loads((tmp_path / "m" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert "base model" in (tmp_path / "m" / "README.md").read_text()
    assert loaded.fingerprint() == model.fingerprint()


def test_saved_model_loads_without_missing_weights_and_pooler_is_not_trained(tmp_path):
    from transformers import AutoModel

    model = tiny_model()
    assert not any(name.startswith("encoder.pooler") for name, _ in model.named_parameters())
    model.save(tmp_path / "m")
    _, info = AutoModel.from_pretrained(str(tmp_path / "m"), output_loading_info=True)
    assert not info["missing_keys"], info
    # A loaded model saves its pooler again (a second generation loads as cleanly).
    ConanEmbedder.load(tmp_path / "m").save(tmp_path / "m2")
    _, info = AutoModel.from_pretrained(str(tmp_path / "m2"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_missing_or_malformed_model_dir_is_one_line_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found") as missing:
        ConanEmbedder.load(tmp_path / "nope")
    assert "\n" not in str(missing.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as malformed:
        ConanEmbedder.load(bad)
    assert str(bad) in str(malformed.value) and "\n" not in str(malformed.value)


def test_cli_reports_a_missing_model_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "conan_cli", "model", "init", "--base", str(tmp_path / "x"),
                             "--out", str(tmp_path / "y")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "model directory not found" in result.stderr


def test_matryoshka_dims_must_fit_the_output():
    with pytest.raises(ModelLoadError):
        model = tiny_model()
        model.config.matryoshka_dims = [64]
        model._check_matryoshka_dims()


def test_vocabulary_extension_on_tiny_model():
    chinese = ["我们今天去北京", "北京大学很好", "今天天气好"]
    model = tiny_model()
    old_rows = model.encoder.get_input_embeddings().weight.detach().clone()
    before = model.encode(chinese)
    report = extend_vocabulary(model, chinese)
    assert report.unk_rate_before == 1.0 and report.unk_rate_after == 0.0
    assert report.added_tokens == len(set("".join(chinese)))
    weights = model.encoder.get_input_embeddings().weight.detach()
    assert weights.shape[0] == report.vocab_size_after == len(model.tokenizer)
    torch.testing.assert_close(weights[: old_rows.shape[0]], old_rows)
    new_rows = weights[old_rows.shape[0]:]
    assert new_rows.abs().sum(dim=1).min() > 0, "new rows must not be zeros"
    assert torch.cdist(new_rows, new_rows).fill_diagonal_(1.0).min() > 0, "new rows must differ"
    after = model.encode(chinese)
    assert before.shape == after.shape
    assert (after @ after.T)[0, 1] < 0.9999  # sentences are now distinguishable


def test_new_vocabulary_rows_start_distinguishable():
    """Issue 10: rows started at the [UNK] row + noise had cosine ~0.8 to each other (characters the model
    could not tell apart); the mean init + N(0, 0.02^2) starts them near-orthogonal around the mean."""
    chinese = ["我们今天去北京", "北京大学很好", "今天天气好", "上海的东西很贵"]

    def new_rows(init: str) -> torch.Tensor:
        model = tiny_model()
        old = model.encoder.get_input_embeddings().weight.detach().clone()
        extend_vocabulary(model, chinese, init=init)
        return model.encoder.get_input_embeddings().weight.detach()[old.shape[0]:], old

    def mean_off_diagonal_cosine(rows: torch.Tensor) -> float:
        unit = torch.nn.functional.normalize(rows, dim=-1)
        cos = unit @ unit.T
        n = cos.shape[0]
        return float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))

    rows, old = new_rows("mean")
    assert abs(mean_off_diagonal_cosine(rows)) < 0.3
    torch.testing.assert_close(rows.mean(dim=0), old.mean(dim=0), atol=0.02, rtol=0)
    unk_rows, _ = new_rows("unk")
    assert mean_off_diagonal_cosine(unk_rows) > 0.3  # a shared [UNK] start keeps them correlated


@pytest.mark.slow
def test_shipped_minilm_vocabulary_extension_and_export(tmp_path):
    from sentence_transformers import SentenceTransformer

    from conan_core.model_init import init_model

    source = shared_data_dir() / "pairs" / "text2vec_bge_zh" / "bge_finetune_data.jsonl"
    texts = list(iter_texts([source]))[:300]
    base = ConanEmbedder.from_base("all-MiniLM-L6-v2")
    assert unk_rate(base.tokenizer, texts) > 0.3
    report = init_model("all-MiniLM-L6-v2", tmp_path / "m", extend_vocab_from=[source], expand_dim=512)
    assert report["vocab"]["unk_rate_before"] > 0.3 and report["vocab"]["unk_rate_after"] < 0.01
    model = ConanEmbedder.load(tmp_path / "m")
    assert unk_rate(model.tokenizer, texts) < 0.01 and model.dim == 512
    sample = texts[:16] + ["A man is eating food.", "Someone is eating a meal."]
    ours = model.encode(sample)
    st_vectors = SentenceTransformer(str(tmp_path / "m"), device="cpu").encode(sample)
    assert np.abs(st_vectors - ours).max() < 1e-5
    # The English geometry survives the expansion layer and the new rows.
    assert ours[-1] @ ours[-2] > 0.7


def test_set_dropout_sets_attention_and_hidden_rates_apart_and_the_kernel_reads_them():
    """`hidden_dropout` / `attention_dropout` (training knobs): each rate lands on its own Dropout modules,
    the attention kernel applies the attention rate, and config.json keeps the encoder's own rates."""
    model = tiny_model(dropout=0.1)
    set_encoder_dropout(model.encoder, hidden=0.0, attention=0.3)
    layer = model.encoder.encoder.layer[0]
    assert layer.attention.self.dropout.p == 0.3
    assert layer.attention.output.dropout.p == layer.output.dropout.p == model.encoder.embeddings.dropout.p == 0.0
    assert model.encoder.config.attention_probs_dropout_prob == 0.1  # saved as the model had it

    features = model.tokenize(TEXTS)
    model.train()
    assert not torch.equal(model(features), model(features))  # only attention dropout is left: it acts
    set_encoder_dropout(model.encoder, attention=0.0)
    assert layer.output.dropout.p == 0.0  # None keeps what was set
    torch.testing.assert_close(model(features), model(features))  # no dropout left: deterministic

    with pytest.raises(ModelLoadError, match="no attention Dropout"):
        set_encoder_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)), attention=0.0)
