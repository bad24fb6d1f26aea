"""The losses against hand-computed values on tiny examples (2-D unit vectors with simple cosines)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conan_core.distributed import gather_no_grad, gather_with_grad, mean_over_ranks, world_info
from conan_core.errors import ConanError
from conan_core.losses import (
    CbbEmbeddings,
    CbbShape,
    LossInputError,
    MatryoshkaLoss,
    WorkerRoles,
    cbb_loss,
    cosent_loss,
    distributed_cbb_loss,
    distributed_in_batch_infonce,
    false_negative_mask,
    hard_negative_infonce,
    in_batch_infonce,
)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def unit_at(cosine: float) -> list[float]:
    """The 2-D unit vector whose cosine with (1, 0) is `cosine`."""
    return [cosine, math.sqrt(1.0 - cosine**2)]


# q0 . p0 = 0.6, q0 . p1 = 0.8, q1 . p0 = 0.8, q1 . p1 = 0.6
Q = t([[1.0, 0.0], [0.0, 1.0]])
P = t([[0.6, 0.8], [0.8, 0.6]])


# ---------------------------------------------------------------- in-batch InfoNCE (Eq. 1)


@pytest.mark.parametrize("temperature", [0.5, 0.25])
def test_in_batch_infonce_matches_hand_value(temperature: float) -> None:
    # Each row: -log(e^{0.6/tau} / (e^{0.6/tau} + e^{0.8/tau})) = log(1 + e^{0.2/tau}).
    expected = math.log(1.0 + math.exp(0.2 / temperature))
    assert in_batch_infonce(Q, P, temperature).item() == pytest.approx(expected, rel=1e-12)


def test_lower_temperature_sharpens_as_the_formula_says() -> None:
    # Positives ranked first: a lower tau lowers the loss; ranked last: it raises it.
    good_p = P.flip(0)  # q0 . p0 = 0.8 > q0 . p1 = 0.6
    assert in_batch_infonce(Q, good_p, 0.1) < in_batch_infonce(Q, good_p, 0.5)
    assert in_batch_infonce(Q, P, 0.1) > in_batch_infonce(Q, P, 0.5)
    assert in_batch_infonce(Q, good_p, 0.1).item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-12)


def test_in_batch_infonce_extra_passages_and_offset() -> None:
    extra = t([[1.0, 0.0]])  # scores 1.0 with q0 and 0.0 with q1
    p = torch.cat([P, extra])
    row0 = math.log(1 + math.exp(0.2) + math.exp(0.4))  # tau 1: positive 0.6; others 0.8, 1.0
    row1 = math.log(1 + math.exp(0.2) + math.exp(-0.6))  # positive 0.6; others 0.8, 0.0
    assert in_batch_infonce(Q, p, 1.0).item() == pytest.approx((row0 + row1) / 2, rel=1e-12)
    # With offset 1, q0's positive is p[1] (0.8) and q1's is p[2] (0.0).
    row0 = math.log(1 + math.exp(-0.2) + math.exp(0.2))
    row1 = math.log(1 + math.exp(0.8) + math.exp(0.6))
    assert in_batch_infonce(Q, p, 1.0, positive_offset=1).item() == pytest.approx((row0 + row1) / 2, rel=1e-12)


def test_in_batch_infonce_rejects_bad_input() -> None:
    with pytest.raises(LossInputError, match="fewer than"):
        in_batch_infonce(Q, P[:1])
    with pytest.raises(LossInputError, match="widths differ"):
        in_batch_infonce(Q, torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ConanError, match="temperature must be > 0"):
        in_batch_infonce(Q, P, 0.0)


# ---------------------------------------------------------------- hard-negative InfoNCE

Q1 = t([[1.0, 0.0]])
P1 = t([[0.6, 0.8]])  # positive score 0.6
NEGS1 = t([[[0.8, 0.6], [0.0, 1.0]]]).reshape(1, 2, 2)  # negative scores 0.8 and 0.0


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_hard_negative_infonce_matches_hand_value(temperature: float) -> None:
    expected = math.log(1 + math.exp(0.2 / temperature) + math.exp(-0.6 / temperature))
    loss = hard_negative_infonce(Q1, P1, NEGS1, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_hard_negative_masks_drop_from_the_denominator() -> None:
    text_mask = torch.tensor([[False, True]])
    assert hard_negative_infonce(Q1, P1, NEGS1, 1.0, neg_mask=text_mask).item() == pytest.approx(
        math.log(1 + math.exp(0.2)), rel=1e-12
    )
    # margin 0: the 0.8 negative outscores the positive (0.6) and is dropped.
    assert hard_negative_infonce(Q1, P1, NEGS1, 1.0, margin=0.0).item() == pytest.approx(
        math.log(1 + math.exp(-0.6)), rel=1e-12
    )
    # margin 0.7: 0.0 > 0.6 - 0.7 too, so only the positive is left: log(1) = 0.
    both = hard_negative_infonce(Q1, P1, NEGS1, 1.0, margin=0.7)
    assert both.item() == 0.0


def test_fully_masked_row_has_finite_gradient() -> None:
    q = Q1.clone().requires_grad_(True)
    loss = hard_negative_infonce(q, P1, NEGS1, 0.05, neg_mask=torch.tensor([[True, True]]))
    loss.backward()
    assert torch.isfinite(q.grad).all()


def test_hard_negative_infonce_with_in_batch_negatives() -> None:
    negs = torch.stack([NEGS1[0], NEGS1[0]])  # q1 = (0, 1) scores them 0.6 and 1.0
    row0 = math.log(1 + math.exp(0.2) + math.exp(0.2) + math.exp(-0.6))  # other positive p1 scores 0.8
    row1 = math.log(1 + math.exp(0.2) + math.exp(0.0) + math.exp(0.4))  # positive 0.6; p0 0.8; negs 0.6, 1.0
    loss = hard_negative_infonce(Q, P, negs, 1.0, in_batch=True)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-12)
    without = (math.log(1 + math.exp(0.2) + math.exp(-0.6)) + math.log(1 + math.exp(0.0) + math.exp(0.4))) / 2
    assert hard_negative_infonce(Q, P, negs, 1.0).item() == pytest.approx(without, rel=1e-12)


def test_hard_negative_infonce_rejects_bad_input() -> None:
    with pytest.raises(LossInputError, match="neg_mask must be a bool tensor of shape"):
        hard_negative_infonce(Q1, P1, NEGS1, neg_mask=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(LossInputError, match="negs must have 3 dimensions"):
        hard_negative_infonce(Q1, P1, NEGS1[0])
    with pytest.raises(LossInputError, match="need p with >= 2 rows"):
        hard_negative_infonce(Q, P1, NEGS1)


# ---------------------------------------------------------------- false-negative guard


def test_false_negative_mask_rules() -> None:
    pos = torch.tensor([0.6, 0.5])
    neg = torch.tensor([[0.8, 0.55, 0.1], [0.2, 0.45, 0.5]])
    assert false_negative_mask(pos, neg, None).sum() == 0
    assert false_negative_mask(pos, neg, 0.0).tolist() == [[True, False, False], [False, False, False]]
    assert false_negative_mask(pos, neg, 0.1).tolist() == [[True, True, False], [False, True, True]]
    text = torch.tensor([[False, False, True], [False, False, False]])
    assert false_negative_mask(pos, neg, 0.0, text_mask=text).tolist() == [
        [True, False, True],
        [False, False, False],
    ]
    with pytest.raises(LossInputError, match="pos_scores must be"):
        false_negative_mask(pos[:1], neg, 0.0)


# ---------------------------------------------------------------- CoSENT (Eq. 2)

A3 = t([[1.0, 0.0]] * 3)
B3 = t([unit_at(0.9), unit_at(0.5), unit_at(0.1)])


@pytest.mark.parametrize("scale", [20.0, 10.0])
def test_cosent_matches_hand_value(scale: float) -> None:
    # Gold order 2 > 1 > 0 matches the cosines 0.9 > 0.5 > 0.1; the three ordered pairs give
    # exp(s(0.5-0.9)) + exp(s(0.1-0.9)) + exp(s(0.1-0.5)).
    expected = math.log(1 + 2 * math.exp(-0.4 * scale) + math.exp(-0.8 * scale))
    loss = cosent_loss(A3, B3, torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64), scale)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_cosent_penalises_wrong_order_and_ignores_ties() -> None:
    reversed_gold = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    expected = math.log(1 + 2 * math.exp(8.0) + math.exp(16.0))
    assert cosent_loss(A3, B3, reversed_gold).item() == pytest.approx(expected, rel=1e-9)
    a = A3.clone().requires_grad_(True)
    ties = cosent_loss(a, B3, torch.ones(3, dtype=torch.float64))
    ties.backward()
    assert ties.item() == 0.0 and torch.isfinite(a.grad).all()


def test_cosent_rejects_bad_scores_shape() -> None:
    with pytest.raises(LossInputError, match="scores \\[B\\]"):
        cosent_loss(A3, B3, torch.ones(2))


# ---------------------------------------------------------------- Matryoshka


def test_matryoshka_is_weighted_sum_over_renormalised_prefixes() -> None:
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    mrl = MatryoshkaLoss([2, 8], weights=[0.5, 2.0])
    expected = 0.5 * in_batch_infonce(F.normalize(q[:, :2], dim=-1), F.normalize(p[:, :2], dim=-1), 0.1)
    expected = expected + 2.0 * in_batch_infonce(q, p, 0.1)
    assert mrl(in_batch_infonce, q, p, temperature=0.1).item() == pytest.approx(expected.item(), rel=1e-12)


def test_matryoshka_truncates_only_positional_embeddings() -> None:
    seen: list[tuple[tuple[int, ...], float]] = []

    def record(a: torch.Tensor, b: torch.Tensor, *, scores: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(a.shape), a.norm(dim=-1).max().item()))
        assert scores.shape == (3,)
        return a.sum() * 0

    MatryoshkaLoss([1, 2])(record, torch.ones(3, 2), torch.ones(3, 2), scores=torch.ones(3))
    assert [shape for shape, _ in seen] == [(3, 1), (3, 2)]
    assert all(norm == pytest.approx(1.0) for _, norm in seen)


def test_matryoshka_pass_through_and_errors() -> None:
    assert MatryoshkaLoss(None)(in_batch_infonce, Q, P, temperature=0.5) == in_batch_infonce(Q, P, 0.5)
    assert MatryoshkaLoss([])(in_batch_infonce, Q, P, temperature=0.5) == in_batch_infonce(Q, P, 0.5)
    with pytest.raises(LossInputError, match="exceeds the embedding width 2"):
        MatryoshkaLoss([4])(in_batch_infonce, Q, P)
    with pytest.raises(LossInputError, match="distinct positive"):
        MatryoshkaLoss([2, 2])
    with pytest.raises(LossInputError, match="2 matryoshka weights for 1 dims"):
        MatryoshkaLoss([2], weights=[1.0, 1.0])


# ---------------------------------------------------------------- CBB (Eq. 3), single process


def test_cbb_loss_is_retrieval_plus_beta_sts() -> None:
    scores = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    total, terms = cbb_loss(Q1, P1, NEGS1, A3, B3, scores, temperature=1.0, beta=0.8, scale=20.0)
    ret = math.log(1 + math.exp(0.2) + math.exp(-0.6))
    sts = math.log(1 + 2 * math.exp(-8.0) + math.exp(-16.0))
    assert terms["retrieval"].item() == pytest.approx(ret, rel=1e-12)
    assert terms["sts"].item() == pytest.approx(sts, rel=1e-9)
    assert total.item() == pytest.approx(ret + 0.8 * sts, rel=1e-12)


def test_cbb_loss_with_one_task_only() -> None:
    total, terms = cbb_loss(Q1, P1, NEGS1, None, None, None, temperature=1.0)
    assert terms["sts"] is None and total.item() == pytest.approx(terms["retrieval"].item())
    with pytest.raises(LossInputError, match="the sts part needs all of its tensors"):
        cbb_loss(Q1, P1, NEGS1, A3, None, None)
    with pytest.raises(LossInputError, match="needs the retrieval tensors"):
        cbb_loss(None, None, None, None, None, None)


def test_cbb_input_validation() -> None:
    shape = CbbShape((WorkerRoles((0,), ()),), retrieval_batch=3, negatives_per_rank=2, sts_batch=4, dim=4)
    with pytest.raises(LossInputError, match="beta must be >= 0"):
        distributed_cbb_loss(CbbEmbeddings(), shape, temperature=0.05, beta=-1.0, scale=20.0, in_batch=False)
    with pytest.raises(LossInputError, match="q, p and negs are required"):
        distributed_cbb_loss(CbbEmbeddings(), shape, temperature=0.05, beta=0.8, scale=20.0, in_batch=False,
                             tasks=("retrieval",))


# ---------------------------------------------------------------- single-process fallbacks


def test_collectives_pass_through_without_a_process_group() -> None:
    x = torch.ones(2, 3)
    assert world_info() == world_info(None) and world_info().size == 1 and world_info().rank == 0
    assert gather_with_grad(x) is x and gather_no_grad(x) is x
    assert mean_over_ranks(x).equal(x)
    # The distributed forms reduce to the single-process losses on one rank.
    q = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    assert distributed_in_batch_infonce(q, p, 0.05) == in_batch_infonce(q, p, 0.05)
    negs = F.normalize(torch.randn(3, 2, 4, dtype=torch.float64), dim=-1)
    shape = CbbShape((WorkerRoles((0,), ()),), retrieval_batch=3, negatives_per_rank=2, sts_batch=4, dim=4)
    terms = distributed_cbb_loss(CbbEmbeddings(q=q, p=p, negs=negs.reshape(-1, 4)), shape, temperature=0.05,
                                 beta=0.8, scale=20.0, in_batch=False, tasks=("retrieval",))
    assert terms.objective.item() == pytest.approx(hard_negative_infonce(q, p, negs, 0.05).item(), rel=1e-12)


def test_symmetric_in_batch_infonce_is_the_mean_of_both_directions() -> None:
    from conan_core.losses import symmetric_in_batch_infonce

    generator = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    backward = in_batch_infonce(p, q, 0.05)  # each positive against all queries
    assert symmetric_in_batch_infonce(q, p, 0.05).item() == pytest.approx(
        (in_batch_infonce(q, p, 0.05).item() + backward.item()) / 2, rel=1e-6)
    assert symmetric_in_batch_infonce(q, q, 0.05).item() == pytest.approx(in_batch_infonce(q, q, 0.05).item())
