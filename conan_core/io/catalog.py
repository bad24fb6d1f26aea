"""Catalog of the shared data (`../shared/data`): each file's reader spec, and the named input groups.

This module depends on `conan_core.io.readers`, never the other way: `read_file` (a file read with its
catalogued spec, else a sniffed one) lives here because it needs the catalog.

Groups: `pretrain_pairs` (weak pairs for pretraining), `finetune` (retrieval with negatives, STS,
classification), `instruct` (LLM data for `conan extract`), `eval_only` (files `conan eval` scores:
never in a training group). Where a dataset is both trained on and evaluated, only its train split
is catalogued for training (see docs/data.md, "`conan data sources`").
"""

from __future__ import annotations

import os
from pathlib import Path

from conan_core.errors import ConanError
from conan_core.io.readers import FieldMap, ReaderError, ReadResult, ReadSpec, plan_units, read_unit, sniff_spec
from conan_core.paths import shared_data_dir
from conan_core.schema import KIND_CLASSIFICATION, KIND_PAIR, KIND_RETRIEVAL, KIND_STS

_NLI_ENTAILMENT = ((2, ("entailment",)),)


def _tsv_sts(source: str, lang: str = "zh", *, q: int = 0, p: int = 1, s: int = 2) -> ReadSpec:
    return ReadSpec("tsv", source, lang, FieldMap(kind=KIND_STS, query=q, positive=p, score=s))


def _tsv_positive_pairs(source: str, lang: str = "zh") -> ReadSpec:
    """0/1-labelled sentence pairs, keeping only label 1 as weak positive pairs."""
    return ReadSpec("tsv", source, lang, FieldMap(kind=KIND_PAIR, query=0, positive=1, where=((2, ("1",)),)))


