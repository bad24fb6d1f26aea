"""False-negative guard: which hard negatives to leave out of the softmax denominator.

A mined "negative" that is really a positive (same text, or scored about as high as the positive)
pushes the model away from a correct answer. Two rules, either one drops a negative:
  * text rule: the caller knows the texts and passes `text_mask` [B, K] (True = negative text equals
    the positive, or is otherwise known to be a positive);
  * score rule: s(q, n_k) > s(q, p) - margin (cosines, before any temperature), i.e. the negative
    scores within `margin` of the positive or above it (the "absolute margin" rule of GISTEmbed,
    Solatorio 2024). margin = 0 drops negatives that outscore the positive; margin < 0 is more lenient.
"""

from __future__ import annotations

import torch

from conan_core.losses.checks import LossInputError, require_mask_shape


@torch.no_grad()
def false_negative_mask(
    pos_scores: torch.Tensor,
    neg_scores: torch.Tensor,
    margin: float | None,
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool [B, K], True = drop. pos_scores [B], neg_scores [B, K]; margin None = no score rule."""
    if pos_scores.dim() != 1 or neg_scores.dim() != 2 or neg_scores.shape[0] != pos_scores.shape[0]:
        raise LossInputError(
            f"pos_scores must be [B] and neg_scores [B, K], got {tuple(pos_scores.shape)} "
            f"and {tuple(neg_scores.shape)}"
        )
    require_mask_shape(text_mask, tuple(neg_scores.shape))
    drop = torch.zeros(neg_scores.shape, dtype=torch.bool, device=neg_scores.device)
    if margin is not None:
        drop |= neg_scores > (pos_scores.unsqueeze(1) - margin)
    if text_mask is not None:
        drop |= text_mask.to(drop.device)
    return drop
