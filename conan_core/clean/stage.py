"""The clean stage: read -> normalise -> rule filters -> exact + MinHash dedup -> teacher filter -> dataset.

Reading, normalising, the rule filters (with decontamination against the eval splits,
`conan_core.clean.decontaminate`), the exact keys, the MinHash signatures and the LSH band hashes run
per input unit (a file or a line range of one), in parallel over workers (`conan_core.raymap`: Ray
tasks on a running Ray or RAY_ADDRESS, else local processes; `workers=0`, or an input too small for a
fan-out to pay: in this process). A worker ships back Arrow tables and numpy arrays (`UnitResult`), not
a Python object per row. Dedup then runs in the driver in input order, unit by unit as the results
arrive (while the workers read the next units), so the first occurrence is kept no matter which worker
finished first. Every dropped row lands in quarantine with its reason; the manifest counts kept /
dropped per reason per source.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from conan_core.clean.config import CleanConfig
from conan_core.clean.decontaminate import eval_match_keys, is_eval_path, load_eval_keys
from conan_core.clean.dedup import NearDuplicateIndex, RowKeys, row_keys, unique_mask
from conan_core.clean.filters import DUPLICATE, EVAL_OVERLAP, NEAR_DUPLICATE, TEACHER_SCORE, rule_reason
from conan_core.clean.normalise import detect_lang, normalise_text
from conan_core.clean.teacher import Embedder, load_teacher, score_records
from conan_core.io.catalog import resolve_inputs
from conan_core.io.dataset import write_dataset
from conan_core.io.readers import ReadUnit, plan_units, read_unit
from conan_core.raymap import fanout_workers, input_bytes, iter_units
from conan_core.schema import (
    KIND_CLASSIFICATION,
    QUARANTINE_COLUMNS,
    QUARANTINE_SCHEMA,
    make_quarantine_row,
    quarantine_table,
    records_table,
    with_new_id,
)

_RAW_FIELDS = ("query", "positive", "negatives", "score", "label")


@dataclass
class UnitOutput:
    """A unit's rows while a worker works on it: rows that passed the rules (in order) and the rest."""

    records: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # source -> rows deselected by the catalog


@dataclass
class UnitResult:
    """What a worker returns for one unit: Arrow tables and arrays, cheap to ship and to concatenate."""

    records: pa.Table  # RECORD_SCHEMA, the rows that passed the rules, in order
    quarantine: pa.Table  # QUARANTINE_SCHEMA, the rows the reader or the rules dropped
    skipped: dict[str, int]
    keys: RowKeys  # exact keys, signatures and band hashes of `records`


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
    return json.dumps({k: record[k] for k in _RAW_FIELDS}, ensure_ascii=False)


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


def pack_unit(out: UnitOutput, config: CleanConfig) -> UnitResult:
    """The unit as Arrow tables, with the keys the driver's dedup pass needs."""
    return UnitResult(records_table(out.records), quarantine_table(out.quarantine), out.skipped,
                      row_keys(out.records, config))


def process_unit(unit: ReadUnit, config: CleanConfig, eval_keys: frozenset[str] | None) -> UnitResult:
    """Read, normalise, rule-filter and sign one unit."""
    read = read_unit(unit)
    out = UnitOutput(quarantine=list(read.quarantine))
    if read.skipped:
        out.skipped[unit.spec.source] = read.skipped
    filter_records(read.records, config, None if is_eval_path(unit.path) else eval_keys, out)
    return pack_unit(out, config)


# ---------------------------------------------------------------- driver: dedup, teacher, counts

class Counts:
    """kept / dropped-per-reason / skipped per source, for the manifest."""

    def __init__(self) -> None:
        self.by_source: dict[str, dict[str, Any]] = {}

    def _entry(self, source: str) -> dict[str, Any]:
        return self.by_source.setdefault(source, {"kept": 0, "dropped": {}, "skipped": 0})

    def drop(self, source: str, reason: str, count: int = 1) -> None:
        dropped = self._entry(source)["dropped"]
        dropped[reason] = dropped.get(reason, 0) + count

    def drop_rows(self, sources: list[str], reasons: list[str]) -> None:
        for (source, reason), count in Counter(zip(sources, reasons, strict=True)).items():
            self.drop(source, reason, count)

    def as_dict(self, kept: pa.Table, skipped: dict[str, int]) -> dict[str, Any]:
        for entry in pc.value_counts(kept.column("source")).to_pylist():
            self._entry(entry["values"])["kept"] += entry["counts"]
        for source, count in skipped.items():
            self._entry(source)["skipped"] += count
        sources = {source: self.by_source[source] for source in sorted(self.by_source)}
        dropped_total: dict[str, int] = {}
        for entry in sources.values():
            entry["dropped"] = dict(sorted(entry["dropped"].items()))
            for reason, count in entry["dropped"].items():
                dropped_total[reason] = dropped_total.get(reason, 0) + count
        return {"kept": kept.num_rows, "dropped": sum(dropped_total.values()),
                "dropped_by_reason": dict(sorted(dropped_total.items())),
                "skipped": sum(skipped.values()), "sources": sources}


