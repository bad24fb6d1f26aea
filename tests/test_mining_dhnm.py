"""DHNM: staleness rules, replacement windows, v2 per-negative swaps, checkpoint state, metrics + plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conan_core.errors import ConanError
from conan_core.mining.candidates import CandidateLists, QueryCandidates
from conan_core.mining.config import DHNMConfig
from conan_core.mining.dhnm import DynamicNegatives, is_stale_v1, is_stale_v2, window_ranks
from conan_core.mining.plot import plot_hardness, read_hardness

N = 3


def make_lists(list_length: int = 40, record_negatives: dict[str, list[str]] | None = None,
               fingerprint: str = "fp-a") -> CandidateLists:
    """Queries q0..q2; q's candidate at rank r is the doc with text '<q>-doc-<r>'."""
    record_negatives = record_negatives or {}
    queries, texts = {}, {}
    for q in ("q0", "q1", "q2"):
        ids = [f"{q}-d{r}" for r in range(list_length)]
        texts.update({d: f"{q}-doc-{r}" for r, d in enumerate(ids)})
        queries[q] = QueryCandidates(query=f"query {q}", positive=f"positive {q}",
                                     negatives=record_negatives.get(q, []), doc_ids=ids,
                                     scores=[1.0 - r / 100 for r in range(list_length)])
    return CandidateLists(queries=queries, doc_texts=texts, skip_ranks=10, fingerprint=fingerprint)


def ranks_of(dyn: DynamicNegatives, query_id: str) -> list[int]:
    return [int(t.rsplit("-", 1)[1]) for t in dyn.negatives(query_id)]


def test_window_ranks_follow_the_paper() -> None:
    n = 7
    assert list(window_ranks(1, n)) == list(range(10, 17))
    assert list(window_ranks(2, n)) == list(range(17, 24))
    assert list(window_ranks(3, n)) == list(range(2 * n + 10, 3 * n + 10))
    with pytest.raises(ValueError):
        window_ranks(0, n)


def test_staleness_rules() -> None:
    assert is_stale_v1(initial=0.6, current=0.5)          # 0.575 < 0.6 and |0.5| < 0.8
    assert not is_stale_v1(initial=0.6, current=0.53)     # 0.6095 >= 0.6: not enough of a drop
    assert not is_stale_v1(initial=0.99, current=0.85)    # dropped, but |0.85| >= 0.8
    assert is_stale_v1(initial=0.2, current=-0.5)         # became negative: easy
    assert is_stale_v2(initial=0.3, current=0.3)          # too easy from the start
    assert is_stale_v2(initial=0.65, current=0.5)         # 0.6 < 0.65 and 0.5 < 0.7
    assert not is_stale_v2(initial=0.65, current=0.55)    # 0.66 >= 0.65
    assert not is_stale_v2(initial=0.95, current=0.75)    # dropped by 1.2x but still >= 0.7


def test_v1_swaps_stale_queries_to_the_next_window_at_check_steps(tmp_path) -> None:
    metrics = tmp_path / "hardness.jsonl"
    dyn = DynamicNegatives(make_lists(), N, DHNMConfig(check_every=2), metrics_path=metrics)
    assert ranks_of(dyn, "q0") == [10, 11, 12]  # no record negatives: window 1
    dyn.observe(["q0", "q1"], np.array([[0.6, 0.6, 0.6], [0.6, 0.6, 0.6]]))
    assert dyn.maybe_check(1) is None
    dyn.observe(["q0", "q1"], np.array([[0.4, 0.5, 0.45], [0.59, 0.6, 0.6]]))  # q0 got easy, q1 did not
    result = dyn.maybe_check(2)
    assert result is not None
    assert result["stale"] == 1 and result["observed_queries"] == 2 and result["stale_fraction"] == 0.5
    assert ranks_of(dyn, "q0") == [13, 14, 15]   # 2nd window: (2-1)*3+10 .. 2*3+10
    assert ranks_of(dyn, "q1") == [10, 11, 12]
    assert dyn.version == 1
    # New negatives restart their initial score at their first observation.
    dyn.observe(["q0"], np.array([[0.7, 0.7, 0.7]]))
    assert dyn.maybe_check(4)["stale"] == 0
    dyn.observe(["q0"], np.array([[0.3, 0.3, 0.3]]))
    dyn.maybe_check(6)
    assert ranks_of(dyn, "q0") == [16, 17, 18]
    steps, checks = read_hardness(metrics)
    assert [c["step"] for c in checks] == [2, 4, 6]
    assert steps[0]["step"] == 1 and steps[0]["mean_neg_score"] == pytest.approx(0.6)


def test_v1_keeps_negatives_when_the_list_cannot_fill_the_next_window() -> None:
    dyn = DynamicNegatives(make_lists(list_length=15), N, DHNMConfig(check_every=1))  # windows: 10-12, 13-15
    dyn.observe(["q0"], np.array([[0.6, 0.6, 0.6]]))
    dyn.observe(["q0"], np.array([[0.1, 0.1, 0.1]]))
    result = dyn.maybe_check(1)
    assert result["stale"] == 1 and result["replaced"] == 0 and result["exhausted"] == 1
    assert ranks_of(dyn, "q0") == [10, 11, 12]
    assert dyn.queries_to_remine() == ["q0"]  # still re-mined between epochs