# Training files: relative path -> spec. Split roles are explicit in the names.
TRAIN_FILES: dict[str, ReadSpec] = {
    # weak pairs (pretraining)
    "pairs/csl_title_keywords_abstract/ts/dev.tsv": ReadSpec(
        "tsv", "csl_title_abstract", "zh", FieldMap(kind=KIND_PAIR, query=2, positive=1)),
    "pairs/csl_title_keywords_abstract/kg/dev.tsv": ReadSpec(
        "tsv", "csl_keywords_abstract", "zh", FieldMap(kind=KIND_PAIR, query=2, positive=1)),
    "pairs/simclue_train/train_pair_postive_1w.json": ReadSpec(
        "jsonl", "simclue_positive", "zh", FieldMap(kind=KIND_PAIR, query="query", positive="title")),
    "pairs/text2vec_bge_zh/snli_zh_50.jsonl": ReadSpec(
        "jsonl", "snli_zh", "zh", FieldMap(kind=KIND_PAIR, query="text1", positive="text2",
                                           where=(("label", ("1",)),))),
    "eval/qbqtc/dev.json": ReadSpec(
        "jsonl", "qbqtc_dev_label2", "zh", FieldMap(kind=KIND_PAIR, query="query", positive="title",
                                                   where=(("label", ("2",)),))),
    "eval/csnli/dev.txt": ReadSpec("tsv", "csnli_entailment", "zh",
                                   FieldMap(kind=KIND_PAIR, query=0, positive=1, where=_NLI_ENTAILMENT)),
    "eval/csnli/test.txt": ReadSpec("tsv", "csnli_entailment", "zh",
                                    FieldMap(kind=KIND_PAIR, query=0, positive=1, where=_NLI_ENTAILMENT)),
    "eval/oppo_xiaobu/dev.txt": _tsv_positive_pairs("oppo_xiaobu"),
    "pairs/en_trecqa_wang/train.csv": ReadSpec(
        "csv", "trecqa_train", "en", FieldMap(kind=KIND_PAIR, query="qtext", positive="atext",
                                              where=(("label", ("1",)),)), header=True, delimiter=","),
    "eval/fewclue/tnews/train_few_all.json": ReadSpec(
        "jsonl", "tnews_title_keywords", "zh", FieldMap(kind=KIND_PAIR, query="sentence", positive="keywords")),
    "eval/sohu_2021/dd-test.jsonl": ReadSpec(
        "jsonl", "sohu_dd", "zh", FieldMap(kind=KIND_PAIR, query="sentence1", positive="sentence2",
                                           where=(("label", ("5",)),))),  # 0/3/5 scale: 5 = matches
    "eval/en_msrp/msr-para-train.tsv": ReadSpec(
        "tsv", "msrp_train", "en", FieldMap(kind=KIND_PAIR, query="#1 String", positive="#2 String",
                                            where=(("Quality", ("1",)),)), header=True),
    # retrieval with negatives (finetuning)
    "pairs/simclue_train/train_rank_1w.json": ReadSpec(
        "jsonl", "simclue_rank", "zh", FieldMap(kind=KIND_RETRIEVAL, query="query", positive="title",
                                                negatives="neg_title", single_negative=True)),
    "pairs/text2vec_bge_zh/bge_finetune_data.jsonl": ReadSpec("bge", "text2vec_bge_zh", "zh"),
    # STS (finetuning)
    "eval/chinese_stsb/train.txt": _tsv_sts("chinese_stsb_train"),
    "pairs/simclue_train/train_pair_1w.json": ReadSpec(
        "jsonl", "simclue_pair", "zh", FieldMap(kind=KIND_STS, query="sentence1", positive="sentence2",
                                                score="label")),
    "eval/en_stsbenchmark/stsbenchmark.tsv": ReadSpec(
        "tsv", "en_stsb_train", "en", FieldMap(kind=KIND_STS, query="sentence1", positive="sentence2",
                                               score="score", where=(("split", ("train",)),)), header=True),
    "eval/en_sick2014/SICK_train.txt": ReadSpec(
        "tsv", "sick_train", "en", FieldMap(kind=KIND_STS, query="sentence_A", positive="sentence_B",
                                            score="relatedness_score"), header=True),
    "eval/en_semeval_sts/2012/MSRpar.train.tsv": _tsv_sts("sts12_train", "en", q=1, p=2, s=0),
    "eval/en_semeval_sts/2012/SMTeuroparl.train.tsv": _tsv_sts("sts12_train", "en", q=1, p=2, s=0),
    # classification (finetuning)
    "eval/fewclue/iflytek/train_few_all.json": ReadSpec(
        "jsonl", "iflytek_train", "zh", FieldMap(kind=KIND_CLASSIFICATION, query="sentence", label="label_des")),
    "eval/fewclue/tnews/train_few_all.json#cls": ReadSpec(
        "jsonl", "tnews_train", "zh", FieldMap(kind=KIND_CLASSIFICATION, query="sentence", label="label_desc")),
    "eval/fewclue/eprstmt/train_few_all.json": ReadSpec(
        "jsonl", "eprstmt_train", "zh", FieldMap(kind=KIND_CLASSIFICATION, query="sentence", label="label")),
    "eval/chnsenticorp_htl/ChnSentiCorp_htl_all.csv": ReadSpec(
        "csv", "chnsenticorp_htl", "zh", FieldMap(kind=KIND_CLASSIFICATION, query="review", label="label"),
        header=True, delimiter=","),
}

INSTRUCT_FILES: dict[str, ReadSpec] = {
    "instruct/llamafactory_demo/alpaca_zh_demo.json": ReadSpec("instruct_json", "llm:alpaca_zh_demo", "zh"),
    "instruct/llamafactory_demo/alpaca_en_demo.json": ReadSpec("instruct_json", "llm:alpaca_en_demo", "en"),
    "instruct/llamafactory_demo/dpo_zh_demo.json": ReadSpec("instruct_json", "llm:dpo_zh_demo", "zh"),
    "instruct/llamafactory_demo/dpo_en_demo.json": ReadSpec("instruct_json", "llm:dpo_en_demo", "en"),
    "instruct/llamafactory_demo/kto_en_demo.json": ReadSpec("instruct_json", "llm:kto_en_demo", "en"),
    "instruct/llamafactory_demo/glaive_toolcall_zh_demo.json": ReadSpec("instruct_json", "llm:glaive_zh", "zh"),
    "instruct/llamafactory_demo/glaive_toolcall_en_demo.json": ReadSpec("instruct_json", "llm:glaive_en", "en"),
    "instruct/belle_open_source_1k/Belle_open_source_1k.jsonl": ReadSpec("instruct_jsonl", "llm:belle_1k", "zh"),
    "instruct/medicalgpt_samples/sharegpt_zh_1K_format.jsonl": ReadSpec("instruct_jsonl", "llm:sharegpt_zh", "zh"),
    "instruct/medicalgpt_samples/medical_sft_1K_format.jsonl": ReadSpec("instruct_jsonl", "llm:medical_sft", "zh"),
    "instruct/medicalgpt_samples/dpo_zh_500.jsonl": ReadSpec("instruct_jsonl", "llm:medical_dpo_zh", "zh"),
}

