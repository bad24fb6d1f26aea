"""The finetuning recipe of issue 10: optimizer groups, one source per STS batch, no repeated negatives,
capped classification queries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conan_core.io.dataset import write_dataset
from conan_core.schema import make_record, records_table
from conan_core.testing import tiny_model
from conan_core.train import workload as workload_module
from conan_core.train.config import FinetuneConfig, LayoutConfig, PretrainConfig
from conan_core.train.data import TokenBank, classification_as_retrieval
from conan_core.train.loop import make_optimizer, set_lr
from conan_core.train.objective import StepEncoder
from conan_core.train.workload import FinetuneWorkload


def test_word_embeddings_get_their_own_lr_and_no_decay_on_embeddings_norms_biases():
    model = tiny_model()
    config = PretrainConfig(lr=2e-5, weight_decay=0.01, embedding_lr_scale=10.0)
    optimizer = make_optimizer(model, config)
    groups = {g["name"]: g for g in optimizer.param_groups}
    word = model.encoder.get_input_embeddings().weight
    assert [p is word for p in groups["word_embeddings"]["params"]] == [True]
    assert groups["word_embeddings"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [names[id(p)] for p in groups["no_decay"]["params"]]
    assert any("LayerNorm" in n for n in no_decay) and any(n.endswith("bias") for n in no_decay)
    assert any("position_embeddings" in n for n in no_decay)
    decayed = [names[id(p)] for p in groups["decay"]["params"]]
    assert decayed and all(n.endswith("weight") and "LayerNorm" not in n and "embeddings" not in n
                           for n in decayed)
    assert groups["decay"]["weight_decay"] == 0.01
    counted = sum(len(g["params"]) for g in optimizer.param_groups)
    assert counted == len([p for p in model.parameters() if p.requires_grad])
    set_lr(optimizer, 1e-5)
    assert groups["word_embeddings"]["lr"] == pytest.approx(1e-4)
    assert groups["decay"]["lr"] == groups["no_decay"]["lr"] == pytest.approx(1e-5)


def _write(path: Path, records: list) -> Path:
    write_dataset(path, records_table(records), None, config={}, inputs=[], counts={"rows": len(records)})
    return path


def _finetune_data(path: Path) -> Path:
    records = [make_record(kind="retrieval", query=f"query {i} about a cat", positive=f"answer {i} a cat",
                           negatives=["only one negative"] if i == 0 else [f"neg {i} {j}" for j in range(6)],
                           source="ret", lang="en") for i in range(12)]
    records += [make_record(kind="sts", query=f"binary {i}", positive=f"pair {i}", score=float(i % 2),
                            source="binary_0_1", lang="en") for i in range(20)]
    records += [make_record(kind="sts", query=f"graded {i}", positive=f"other {i}", score=float(i % 6),
                            source="graded_0_5", lang="en") for i in range(20)]
    return _write(path, records)


def _task(data: Path, **config) -> FinetuneWorkload:
    model = tiny_model()
    encode = StepEncoder(model, TokenBank(model.tokenizer, 32), torch.device("cpu"))
    cfg = FinetuneConfig(layout=LayoutConfig(retrieval_group=2, sts_workers=1), negatives_per_rank=2, **config)
    return FinetuneWorkload(cfg, [data], encode.bank, encode)


def test_every_sts_batch_comes_from_one_source(tmp_path: Path):
    task = _task(_finetune_data(tmp_path / "ft"), retrieval_batch=4, sts_batch=8)
    stream = task.streams["sts"]
    for _ in range(3 * stream.batches_per_epoch):
        sources = {task.sts.sources[i] for i in stream.next()}
        assert len(sources) == 1, f"an STS batch mixes label scales: {sources}"


def test_short_negative_lists_are_masked_not_repeated(tmp_path: Path, monkeypatch):
    task = _task(_finetune_data(tmp_path / "ft"), retrieval_batch=12, sts_batch=8, mode="cbb")
    seen = {}

    def capture(encode, batch, shape, **kwargs):
        seen["batch"] = batch
        raise StopIteration

    monkeypatch.setattr(workload_module, "cbb_objective", capture)
    with pytest.raises(StopIteration):
        task.step(1)
    batch = seen["batch"]
    row = batch.queries.index("query 0 about a cat")
    texts = [t for g in (0, 1) for t in batch.negatives[g][row]]
    assert texts.count("only one negative") == 1
    assert batch.neg_mask[row].tolist() == [False, True, True, True]
    assert not batch.neg_mask[[r for r in range(12) if r != row]].any()


def test_masked_slot_leaves_the_softmax():
    from conan_core.losses.infonce import hard_negative_infonce

    torch.manual_seed(0)
    q, p = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1), torch.nn.functional.normalize(
        torch.randn(2, 8), dim=-1)
    negs = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)
    mask = torch.tensor([[False, True, True], [False, False, False]])
    masked = hard_negative_infonce(q, p, negs, in_batch=True, neg_mask=mask)
    row0 = hard_negative_infonce(q[:1], p, negs[:1, :1], in_batch=True)
    row1 = hard_negative_infonce(q[1:], p[[1, 0]], negs[1:], in_batch=True)
    torch.testing.assert_close(masked, (row0 + row1) / 2)


def test_classification_queries_are_capped_per_source():
    rows = [{"id": f"r{i}", "query": f"review {i}", "label": str(i % 2), "source": "sentiment"} for i in range(50)]
    rows += [{"id": f"t{i}", "query": f"news {i}", "label": str(i % 5), "source": "topics"} for i in range(20)]
    out = classification_as_retrieval(rows, n_negatives=3, seed=0, max_per_source=10)
    sources = [i[0] for i in out.ids]
    assert sources.count("r") == 10 and sources.count("t") == 10
    assert len(set(out.ids)) == len(out.ids)
    uncapped = classification_as_retrieval(rows, n_negatives=3, seed=0)
    assert len(uncapped) == 70
    assert np.all([len(n) == 3 for n in out.negatives])


def test_training_uses_the_models_matryoshka_dims(tmp_path: Path):
    """model.matryoshka_dims (set at init) is what both stages train with: the only owner of the value."""
    data = _finetune_data(tmp_path / "ft")
    for dims, want in ((None, ()), ([8, 32], (8, 32))):
        model = tiny_model(matryoshka_dims=dims)
        encode = StepEncoder(model, TokenBank(model.tokenizer, 32), torch.device("cpu"))
        cfg = FinetuneConfig(layout=LayoutConfig(retrieval_group=2, sts_workers=1), negatives_per_rank=2,
                             retrieval_batch=4, sts_batch=8)
        task = FinetuneWorkload(cfg, [data], encode.bank, encode)
        assert task.matryoshka.dims == want
        pairs = _write(tmp_path / f"pairs{len(want)}", [
            make_record(kind="pair", query=f"q {i}", positive=f"p {i}", source="s", lang="en") for i in range(8)])
        pretrain = workload_module.PretrainWorkload(PretrainConfig(batch_size=4), [pairs], encode.bank, encode)
        assert pretrain.matryoshka.dims == want


def test_matryoshka_dims_in_a_training_config_fail_validation():
    with pytest.raises(ValueError, match="model.matryoshka_dims"):
        PretrainConfig.model_validate({"matryoshka_dims": [64]})
    with pytest.raises(ValueError, match="model.matryoshka_dims"):
        FinetuneConfig.model_validate({"matryoshka_dims": [64]})
