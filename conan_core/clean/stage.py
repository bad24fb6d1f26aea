"""The clean stage: read -> normalise -> rule filters -> exact + MinHash dedup -> teacher filter -> dataset.

Reading, normalising, the rule filters and the MinHash signatures run per input unit (a file or a
line range of one), in parallel over Ray workers (`conan_core.raymap`; `workers=0`: in this process), with
decontamination against the eval splits (`conan_core.clean.decontaminate`). Dedup then runs in
the driver in input order, so the first occurrence is kept no matter which worker finished first.
Every dropped row lands in quarantine with its reason; the manifest counts kept / dropped per reason
per source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conan_core.clean.config import CleanConfig
from conan_core.clean.decontaminate import eval_match_keys, is_eval_path, load_eval_keys
from conan_core.clean.dedup import NearDuplicateIndex, dedup_text, exact_key, signatures
from conan_core.clean.filters import DUPLICATE, EVAL_OVERLAP, NEAR_DUPLICATE, TEACHER_SCORE, rule_reason
from conan_core.clean.normalise import detect_lang, normalise_text
from conan_core.clean.teacher import Embedder, load_teacher, score_records
from conan_core.io.catalog import resolve_inputs
from conan_core.io.dataset import write_dataset
from conan_core.io.readers import ReadUnit, plan_units, read_unit
from conan_core.raymap import map_units
from conan_core.schema import (
    KIND_CLASSIFICATION,
    make_quarantine_row,
    quarantine_table,
    records_table,
    with_new_id,
)


@dataclass
class UnitOutput:
    """What a worker returns for one unit: rows that passed the rules (in order) and the rest."""

    records: list[dict[str, Any]] = field(default_factory=list)
    signatures: np.ndarray | None = None
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # source -> rows deselected by the catalog


# ---------------------------------------------------------------- per unit (runs in workers)

def normalise_record(record: dict[str, Any], config: CleanConfig) -> dict[str, Any]:
    out = dict(record)
    out["query"] = normalise_text(record["query"], config)
    out["positive"] = normalise_text(record["positive"], config) if record["kind"] != KIND_CLASSIFICATION else ""
    negatives = (normalise_text(n, config) for n in record["negatives"])
    # A negative that is empty or equal to a side is no negative at all.
    out["negatives"] = list(dict.fromkeys(n for n in negatives if n and n not in (out["query"], out["positive"])))
    if out["lang"] == "auto":
        out["lang"] = detect_lang(out["query"])
    return with_new_id(out)


def _raw(record: dict[str, Any]) -> str:
    return json.dumps({k: record[k] for k in ("query", "positive", "negatives", "score", "label")},
                      ensure_ascii=False)


def filter_records(records: list[dict[str, Any]], config: CleanConfig, eval_keys: frozenset[str] | None,
                   out: UnitOutput) -> None:
    """Normalise and rule-filter `records` into `out` (kept rows and quarantine rows)."""
    for record in records:
        clean = normalise_record(record, config)
        reason = rule_reason(clean, config)
        if reason is None and eval_keys and any(key in eval_keys for key in eval_match_keys(clean)):
            reason = EVAL_OVERLAP
        if reason:
            out.quarantine.append(make_quarantine_row(source=clean["source"], reason=reason, raw=_raw(record),
                                                      record=clean))
        else:
            out.records.append(clean)


def add_signatures(out: UnitOutput, config: CleanConfig) -> UnitOutput:
    if config.near_dedup:
        out.signatures = signatures([dedup_text(r) for r in out.records], config)
    return out


def process_unit(unit: ReadUnit, config: CleanConfig, eval_keys: frozenset[str] | None) -> UnitOutput:
    """Read, normalise, rule-filter and sign one unit."""
    read = read_unit(unit)
    out = UnitOutput(quarantine=list(read.quarantine))
    if read.skipped:
        out.skipped[unit.spec.source] = read.skipped
    filter_records(read.records, config, None if is_eval_path(unit.path) else eval_keys, out)
    return add_signatures(out, config)


# ---------------------------------------------------------------- driver: dedup, teacher, counts

class Counts:
    """kept / dropped-per-reason / skipped per source, for the manifest."""

    def __init__(self) -> None:
        self.by_source: dict[str, dict[str, Any]] = {}

    def _entry(self, source: str) -> dict[str, Any]:
        return self.by_source.setdefault(source, {"kept": 0, "dropped": {}, "skipped": 0})

    def drop(self, source: str, reason: str) -> None:
        dropped = self._entry(source)["dropped"]
        dropped[reason] = dropped.get(reason, 0) + 1

    def as_dict(self, kept: list[dict[str, Any]], skipped: dict[str, int]) -> dict[str, Any]:
        for record in kept:
            self._entry(record["source"])["kept"] += 1
        for source, count in skipped.items():
            self._entry(source)["skipped"] += count
        sources = {source: self.by_source[source] for source in sorted(self.by_source)}
        dropped_total: dict[str, int] = {}
        for entry in sources.values():
            entry["dropped"] = dict(sorted(entry["dropped"].items()))
            for reason, count in entry["dropped"].items():
                dropped_total[reason] = dropped_total.get(reason, 0) + count
        return {"kept": len(kept), "dropped": sum(dropped_total.values()),
                "dropped_by_reason": dict(sorted(dropped_total.items())),
                "skipped": sum(skipped.values()), "sources": sources}


def dedup_in_order(outputs: list[UnitOutput], config: CleanConfig, counts: Counts,
                   quarantine: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exact then near-duplicate removal over all units in input order; the first occurrence is kept."""
    seen: set[str] = set()
    near = NearDuplicateIndex(config) if config.near_dedup else None
    kept = []
    for out in outputs:
        for row, record in enumerate(out.records):
            reason = None
            key = exact_key(record)
            if config.exact_dedup and key in seen:
                reason = DUPLICATE
            elif (near is not None and out.signatures is not None and record["kind"] in config.near_dedup_kinds
                  and not near.is_new(out.signatures[row])):
                reason = NEAR_DUPLICATE
            if reason:
                counts.drop(record["source"], reason)
                quarantine.append(make_quarantine_row(source=record["source"], reason=reason, raw=_raw(record),
                                                      record=record))
                continue
            seen.add(key)
            kept.append(record)
    return kept