# Splits `conan eval` scores. Listed so readers know their format and so a test can check that no
# training group contains them. ATEC test pairs also occur in AFQMC train, so AFQMC train is not
# catalogued for training either (SOURCE.md warning).
EVAL_FILES: dict[str, ReadSpec] = {
    "eval/atec/ATEC.test.data": _tsv_sts("atec"),
    "eval/atec/ATEC.valid.data": _tsv_sts("atec"),
    "eval/afqmc/dev.txt": _tsv_sts("afqmc"),
    "eval/afqmc/train.txt": _tsv_sts("afqmc_train"),
    "eval/lcqmc_dev/dev.txt": _tsv_sts("lcqmc"),
    "eval/pawsx_zh_dev/dev_2k.tsv": ReadSpec("tsv", "pawsx", "zh", FieldMap(
        kind=KIND_STS, query="sentence1", positive="sentence2", score="label"), header=True),
    "eval/chinese_stsb/test.txt": _tsv_sts("chinese_stsb"),
    "eval/qbqtc/test_public.json": ReadSpec("jsonl", "qbqtc", "zh", FieldMap(
        kind=KIND_STS, query="query", positive="title", score="label")),
    "eval/ocnli/dev.txt": ReadSpec("tsv", "ocnli", "zh", FieldMap(kind=KIND_PAIR, query=0, positive=1, label=2)),
    "eval/cmnli/dev.txt": ReadSpec("tsv", "cmnli", "zh", FieldMap(kind=KIND_PAIR, query=0, positive=1, label=2)),
    "eval/fewclue/tnews/test_public.json": ReadSpec("jsonl", "tnews", "zh", FieldMap(
        kind=KIND_CLASSIFICATION, query="sentence", label="label_desc")),
    "eval/fewclue/iflytek/test_public.json": ReadSpec("jsonl", "iflytek", "zh", FieldMap(
        kind=KIND_CLASSIFICATION, query="sentence", label="label_des")),
    "eval/waimai_10k/waimai_10k.csv": ReadSpec("csv", "waimai", "zh", FieldMap(
        kind=KIND_CLASSIFICATION, query="review", label="label"), header=True, delimiter=","),
    "eval/online_shopping_10_cats/online_shopping_10_cats.csv": ReadSpec("csv", "online_shopping", "zh", FieldMap(
        kind=KIND_CLASSIFICATION, query="review", label="cat"), header=True, delimiter=","),
    "eval/csl_cls/cls_ctg/test.tsv": ReadSpec("tsv", "cls_s2s", "zh", FieldMap(
        kind=KIND_CLASSIFICATION, query=1, label=2)),
    "eval/csl_cls/cls_dcp/test.tsv": ReadSpec("tsv", "cls_p2p", "zh", FieldMap(
        kind=KIND_CLASSIFICATION, query=1, label=2)),
    "eval/cmrc2018_trial_retrieval": ReadSpec("beir", "cmrc2018_trial", "zh"),
    "eval/en_sick2014/SICK_test_annotated.txt": ReadSpec("tsv", "sick", "en", FieldMap(
        kind=KIND_STS, query="sentence_A", positive="sentence_B", score="relatedness_score"), header=True),
    "eval/en_beir_dbpedia_subset": ReadSpec("beir", "dbpedia_subset", "en"),
    "eval/en_beir_msmarco_subset": ReadSpec("beir", "msmarco_subset", "en"),
}

