"""What a task is, independent of where its data comes from (a built-in loader or a task folder)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from conan_core.errors import ConanError
from conan_core.eval.data import TaskData

TaskType = Literal["STS", "PairClassification", "Retrieval", "Reranking", "Classification", "Clustering"]
TASK_TYPES: tuple[str, ...] = ("STS", "PairClassification", "Retrieval", "Reranking", "Classification",
                               "Clustering")

# The score each type is judged by. STS, retrieval, classification and clustering as in MTEB. Pair
# classification: max AP over similarity functions, the C-MTEB paper's metric (mteb 2.26 files
# Ocnli/Cmnli under max_accuracy, which is kept in `metrics`). Reranking: MAP, as mteb 2 (map_at_1000).
MAIN_SCORES: dict[str, str] = {
    "STS": "cosine_spearman",
    "PairClassification": "max_ap",
    "Retrieval": "ndcg_at_10",
    "Reranking": "map_at_1000",
    "Classification": "accuracy",
    "Clustering": "v_measure",
}

# Short language names accepted in task.json, mapped to mteb's ISO 639-3 + script codes.
LANG_CODES: dict[str, str] = {"zh": "cmn-Hans", "en": "eng-Latn"}


class UnknownTaskError(ConanError):
    """A task or group name that is neither built in nor given by a task folder."""


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task: its name, type, language, split, where its data lives, and how to load it."""

    name: str
    type: TaskType
    lang: str  # short (zh, en) or an mteb code (cmn-Hans)
    split: str
    source: str  # the data file(s) or folder, for the report
    load: Callable[[], TaskData]
    note: str = ""
    # Class attributes of the mteb task that differ from mteb's defaults for this type, e.g. the
    # classification `samples_per_label` of the C-MTEB counterpart.
    mteb_options: dict[str, Any] = field(default_factory=dict)

    @property
    def main_score(self) -> str:
        return MAIN_SCORES[self.type]

    @property
    def mteb_lang(self) -> str:
        return LANG_CODES.get(self.lang, self.lang)
