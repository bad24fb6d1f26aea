"""Built-in local tasks over ../shared/data/eval, named after their C-MTEB / MTEB counterparts.

A task keeps its C-MTEB/MTEB name where the data is that task's split (ATEC, AFQMC, STSB, QBQTC,
Ocnli, Cmnli, STSBenchmark, SICK-R, STS13-16, ...). Where only another split or a subset is here, the
name says so (LCQMC-dev, PAWSX-dev, DBPedia-subset, MSMARCO-subset); where the split was rebuilt from
the same source data, the split name and `note` say how (Waimai, OnlineShopping, TNews, IFlyTek, CLS*).
Held-out splits (LCQMC test, PAWS-X test, CMRC2018 dev) are not on disk and are never looked for.
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import partial
from pathlib import Path

from conan_core.eval.data import ClassificationData, LabelledTexts, PairData, RetrievalData
from conan_core.eval.readers import (
    TaskDataError,
    parse_float,
    read_csv_rows,
    read_jsonl,
    read_tsv,
    read_tsv_with_header,
    require_text,
)
from conan_core.eval.spec import TaskSpec, UnknownTaskError
from conan_core.eval.taskdir import check_labelled, check_pairs, read_beir
from conan_core.paths import shared_data_dir

# C-MTEB's classification counterparts train on 32 samples per label (mteb's default is 8).
_CMTEB_CLASSIFICATION = {"samples_per_label": 32}
# mteb's CLSClustering*.v2 embed 2,048 sampled documents.
_CLS_CLUSTERING = {"max_document_to_embed": 2048}


def eval_data_dir() -> Path:
    return shared_data_dir() / "eval"


# ---- loaders, one per source format ------------------------------------------------------------------
def _headerless_pairs(path: Path, label_map: dict[str, float] | None = None, binary: bool = False) -> PairData:
    """`s1<TAB>s2<TAB>label` lines; with `label_map`, labels are mapped and unmapped ones dropped."""
    data = PairData([], [], [])
    for number, (s1, s2, label) in read_tsv(path, 3):
        if label_map is not None:
            if label.strip() not in label_map:
                continue
            score = label_map[label.strip()]
        else:
            score = parse_float(path, number, label, "label")
        data.sentence1.append(require_text(path, number, s1, "sentence1"))
        data.sentence2.append(require_text(path, number, s2, "sentence2"))
        data.scores.append(score)
    check_pairs(path, data, binary)
    return data


def _tsv_pairs(path: Path, sentence1: str, sentence2: str, score: str,
               split: tuple[str, str] | None = None) -> PairData:
    """Scored pairs of a TSV with a header naming the columns; `split` = (column, value) keeps those rows."""
    columns = (sentence1, sentence2, score) + ((split[0],) if split else ())
    data = PairData([], [], [])
    for number, row in read_tsv_with_header(path, columns):
        if split and row[split[0]] != split[1]:
            continue
        data.sentence1.append(require_text(path, number, row[sentence1], sentence1))
        data.sentence2.append(require_text(path, number, row[sentence2], sentence2))
        data.scores.append(parse_float(path, number, row[score], score))
    check_pairs(path, data, binary=False)
    return data


def _pawsx(path: Path) -> PairData:
    return _tsv_pairs(path, "sentence1", "sentence2", "label")


def _qbqtc(path: Path) -> PairData:
    data = PairData([], [], [])
    for number, record in read_jsonl(path):
        data.sentence1.append(require_text(path, number, record.get("query"), "query"))
        data.sentence2.append(require_text(path, number, record.get("title"), "title"))
        data.scores.append(parse_float(path, number, str(record.get("label")), "label"))
    check_pairs(path, data, binary=False)
    return data


def _stsbenchmark(path: Path, split: str) -> PairData:
    return _tsv_pairs(path, "sentence1", "sentence2", "score", split=("split", split))


def _sick(path: Path) -> PairData:
    return _tsv_pairs(path, "sentence_A", "sentence_B", "relatedness_score")


def _semeval_year(folder: Path) -> PairData:
    """All `*.test.tsv` of one year (`score<TAB>s1<TAB>s2`); pairs without a score were not rated: skipped."""
    files = sorted(folder.glob("*.test.tsv"))
    if not files:
        raise TaskDataError(f"{folder}: no *.test.tsv files")
    data = PairData([], [], [])
    for path in files:
        for number, (score, s1, s2) in read_tsv(path, 3):
            if not score.strip():
                continue
            data.sentence1.append(require_text(path, number, s1, "sentence1"))
            data.sentence2.append(require_text(path, number, s2, "sentence2"))
            data.scores.append(parse_float(path, number, score))
    check_pairs(folder, data, binary=False)
    return data


def _fewclue_texts(path: Path, label_key: str) -> LabelledTexts:
    data = LabelledTexts([], [])
    for number, record in read_jsonl(path):
        data.texts.append(require_text(path, number, record.get("sentence"), "sentence"))
        data.labels.append(require_text(path, number, record.get(label_key), label_key))
    check_labelled(path, data)
    return data


def _fewclue(folder: Path, label_key: str) -> ClassificationData:
    return ClassificationData(_fewclue_texts(folder / "train_few_all.json", label_key),
                              _fewclue_texts(folder / "test_public.json", label_key))


def _review_csv(path: Path, n_test: int = 1000, n_train: int = 8000) -> ClassificationData:
    """Sentiment reviews (`label`, `review`): a seeded shuffle, first `n_test` rows test, next `n_train` train
    (the sizes of C-MTEB's Waimai / OnlineShopping, whose exact rows are not known here)."""
    rows = [(row["review"].strip(), row["label"].strip()) for _, row in read_csv_rows(path, ("label", "review"))]
    rows = [(text, label) for text, label in rows if text and label]
    random.Random(0).shuffle(rows)
    test, train = rows[:n_test], rows[n_test:n_test + n_train]
    data = ClassificationData(LabelledTexts([t for t, _ in train], [lb for _, lb in train]),
                              LabelledTexts([t for t, _ in test], [lb for _, lb in test]))
    check_labelled(path, data.train)
    return data


def _csl_rows(path: Path) -> list[tuple[str, str]]:
    return [(require_text(path, number, text, "text"), label.strip()) for number, (_, text, label) in read_tsv(path, 3)]


def _cls_s2s(folder: Path) -> LabelledTexts:
    """Paper titles of the CSL cls_ctg test split, labelled with their 13 coarse categories. Only test:
    the dev papers' titles and abstracts are pretraining pairs (pairs/csl_title_keywords_abstract)."""
    rows = _csl_rows(folder / "cls_ctg" / "test.tsv")
    data = LabelledTexts([t for t, _ in rows], [lb for _, lb in rows])
    check_labelled(folder, data)
    return data


def _cls_p2p(folder: Path) -> LabelledTexts:
    """Title + abstract, labelled with the 13 categories: cls_ctg (titles) and cls_dcp (abstracts) list the
    same papers in the same order. Only test: the dev papers are pretraining pairs."""
    data = LabelledTexts([], [])
    for split in ("test",):
        titles = _csl_rows(folder / "cls_ctg" / f"{split}.tsv")
        abstracts = _csl_rows(folder / "cls_dcp" / f"{split}.tsv")
        if len(titles) != len(abstracts):
            raise TaskDataError(f"{folder}: cls_ctg/{split}.tsv and cls_dcp/{split}.tsv differ in length")
        data.texts += [f"{title} {abstract.strip()}" for (title, _), (abstract, _) in zip(titles, abstracts,
                                                                                           strict=True)]
        data.labels += [label for _, label in titles]
    check_labelled(folder, data)
    return data


def _beir(folder: Path, split: str) -> RetrievalData:
    return read_beir(folder, split, strict=False)


# ---- the registry -----------------------------------------------------------------------------------------
_NLI = {"entailment": 1.0, "contradiction": 0.0}  # C-MTEB: neutral pairs dropped


def _specs(root: Path) -> list[TaskSpec]:
    sts = root / "en_semeval_sts"
    zh = [
        TaskSpec("ATEC", "STS", "zh", "test", "atec/ATEC.test.data",
                 partial(_headerless_pairs, root / "atec/ATEC.test.data")),
        TaskSpec("AFQMC", "STS", "zh", "dev", "afqmc/dev.txt", partial(_headerless_pairs, root / "afqmc/dev.txt"),
                 note="C-MTEB's 'validation' split"),
        TaskSpec("LCQMC-dev", "STS", "zh", "dev", "lcqmc_dev/dev.txt",
                 partial(_headerless_pairs, root / "lcqmc_dev/dev.txt"),
                 note="C-MTEB LCQMC scores the test split, held out here; dev minus pairs overlapping test"),
        TaskSpec("PAWSX-dev", "STS", "zh", "dev", "pawsx_zh_dev/dev_2k.tsv",
                 partial(_pawsx, root / "pawsx_zh_dev/dev_2k.tsv"),
                 note="C-MTEB PAWSX scores the test split, held out here; dev minus pairs overlapping test"),
        TaskSpec("STSB", "STS", "zh", "test", "chinese_stsb/test.txt",
                 partial(_headerless_pairs, root / "chinese_stsb/test.txt")),
        TaskSpec("QBQTC", "STS", "zh", "test_public", "qbqtc/test_public.json",
                 partial(_qbqtc, root / "qbqtc/test_public.json"), note="C-MTEB's 'test' split"),
        TaskSpec("Ocnli", "PairClassification", "zh", "dev", "ocnli/dev.txt",
                 partial(_headerless_pairs, root / "ocnli/dev.txt", _NLI, True),
                 note="entailment=1, contradiction=0, neutral dropped (as C-MTEB)"),
        TaskSpec("Cmnli", "PairClassification", "zh", "dev", "cmnli/dev.txt",
                 partial(_headerless_pairs, root / "cmnli/dev.txt", _NLI, True),
                 note="entailment=1, contradiction=0, neutral dropped (as C-MTEB)"),
        TaskSpec("TNews", "Classification", "zh", "fewclue_test_public", "fewclue/tnews",
                 partial(_fewclue, root / "fewclue/tnews", "label_desc"), mteb_options=_CMTEB_CLASSIFICATION,
                 note="FewCLUE: train_few_all to train, test_public to test (C-MTEB: CLUE train/validation)"),
        TaskSpec("IFlyTek", "Classification", "zh", "fewclue_test_public", "fewclue/iflytek",
                 partial(_fewclue, root / "fewclue/iflytek", "label_des"),
                 mteb_options={**_CMTEB_CLASSIFICATION, "n_experiments": 5},
                 note="FewCLUE: train_few_all to train, test_public to test (C-MTEB: CLUE train/validation)"),
        TaskSpec("Waimai", "Classification", "zh", "seeded_test_1000", "waimai_10k/waimai_10k.csv",
                 partial(_review_csv, root / "waimai_10k/waimai_10k.csv"), mteb_options=_CMTEB_CLASSIFICATION,
                 note="seeded 1,000 test / 8,000 train rows of the full csv (C-MTEB's sizes, not its rows)"),
        TaskSpec("OnlineShopping", "Classification", "zh", "seeded_test_1000",
                 "online_shopping_10_cats/online_shopping_10_cats.csv",
                 partial(_review_csv, root / "online_shopping_10_cats/online_shopping_10_cats.csv"),
                 mteb_options=_CMTEB_CLASSIFICATION,
                 note="sentiment; seeded 1,000 test / 8,000 train rows (C-MTEB's sizes, not its rows)"),
        TaskSpec("CLSClusteringS2S", "Clustering", "zh", "test", "csl_cls/cls_ctg/test.tsv",
                 partial(_cls_s2s, root / "csl_cls"), mteb_options=_CLS_CLUSTERING,
                 note="1,000 CSL test titles, 13 categories (train/dev papers overlap pretraining pairs)"),
        TaskSpec("CLSClusteringP2P", "Clustering", "zh", "test", "csl_cls",
                 partial(_cls_p2p, root / "csl_cls"), mteb_options=_CLS_CLUSTERING,
                 note="1,000 CSL test title+abstract, 13 categories (dev papers overlap pretraining pairs)"),
        TaskSpec("CMRC2018TrialRetrieval", "Retrieval", "zh", "trial", "cmrc2018_trial_retrieval",
                 partial(_beir, root / "cmrc2018_trial_retrieval", "trial"),
                 note="1,000 questions (2 empty ones dropped) over 256 paragraphs of the CMRC2018 trial set; "
                      "small, easy"),
    ]
    en = [
        TaskSpec("STSBenchmark", "STS", "en", "test", "en_stsbenchmark/stsbenchmark.tsv",
                 partial(_stsbenchmark, root / "en_stsbenchmark/stsbenchmark.tsv", "test")),
        TaskSpec("SICK-R", "STS", "en", "test", "en_sick2014/SICK_test_annotated.txt",
                 partial(_sick, root / "en_sick2014/SICK_test_annotated.txt")),
        TaskSpec("STS12", "STS", "en", "test", "en_semeval_sts/2012", partial(_semeval_year, sts / "2012"),
                 note="without the MSRvid part (not in the source for licence reasons): 2,358 of 3,108 pairs"),
        *[TaskSpec(f"STS{year % 100}", "STS", "en", "test", f"en_semeval_sts/{year}",
                   partial(_semeval_year, sts / str(year))) for year in (2013, 2014, 2015, 2016)],
        TaskSpec("DBPedia-subset", "Retrieval", "en", "test", "en_beir_dbpedia_subset",
                 partial(_beir, root / "en_beir_dbpedia_subset", "test"),
                 note="50 queries (the 40 with a relevant doc are scored), 5,000 docs: "
                      "not comparable to full BEIR DBPedia"),
        TaskSpec("MSMARCO-subset", "Retrieval", "en", "test", "en_beir_msmarco_subset",
                 partial(_beir, root / "en_beir_msmarco_subset", "test"),
                 note="50 TREC-DL queries (the 43 with a relevant passage are scored), 5,000 passages: "
                      "not MTEB MSMARCO (dev)"),
    ]
    return zh + en


def builtin_tasks(data_dir: Path | None = None) -> dict[str, TaskSpec]:
    """Name -> spec of every built-in task (nothing is read until `spec.load()`); `source` is the full path."""
    root = Path(data_dir) if data_dir is not None else eval_data_dir()
    return {spec.name: replace(spec, source=str(root / spec.source)) for spec in _specs(root)}


def task_groups() -> dict[str, list[str]]:
    """Named groups: zh-default (the Chinese tasks), en-default, quick (small, for tests / the demo), all."""
    specs = _specs(eval_data_dir())
    zh = [s.name for s in specs if s.lang == "zh"]
    en = [s.name for s in specs if s.lang == "en"]
    return {"zh-default": zh, "en-default": en, "all": zh + en,
            "quick": ["PAWSX-dev", "Ocnli", "TNews", "CLSClusteringS2S", "CMRC2018TrialRetrieval", "STSBenchmark"]}


def list_builtin_tasks() -> list[dict[str, str]]:
    """One row per built-in task: name, type, lang, split, data path, note."""
    return [{"name": s.name, "type": s.type, "lang": s.lang, "split": s.split, "path": s.source, "note": s.note}
            for s in builtin_tasks().values()]


def resolve_task_names(names: list[str]) -> list[TaskSpec]:
    """Expand group names and look up tasks, in order, without duplicates."""
    tasks, groups = builtin_tasks(), task_groups()
    resolved: list[str] = []
    for name in names:
        expanded = groups.get(name, [name])
        for task_name in expanded:
            if task_name not in tasks:
                raise UnknownTaskError(f"unknown task {task_name!r}; groups: {', '.join(groups)}; tasks: "
                                       f"{', '.join(tasks)}")
            if task_name not in resolved:
                resolved.append(task_name)
    return [tasks[name] for name in resolved]