GROUPS: dict[str, tuple[str, ...]] = {
    "pretrain_pairs": (
        "pairs/csl_title_keywords_abstract/ts/dev.tsv",
        "pairs/csl_title_keywords_abstract/kg/dev.tsv",
        "pairs/simclue_train/train_pair_postive_1w.json",
        "pairs/text2vec_bge_zh/snli_zh_50.jsonl",
        "eval/qbqtc/dev.json",
        "eval/csnli/dev.txt",
        "eval/csnli/test.txt",
        "eval/oppo_xiaobu/dev.txt",
        "pairs/en_trecqa_wang/train.csv",
        "eval/fewclue/tnews/train_few_all.json",
        "eval/sohu_2021/dd-test.jsonl",
        "eval/en_msrp/msr-para-train.tsv",
    ),
    "finetune": (
        "pairs/simclue_train/train_rank_1w.json",
        "pairs/text2vec_bge_zh/bge_finetune_data.jsonl",
        "eval/chinese_stsb/train.txt",
        "pairs/simclue_train/train_pair_1w.json",
        "eval/en_stsbenchmark/stsbenchmark.tsv",
        "eval/en_sick2014/SICK_train.txt",
        "eval/en_semeval_sts/2012/MSRpar.train.tsv",
        "eval/en_semeval_sts/2012/SMTeuroparl.train.tsv",
        "eval/fewclue/iflytek/train_few_all.json",
        "eval/fewclue/tnews/train_few_all.json#cls",
        "eval/fewclue/eprstmt/train_few_all.json",
        "eval/chnsenticorp_htl/ChnSentiCorp_htl_all.csv",
    ),
    "instruct": tuple(INSTRUCT_FILES),
    "eval_only": tuple(EVAL_FILES),
}

# Files of the eval splits whose texts training rows must not share (decontamination, see stage.py).
EVAL_TEXT_FILES: tuple[str, ...] = tuple(GROUPS["eval_only"])

_ALL_SPECS = {**TRAIN_FILES, **INSTRUCT_FILES, **EVAL_FILES}


def catalog_entries(group: str) -> list[tuple[Path, ReadSpec]]:
    """(path, spec) of every file of a group; an entry key may carry '#variant' for a second reading."""
    if group not in GROUPS:
        raise ConanError(f"unknown data group {group!r} (known: {', '.join(GROUPS)})")
    root = shared_data_dir()
    return [(root / key.split("#")[0], _ALL_SPECS[key]) for key in GROUPS[group]]


def catalog_inputs(group: str) -> list[Path]:
    """The paths of a group's files (a file read twice under two specs appears twice)."""
    return [path for path, _spec in catalog_entries(group)]


def catalog_table() -> list[dict[str, str]]:
    """Every catalogued file with its group(s), reader format, kind, source and language."""
    groups_of: dict[str, list[str]] = {}
    for group, keys in GROUPS.items():
        for key in keys:
            groups_of.setdefault(key, []).append(group)
    rows = []
    for key, spec in _ALL_SPECS.items():
        rows.append({"path": key, "groups": ",".join(groups_of.get(key, [])), "format": spec.format,
                     "kind": spec.fields.kind if spec.fields else KIND_PAIR, "source": spec.source,
                     "lang": spec.lang})
    return rows


def spec_for_path(path: Path, *, variant: str | None = None) -> ReadSpec:
    """The catalog's spec for a shared-data file, else a spec sniffed from the file itself."""
    if Path(path).is_symlink() and not Path(path).exists():
        raise ReaderError(f"{path}: broken symbolic link (to {os.readlink(path)})")
    path = Path(path).resolve()
    try:
        key = path.relative_to(shared_data_dir()).as_posix()
    except ValueError:
        key = None
    if key is not None:
        spec = _ALL_SPECS.get(f"{key}#{variant}" if variant else key)
        if spec is not None:
            return spec
    return sniff_spec(path)


def resolve_inputs(inputs: list[Path | str]) -> list[tuple[Path, ReadSpec]]:
    """Inputs as (path, spec): a group name (`group:pretrain_pairs`) expands to its catalogued files."""
    resolved: list[tuple[Path, ReadSpec]] = []
    for item in inputs:
        text = str(item)
        if text.startswith("group:"):
            resolved += catalog_entries(text.removeprefix("group:"))
            continue
        path_text, _, variant = text.partition("#")
        resolved.append((Path(path_text), spec_for_path(Path(path_text), variant=variant or None)))
    return resolved


def read_file(path: Path, spec: ReadSpec | None = None) -> ReadResult:
    """Every unit of one file, in order (spec: the given one, else the catalog's, else sniffed)."""
    spec = spec or spec_for_path(Path(path))
    total = ReadResult()
    for unit in plan_units(Path(path), spec):
        part = read_unit(unit)
        total.records += part.records
        total.quarantine += part.quarantine
        total.skipped += part.skipped
    return total