def apply_teacher(kept: list[dict[str, Any]], teacher: Embedder, config: CleanConfig, counts: Counts,
                  quarantine: list[dict[str, Any]]) -> list[dict[str, Any]]:
    scores = score_records(kept, teacher, config.teacher_kinds, batch_size=config.teacher_batch_size)
    survivors = []
    for record, score in zip(kept, scores, strict=True):
        record = {**record, "teacher_score": score}
        if score is not None and score < config.min_teacher_score:
            counts.drop(record["source"], TEACHER_SCORE)
            quarantine.append(make_quarantine_row(source=record["source"], reason=TEACHER_SCORE,
                                                  raw=_raw(record), record=record))
        else:
            survivors.append(record)
    return survivors


def finish_stage(outputs: list[UnitOutput], output: Path, config_dump: dict, config: CleanConfig,
                 inputs: list[Path], teacher: Embedder | None) -> dict:
    """Dedup, teacher filter, counts and the atomic dataset write shared by clean and extract."""
    counts = Counts()
    quarantine: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    for out in outputs:
        for row in out.quarantine:
            counts.drop(row["source"], row["reason"])
        quarantine += out.quarantine
        for source, count in out.skipped.items():
            skipped[source] = skipped.get(source, 0) + count
    kept = dedup_in_order(outputs, config, counts, quarantine)
    if teacher is not None:
        kept = apply_teacher(kept, teacher, config, counts, quarantine)
    return write_dataset(output, records_table(kept), quarantine_table(quarantine), config=config_dump,
                         inputs=inputs, counts=counts.as_dict(kept, skipped), shard_rows=config.shard_rows)


def run_clean(inputs: list[Path], output: Path, config: CleanConfig, *, teacher: str | Path | Embedder | None = None,
              workers: int = 2, progress: bool = True) -> dict:
    """Clean `inputs` (files, BEIR dirs or `group:<name>`) into a dataset at `output`; return the manifest."""
    entries = resolve_inputs(inputs)
    units = [unit for path, spec in entries for unit in plan_units(path, spec, lines_per_unit=config.lines_per_unit)]
    embedder = load_teacher(teacher) if teacher is not None else None
    eval_keys = load_eval_keys() if config.decontaminate else None
    outputs = map_units(process_unit, units, (config, eval_keys), workers=workers, progress=progress,
                        desc="clean")
    config_dump = {"stage": "clean", "clean": config.model_dump(),
                   "teacher": None if teacher is None else str(getattr(embedder, "config", teacher))}
    return finish_stage(outputs, Path(output), config_dump, config, [path for path, _ in entries], embedder)
