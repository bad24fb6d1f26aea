"""Input checks shared by the losses: a wrong shape or setting fails with one clear line."""

from __future__ import annotations

import torch

from conan_core.errors import ConanError


class LossInputError(ConanError):
    """A loss got embeddings of the wrong shape, mismatched sizes or a bad setting."""


def require_dims(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise LossInputError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def require_same_width(**tensors: torch.Tensor) -> None:
    """All tensors must share the embedding width (last dimension)."""
    widths = {name: t.shape[-1] for name, t in tensors.items()}
    if len(set(widths.values())) > 1:
        raise LossInputError(f"embedding widths differ: {widths}")


def require_positive(name: str, value: float) -> None:
    if not value > 0:
        raise LossInputError(f"{name} must be > 0, got {value}")


def require_mask_shape(neg_mask: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if neg_mask is None:
        return
    if tuple(neg_mask.shape) != shape or neg_mask.dtype != torch.bool:
        raise LossInputError(
            f"neg_mask must be a bool tensor of shape {shape}, got {neg_mask.dtype} {tuple(neg_mask.shape)}"
        )