def test_record_negatives_come_first_topped_up_from_rank_10() -> None:
    lists = make_lists(record_negatives={"q0": ["teacher neg", "q0-doc-10"]})
    dyn = DynamicNegatives(lists, N, DHNMConfig(check_every=1))
    assert dyn.negatives("q0") == ["teacher neg", "q0-doc-10", "q0-doc-11"]  # doc-10 not repeated
    dyn.observe(["q0"], np.array([[0.6, 0.6, 0.6]]))
    dyn.observe(["q0"], np.array([[0.2, 0.2, 0.2]]))
    dyn.maybe_check(1)
    assert ranks_of(dyn, "q0") == [10, 11, 12]  # the 1st replacement: window 1


def test_nan_scores_are_padding_and_shapes_are_checked() -> None:
    dyn = DynamicNegatives(make_lists(), N, DHNMConfig(check_every=1))
    dyn.observe(["q0"], np.array([[0.5, np.nan, 0.5]]))
    with pytest.raises(ConanError):
        dyn.observe(["q0", "q1"], np.zeros((1, 3)))
    assert dyn.state_dict()["queries"]["q0"]["initial"] == [0.5, None, 0.5]


def test_finetune_dhnm_is_the_only_switch() -> None:
    with pytest.raises(ValueError, match="finetune.dhnm switches"):
        DHNMConfig.model_validate({"enabled": False})


def test_v2_replaces_single_negatives_by_the_next_candidate() -> None:
    dyn = DynamicNegatives(make_lists(), N, DHNMConfig(variant="v2", check_every=1))
    # slot 0 too easy from the start (< 0.4), slot 1 no longer hard (1.2 * 0.5 < 0.65, 0.5 < 0.7), slot 2 fine.
    dyn.observe(["q0"], np.array([[0.3, 0.65, 0.9]]))
    dyn.observe(["q0"], np.array([[0.3, 0.5, 0.85]]))
    result = dyn.maybe_check(1)
    assert result["stale"] == 1 and result["replaced"] == 1
    assert result["stale_negative_fraction"] == pytest.approx(2 / 3)
    assert ranks_of(dyn, "q0") == [13, 14, 12]
    state = dyn.state_dict()["queries"]["q0"]
    assert state["initial"] == [None, None, 0.9]


def test_state_dict_round_trip_through_torch_weights_only(tmp_path) -> None:
    lists = make_lists()
    dyn = DynamicNegatives(lists, N, DHNMConfig(check_every=1))
    dyn.observe(["q0", "q2"], np.array([[0.6, 0.6, 0.6], [0.5, 0.5, 0.5]]))
    dyn.observe(["q0"], np.array([[0.2, 0.2, 0.2]]))
    dyn.maybe_check(1)
    state = dyn.state_dict()
    json.dumps(state)  # plain data
    torch.save(state, tmp_path / "dhnm.pt")
    loaded = torch.load(tmp_path / "dhnm.pt", weights_only=True)

    resumed = DynamicNegatives(lists, N, DHNMConfig(check_every=1))
    resumed.load_state_dict(loaded)
    assert resumed.version == dyn.version == 1
    for q in ("q0", "q1", "q2"):
        assert resumed.negatives(q) == dyn.negatives(q)
    assert resumed.state_dict() == dyn.state_dict()

    with pytest.raises(ConanError, match="candidates"):
        DynamicNegatives(make_lists(fingerprint="fp-other"), N, DHNMConfig()).load_state_dict(loaded)
    with pytest.raises(ConanError, match="n_negatives"):
        DynamicNegatives(lists, N + 1, DHNMConfig()).load_state_dict(loaded)


def test_replace_candidates_restarts_changed_queries_and_remine_modes() -> None:
    lists = make_lists()
    dyn = DynamicNegatives(lists, N, DHNMConfig(check_every=1, remine_between_epochs="stale"))
    for q in ("q0", "q1"):
        dyn.negatives(q)
    dyn.observe(["q0"], np.array([[0.6, 0.6, 0.6]]))
    dyn.observe(["q0"], np.array([[0.2, 0.2, 0.2]]))
    dyn.maybe_check(1)
    assert dyn.queries_to_remine() == ["q0"]
    assert DynamicNegatives(lists, N, DHNMConfig(remine_between_epochs="all")).queries_to_remine() is None
    assert DynamicNegatives(lists, N, DHNMConfig(remine_between_epochs="off")).queries_to_remine() == []

    new = make_lists(fingerprint="fp-b")
    new.queries["q0"].doc_ids = list(reversed(new.queries["q0"].doc_ids))
    dyn.replace_candidates(new)
    assert ranks_of(dyn, "q0") == [29, 28, 27]  # window 1 of the re-mined (reversed) list
    assert dyn.queries_to_remine() == []
    assert dyn.state_dict()["candidates_fingerprint"] == "fp-b"


def test_unknown_query_is_a_clear_error() -> None:
    dyn = DynamicNegatives(make_lists(), N, DHNMConfig())
    with pytest.raises(ConanError, match="no candidate list"):
        dyn.negatives("missing")


def test_plot_writes_a_png(tmp_path) -> None:
    metrics = tmp_path / "m.jsonl"
    dyn = DynamicNegatives(make_lists(), N, DHNMConfig(check_every=2), metrics_path=metrics)
    for step in range(1, 7):
        dyn.observe(["q0", "q1"], np.full((2, N), 0.8 - 0.1 * step))
        dyn.maybe_check(step)
    png = plot_hardness(metrics, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConanError):
        plot_hardness(tmp_path / "absent.jsonl", tmp_path / "x.png")
