"""Turn a TaskSpec and its in-memory data into an mteb task, so mteb's own evaluators score it.

Each task subclasses mteb's abstract task of its type and overrides `load_data` (mteb's built-in C-MTEB
tasks load from a hub this machine cannot reach; platform notes §4.2).
"""

from __future__ import annotations

from typing import Any

from conan_core.eval.data import (
    ClassificationData,
    LabelledTexts,
    PairData,
    RetrievalData,
    TaskData,
    data_fingerprint,
)
from conan_core.eval.spec import TaskSpec

_SPLIT = "default"


def _metadata(spec: TaskSpec, revision: str) -> Any:
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        name=spec.name, description=spec.note or f"{spec.type} task from {spec.source}",
        reference=None, dataset={"path": spec.source, "revision": revision},
        type=spec.type, category="t2t", modalities=["text"], eval_splits=[spec.split],
        eval_langs=[spec.mteb_lang], main_score=spec.main_score, date=None, domains=None,
        task_subtypes=None, license=None, annotations_creators=None, dialect=None,
        sample_creation=None, bibtex_citation="",
    )


def _pair_dataset(data: PairData, score_column: str) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"sentence1": data.sentence1, "sentence2": data.sentence2,
                              score_column: data.scores})


def _label_ids(labels: list[str], vocabulary: list[str]) -> list[int]:
    index = {label: i for i, label in enumerate(vocabulary)}
    return [index[label] for label in labels]


def _texts_dataset(data: LabelledTexts, vocabulary: list[str], text_column: str, label_column: str) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({text_column: data.texts, label_column: _label_ids(data.labels, vocabulary)})


def _retrieval_split(data: RetrievalData) -> Any:
    from datasets import Dataset
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    corpus = Dataset.from_dict({"id": list(data.corpus), "title": [t for t, _ in data.corpus.values()],
                                "text": [x for _, x in data.corpus.values()]})
    queries = Dataset.from_dict({"id": list(data.queries), "text": list(data.queries.values())})
    return RetrievalSplitData(corpus=corpus, queries=queries, relevant_docs=data.qrels,
                              top_ranked=data.top_ranked)


def _dataset_for(spec: TaskSpec, data: TaskData) -> Any:
    """The `self.dataset` value mteb's abstract task of this type expects."""
    from datasets import DatasetDict

    if isinstance(data, PairData):
        column = "labels" if spec.type == "PairClassification" else "score"
        scores = data if spec.type == "STS" else PairData(data.sentence1, data.sentence2,
                                                          [int(s) for s in data.scores])
        return DatasetDict({spec.split: _pair_dataset(scores, column)})
    if isinstance(data, ClassificationData):
        vocabulary = sorted(set(data.train.labels) | set(data.test.labels))
        return DatasetDict({"train": _texts_dataset(data.train, vocabulary, "text", "label"),
                            spec.split: _texts_dataset(data.test, vocabulary, "text", "label")})
    if isinstance(data, LabelledTexts):
        vocabulary = sorted(set(data.labels))
        return DatasetDict({spec.split: _texts_dataset(data, vocabulary, "sentences", "labels")})
    return {_SPLIT: {spec.split: _retrieval_split(data)}}


def _base_class(spec: TaskSpec) -> type:
    from mteb.abstasks import (
        AbsTaskClassification,
        AbsTaskClustering,
        AbsTaskPairClassification,
        AbsTaskRetrieval,
        AbsTaskSTS,
    )

    return {"STS": AbsTaskSTS, "PairClassification": AbsTaskPairClassification,
            "Retrieval": AbsTaskRetrieval, "Reranking": AbsTaskRetrieval,
            "Classification": AbsTaskClassification, "Clustering": AbsTaskClustering}[spec.type]


def _type_options(spec: TaskSpec, data: TaskData) -> dict[str, Any]:
    """Class attributes every task of this type needs here (before the spec's own options)."""
    if isinstance(data, PairData) and spec.type == "STS":
        # mteb min-max normalises gold scores; correlations do not change, but the range must not be empty.
        return {"min_score": min(data.scores), "max_score": max(data.scores)}
    if spec.type == "Clustering":
        # Embed every text (after our own optional subsampling) unless the spec caps it like mteb's v2 tasks.
        return {"max_fraction_of_documents_to_embed": None, "max_document_to_embed": None}
    return {}


def build_mteb_task(spec: TaskSpec, data: TaskData, seed: int = 42) -> Any:
    """An instance of a fresh mteb task class for this spec, its data already loaded."""
    dataset = _dataset_for(spec, data)

    def load_data(self: Any, num_proc: int | None = None, **kwargs: Any) -> None:
        if not self.data_loaded:
            self.dataset = dataset
            self.data_loaded = True

    attributes = {"metadata": _metadata(spec, data_fingerprint(data)), "load_data": load_data,
                  **_type_options(spec, data), **spec.mteb_options}
    task_class = type(f"ConanTask_{spec.type}", (_base_class(spec),), attributes)
    return task_class(seed=seed)
