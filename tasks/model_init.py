"""Prefect task: `conan_core.model_init.init_model` (base encoder, pooling, expansion, vocabulary extension)."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.artifacts import publish_link, publish_table
from tasks.cache import stage_output, stage_task_options
from tasks.progress import call_logged


@task(**stage_task_options("init-model"))
def init_model_task(base: str, base_fingerprint: str, output: str, options: dict[str, Any],
                    vocab_texts: list[str], vocab_fingerprint: str) -> dict[str, Any]:
    """Build the starting model at `output`; `options` are init_model's keyword options; `vocab_texts` the
    text files whose [UNK] characters extend the vocabulary (fingerprints keep the cache key honest)."""
    from conan_core.model_init import init_model

    report, _ = call_logged("init model", init_model, base, output, extend_vocab_from=vocab_texts, **options)
    vocab = report.get("vocab") or {}
    publish_table("init-model-report", [{"field": key, "value": str(value)} for key, value in report.items()
                                        if key != "vocab"]
                  + [{"field": f"vocab.{key}", "value": str(value)} for key, value in vocab.items()
                     if not isinstance(value, list | dict)],
                  "starting model: dims, pooling and the vocabulary extension ([UNK] rate before / after)")
    publish_link("init-model-dir", output, "starting model dir (sentence-transformers format)")
    return stage_output(output, dim=report.get("dim"), vocab={k: v for k, v in vocab.items()
                                                              if not isinstance(v, list | dict)})
