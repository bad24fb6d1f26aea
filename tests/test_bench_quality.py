"""Pure helpers of bench/bench_quality.py: goal checks, DHNM evidence, ablation spread, budget, run cache."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "bench_quality.py"
_spec = importlib.util.spec_from_file_location("bench_quality", _PATH)
bq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bq)


def _scores(**values: float) -> dict[str, float]:
    return {"LCQMC-dev": 0.4, "STSB": 0.6, "CMRC2018TrialRetrieval": 0.5, "average": 0.3, **values}


def test_goal_checks_pass_and_fail_are_measured() -> None:
    conan = _scores(**{"LCQMC-dev": 0.51, "STSB": 0.70, "average": 0.34})
    mnrl = _scores(**{"LCQMC-dev": 0.45, "STSB": 0.71, "average": 0.30})
    checks = {goal: ok for goal, ok, _ in bq.goal_checks(conan, mnrl)}
    assert checks["avg(c) >= avg(b) + 3"] is True
    assert checks["(c) > (b) on LCQMC-dev"] is True
    assert checks["(c) > (b) on STSB"] is False
    assert checks["(c) > (b) on CMRC2018TrialRetrieval"] is False  # equal is not better
    assert checks["(c) LCQMC-dev >= 50.0"] is True
    assert checks["(c) STSB >= 72.0"] is False


def test_goal_checks_without_mnrl_are_not_judged() -> None:
    checks = bq.goal_checks(_scores(), None)
    assert [ok for goal, ok, _ in checks if "(b)" in goal] == [None] * 4
    assert [bq.verdict(ok) for goal, ok, _ in checks if ">=" in goal and "(b)" not in goal] == ["FAIL", "FAIL"]


def test_dhnm_evidence_windows_around_checks() -> None:
    lines = [{"kind": "step", "step": s, "mean_neg_score": 0.5 - 0.01 * s} for s in range(1, 5)]
    lines += [{"kind": "check", "step": 2, "observed_queries": 10, "stale": 0, "replaced": 0},
              {"kind": "check", "step": 4, "observed_queries": 10, "stale": 3, "replaced": 3},
              {"kind": "step", "step": 5, "mean_neg_score": 0.6}, {"kind": "step", "step": 6, "mean_neg_score": 0.7},
              {"kind": "step", "step": 6, "mean_neg_score": 0.7}]  # a resumed run's duplicate
    ev = bq.dhnm_evidence(lines, window=2)
    assert ev["checks"] == 2 and ev["replaced_total"] == 3 and ev["replacing_checks"] == 1
    last = ev["rows"][1]
    assert last["before"] == pytest.approx((0.47 + 0.46) / 2) and last["after"] == pytest.approx(0.65)
    assert ev["rose_after"] == 1 and ev["judged"] == 1 and ev["steps_logged"] == 6


def test_gain_verdict_against_spread() -> None:
    assert bq.spread_stats([0.4, 0.5]) == (pytest.approx(0.45), pytest.approx(0.1))
    assert bq.gain_verdict([0.60, 0.62], [0.50, 0.52])[2] == "gain exceeds the spread"
    assert bq.gain_verdict([0.51, 0.55], [0.50, 0.52])[2] == "within the spread: no measured gain"
    assert bq.gain_verdict([0.40, 0.41], [0.50, 0.52])[2] == "worse than vanilla beyond the spread"
    assert "one seed" in bq.gain_verdict([0.6], [0.5])[2]


def test_steps_for_budget() -> None:
    assert bq.steps_for_budget(1500.0, 2.5) == 600
    assert bq.steps_for_budget(1.0, 2.5) == 1


def test_cached_run_reuses_same_key_and_rebuilds_on_change(tmp_path: Path) -> None:
    calls = []

    def build() -> dict:
        calls.append(1)
        (tmp_path / "run" / "artifact").write_text("x")
        return {"n": len(calls)}

    assert bq.cached_run(tmp_path / "run", {"a": 1}, build) == {"n": 1}
    assert bq.cached_run(tmp_path / "run", {"a": 1}, build) == {"n": 1}
    assert bq.cached_run(tmp_path / "run", {"a": 2}, build) == {"n": 2}
    assert json.loads((tmp_path / "run" / "bench_key.json").read_text()) == {"a": 2}
