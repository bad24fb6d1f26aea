"""LLM prompt -> response extraction: pairing rules, every filter counted, source tags, CLI."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from conan_core.clean.config import CleanConfig, ExtractConfig
from conan_core.extract import run_extract
from conan_core.io.conversations import conversation_turns, prompt_response_pairs
from conan_core.io.dataset import read_dataset, read_quarantine

GOOD_ANSWER = "光合作用是植物利用光能把二氧化碳和水合成有机物的过程。"


def _chat_file(path: Path) -> Path:
    items = [
        {"conversations": [{"from": "system", "value": "You are helpful."},
                           {"from": "human", "value": "什么是光合作用？"}, {"from": "gpt", "value": GOOD_ANSWER},
                           {"from": "human", "value": "Tell me a joke about cats please"},
                           {"from": "gpt", "value": "I'm sorry, but I cannot help with that request."}]},
        {"messages": [{"role": "user", "content": "Book a flight to Paris for me"},
                      {"role": "assistant", "content": '{"name": "book_flight", "arguments": {"to": "Paris"}}'}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                      {"role": "assistant", "content": "It is a picture of a cat sitting on a mat."}]},
        {"instruction": "写一首诗", "input": "", "output": "好"},
        {"instruction": "作为AI你怎么看", "input": "", "output": "作为一个人工智能语言模型，我没有个人观点。"},
        {"conversations": [{"from": "human", "value": "Explain gravity in one sentence"}],
         "chosen": {"from": "gpt", "value": "Gravity is the attraction between masses."}},
        {"messages": [{"role": "user", "content": "Rate this"}, {"role": "assistant", "content": "Bad rating text"}],
         "label": False},
        {"instruction": "什么是光合作用？", "output": GOOD_ANSWER},
        {"instruction": "<|im_start|>user say hi", "output": "Hello, nice to meet you there!"},
        {"weird": 1},
    ]
    path.write_text("\n".join(json.dumps(item, ensure_ascii=False) for item in items) + "\n{not json\n",
                    encoding="utf-8")
    return path


def test_pairs_follow_user_turns_and_drop_system() -> None:
    turns = conversation_turns({"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "u1"}, {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "u2"}, {"from": "gpt", "value": "a2"}, {"from": "gpt", "value": "a3"}]})
    pairs = prompt_response_pairs(turns)
    assert [(p, a.text) for p, a, _ in pairs] == [("u1", "a1"), ("u2", "a2")]  # a3 has no user turn before it
    with_context = prompt_response_pairs(turns, context_turns=2)
    assert with_context[1][2] == "u1\na1" and with_context[0][2] == ""


def test_extract_counts_every_filter(tmp_path: Path) -> None:
    manifest = run_extract([_chat_file(tmp_path / "chat.jsonl")], tmp_path / "out",
                           ExtractConfig(clean=CleanConfig(decontaminate=False)), workers=0, progress=False)
    kept = read_dataset(tmp_path / "out")
    assert [(q, p) for q, p in zip(kept.column("query").to_pylist(), kept.column("positive").to_pylist(),
                                   strict=True)] == [
        ("什么是光合作用?", GOOD_ANSWER),  # NFKC turns the full-width question mark into "?"
        ("Explain gravity in one sentence", "Gravity is the attraction between masses."),
    ]
    assert set(kept.column("source").to_pylist()) == {"llm:chat"}
    assert manifest["counts"]["dropped_by_reason"] == {
        "boilerplate": 1, "duplicate": 1, "malformed_json": 1, "non_text_turn": 1, "refusal": 2,
        "response_too_short": 1, "tool_call": 1, "undesirable_response": 1, "unknown_format": 1}
    assert read_quarantine(tmp_path / "out").num_rows == manifest["counts"]["dropped"] == 10


def test_extract_on_worker_processes_is_identical(tmp_path: Path, monkeypatch) -> None:
    from conan_core import raymap

    monkeypatch.setattr(raymap, "uses_ray", lambda: False)  # local processes even if a test left Ray running
    source = _chat_file(tmp_path / "chat.jsonl")
    config = ExtractConfig(clean=CleanConfig(decontaminate=False, lines_per_unit=3))  # several units
    local = run_extract([source], tmp_path / "local", config, workers=0, progress=False)
    fanned = run_extract([source], tmp_path / "fanned", config, workers=2, progress=False, min_fanout_bytes=0)
    assert local["shards"] == fanned["shards"] and local["quarantine_shards"] == fanned["quarantine_shards"]
    assert local["counts"] == fanned["counts"]


def test_cli_extract_and_sources(tmp_path: Path) -> None:
    from conan_cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["extract", "--input", str(_chat_file(tmp_path / "chat.jsonl")),
                                 "--output", str(tmp_path / "out"), "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "kept 2, dropped 10" in result.output
    result = runner.invoke(app, ["data", "sources", "--json"])
    assert result.exit_code == 0 and any(row["groups"] == "instruct" for row in json.loads(result.output))
    result = runner.invoke(app, ["clean", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no such file" in result.output
