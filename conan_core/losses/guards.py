"""False-negative guard: which hard negatives to leave out of the softmax denominator.

A mined "negative" that is really a positive (same text, or scored about as high as the positive)
pushes the model away from a correct answer. Two rules, either one drops a negative:
  * text rule: the caller knows the texts and passes `text_mask` [B, K] (True = negative text equals
    the positive, or is otherwise known to be a positive);
  * score rule: s(q, n_k) > s(q, p) - margin (cosines, before any temperature), i.e. the negative
    scores within `margin` of the positive or above it (the "absolute margin" rule of GISTEmbed,
    Solatorio 2024). margin = 0 drops negatives that outscore the positive; margin < 0 is more lenient.
    The rule is `additive_margin_mask`. Mining's guard is a different rule on purpose: relative to the
    positive (`conan_core.mining.guards.relative_margin_mask`, `score >= positive_score * margin`).
"""

from __future__ import annotations

import torch

from conan_core.losses.checks import LossInputError, require_mask_shape


@torch.no_grad()
def additive_margin_mask(pos_scores: torch.Tensor, neg_scores: torch.Tensor, margin: float) -> torch.Tensor:
    """The loss's margin rule, additive: bool [B, K], True (drop) where `s(q, n_k) > s(q, p) - margin`.

    GISTEmbed's absolute margin on cosines (before any temperature): a negative is dropped when it scores
    within `margin` of the positive or above it, whatever the positive's score. pos_scores [B],
    neg_scores [B, K] (shapes are checked by `false_negative_mask`).
    """
    return neg_scores > (pos_scores.unsqueeze(1) - margin)


@torch.no_grad()
def false_negative_mask(
    pos_scores: torch.Tensor,
    neg_scores: torch.Tensor,
    margin: float | None,
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool [B, K], True = drop. pos_scores [B], neg_scores [B, K]; margin None = no score rule
    (`additive_margin_mask` otherwise); text_mask, when given, is or-ed in."""
    if pos_scores.dim() != 1 or neg_scores.dim() != 2 or neg_scores.shape[0] != pos_scores.shape[0]:
        raise LossInputError(
            f"pos_scores must be [B] and neg_scores [B, K], got {tuple(pos_scores.shape)} "
            f"and {tuple(neg_scores.shape)}"
        )
    require_mask_shape(text_mask, tuple(neg_scores.shape))
    drop = torch.zeros(neg_scores.shape, dtype=torch.bool, device=neg_scores.device)
    if margin is not None:
        drop |= additive_margin_mask(pos_scores, neg_scores, margin)
    if text_mask is not None:
        drop |= text_mask.to(drop.device)
    return drop