def dropped_table(records: pa.Table, reasons: list[str]) -> pa.Table:
    """Quarantine rows (QUARANTINE_SCHEMA) of `records` dropped for `reasons`, raw input rebuilt."""
    raws = [_raw(row) for row in records.select(list(_RAW_FIELDS)).to_pylist()]
    columns = {"source": records.column("source"), "reason": pa.array(reasons, pa.string()),
               "raw": pa.array(raws, pa.string())}
    columns.update({name: records.column(name) for name in QUARANTINE_COLUMNS if name not in columns})
    return pa.table(columns, schema=QUARANTINE_SCHEMA)


class OrderedDedup:
    """Exact then near-duplicate removal over all units in input order; the first occurrence is kept.

    `add` takes the units one by one in input order; the kept rows, the quarantine (the readers' and
    rules' drops of every unit first, then the dedup drops) and the counts build up as it goes.
    """

    def __init__(self, config: CleanConfig) -> None:
        self.config = config
        self.counts = Counts()
        # exact keys seen; a dict, not a set: the garbage collector skips a dict of bytes, a set it walks
        self.seen: dict[bytes, None] = {}
        self.near = NearDuplicateIndex(config) if config.near_dedup else None
        self.kept: list[pa.Table] = []
        self.rule_quarantine: list[pa.Table] = []
        self.dedup_quarantine: list[pa.Table] = []
        self.skipped: dict[str, int] = {}

    def add(self, unit: UnitResult) -> None:
        self.rule_quarantine.append(unit.quarantine)
        self.counts.drop_rows(unit.quarantine.column("source").to_pylist(),
                              unit.quarantine.column("reason").to_pylist())
        for source, count in unit.skipped.items():
            self.skipped[source] = self.skipped.get(source, 0) + count
        reasons = self._reasons(unit.keys)
        keep = pa.array([reason is None for reason in reasons], pa.bool_())
        self.kept.append(unit.records.filter(keep))
        dropped = [reason for reason in reasons if reason is not None]
        if dropped:
            lost = unit.records.filter(pc.invert(keep))
            self.counts.drop_rows(lost.column("source").to_pylist(), dropped)
            self.dedup_quarantine.append(dropped_table(lost, dropped))

    def _reasons(self, keys: RowKeys) -> list[str | None]:
        """Each row's drop reason (None: kept), deciding the rows in order; kept rows join the index.

        A row whose keys (exact, and each band hash) are new to the index and occur once in the unit is
        kept whatever comes before it, and cannot be what a later row of the unit matches: such rows join
        the index in bulk, and only the others are decided one by one, in order.
        """
        fresh = self._fresh_rows(keys)
        first, slot_of = self._add_fresh(keys, fresh)
        return self._decide_in_order(keys, np.flatnonzero(~fresh).tolist(), first, slot_of)

    def _add_fresh(self, keys: RowKeys, fresh: np.ndarray) -> tuple[int, dict[int, int]]:
        """Keep the fresh rows; return the index id of the unit's first signature and row -> signature slot."""
        self.seen.update(dict.fromkeys(keys.exact[fresh].tolist()))
        if self.near is None or not len(keys.near_rows):
            return 0, {}
        first = self.near.add_signatures(keys.signatures)
        fresh_slots = fresh[keys.near_rows]
        self.near.add_fresh(first + np.flatnonzero(fresh_slots), keys.bands[fresh_slots])
        return first, dict(zip(keys.near_rows.tolist(), range(len(keys.near_rows)), strict=True))

    def _decide_in_order(self, keys: RowKeys, rows: list[int], first: int,
                         slot_of: dict[int, int]) -> list[str | None]:
        exact = keys.exact.tolist()
        reasons: list[str | None] = [None] * len(exact)
        near_rows = [row for row in rows if row in slot_of]
        band_of = dict(zip(near_rows, keys.bands[[slot_of[row] for row in near_rows]].tolist(), strict=True))
        check_exact, seen, near = self.config.exact_dedup, self.seen, self.near
        for row in rows:
            key = exact[row]
            if check_exact and key in seen:
                reasons[row] = DUPLICATE
            elif row in band_of and not near.is_new(first + slot_of[row], band_of[row]):  # type: ignore[union-attr]
                reasons[row] = NEAR_DUPLICATE
            else:
                seen[key] = None
        return reasons

    def _fresh_rows(self, keys: RowKeys) -> np.ndarray:
        """Rows whose exact key and band hashes are all new to the index and unique in the unit."""
        fresh = np.ones(len(keys.exact), dtype=bool)
        if self.config.exact_dedup:
            fresh &= unique_mask(keys.exact)
            known = self.seen.keys() & keys.exact.tolist()  # set operations run in C, not per row in Python
            if known:
                fresh &= ~np.isin(keys.exact, np.array(list(known), dtype=keys.exact.dtype))
        if self.near is not None and len(keys.near_rows):
            fresh[keys.near_rows] &= self.near.fresh(keys.bands)
        return fresh

    def kept_table(self) -> pa.Table:
        return pa.concat_tables(self.kept) if self.kept else records_table([])

    def quarantine_tables(self) -> list[pa.Table]:
        return self.rule_quarantine + self.dedup_quarantine


def apply_teacher(kept: pa.Table, teacher: Embedder, config: CleanConfig,
                  counts: Counts) -> tuple[pa.Table, pa.Table]:
    """(survivors, their quarantine rows) of the teacher-score filter."""
    records = kept.to_pylist()
    scores = score_records(records, teacher, config.teacher_kinds, batch_size=config.teacher_batch_size)
    survivors, quarantine = [], []
    for record, score in zip(records, scores, strict=True):
        record = {**record, "teacher_score": score}
        if score is not None and score < config.min_teacher_score:
            counts.drop(record["source"], TEACHER_SCORE)
            quarantine.append(make_quarantine_row(source=record["source"], reason=TEACHER_SCORE,
                                                  raw=_raw(record), record=record))
        else:
            survivors.append(record)
    return records_table(survivors), quarantine_table(quarantine)


def finish_stage(outputs: Iterable[UnitResult], output: Path, config_dump: dict, config: CleanConfig,
                 inputs: list[Path], teacher: Embedder | None) -> dict:
    """Dedup (unit by unit, as `outputs` yields them), teacher filter, counts and the atomic dataset write
    shared by clean and extract."""
    dedup = OrderedDedup(config)
    for out in outputs:
        dedup.add(out)
    kept, quarantine = dedup.kept_table(), dedup.quarantine_tables()
    if teacher is not None:
        kept, teacher_quarantine = apply_teacher(kept, teacher, config, dedup.counts)
        quarantine.append(teacher_quarantine)
    return write_dataset(output, kept, pa.concat_tables(quarantine) if quarantine else quarantine_table([]),
                         config=config_dump, inputs=inputs, counts=dedup.counts.as_dict(kept, dedup.skipped),
                         shard_rows=config.shard_rows)


def run_clean(inputs: list[Path], output: Path, config: CleanConfig, *, teacher: str | Path | Embedder | None = None,
              workers: int = 2, progress: bool = True, min_fanout_bytes: int | None = None) -> dict:
    """Clean `inputs` (files, BEIR dirs or `group:<name>`) into a dataset at `output`; return the manifest.

    `workers` workers (Ray tasks or local processes, see `conan_core.raymap`; 0: in this process); an input
    of one unit or under `min_fanout_bytes` runs in this process anyway (None: the measured crossover,
    `raymap.fanout_min_bytes`; 0: fan out whatever the input)."""
    entries = resolve_inputs(inputs)
    units = [unit for path, spec in entries for unit in plan_units(path, spec, lines_per_unit=config.lines_per_unit)]
    embedder = load_teacher(teacher) if teacher is not None else None
    eval_keys = load_eval_keys() if config.decontaminate else None
    workers = fanout_workers(workers, input_bytes([path for path, _ in entries]), len(units),
                             min_bytes=min_fanout_bytes, desc="clean")
    config_dump = {"stage": "clean", "clean": config.model_dump(),
                   "teacher": None if teacher is None else str(getattr(embedder, "config", teacher))}
    # closing: a failure in the driver's pass stops the workers (and a Ray this call started) right away
    with closing(iter_units(process_unit, units, (config, eval_keys), workers=workers, progress=progress,
                            desc="clean")) as outputs:
        return finish_stage(outputs, Path(output), config_dump, config, [path for path, _ in entries], embedder)
