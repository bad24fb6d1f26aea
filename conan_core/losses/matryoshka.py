"""Matryoshka wrapper: the same loss on nested prefixes of the embedding (Kusupati et al. 2022, MRL)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from conan_core.losses.checks import LossInputError, require_same_width


def truncate_and_normalize(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """The first `dim` coordinates of the last axis, L2-normalised again (a prefix is not unit length)."""
    return F.normalize(embeddings[..., :dim], p=2, dim=-1)


class MatryoshkaLoss:
    """MRL as used by Conan-embedding (arXiv 2408.15710, §2.3):

        L_MRL = sum_m w_m * L( truncate(e_1, d_m), ..., truncate(e_n, d_m) )

    Call as `mrl(loss_fn, *embeddings, **kwargs)`: every POSITIONAL argument is an embedding tensor
    ([..., d]) and is truncated to d_m dims and re-normalised; keyword arguments (scores, temperature,
    masks) go to `loss_fn` unchanged. weights default to 1 each (a plain sum, as sentence-transformers'
    MatryoshkaLoss does). dims None or empty: a pass-through to loss_fn.
    """

    def __init__(self, dims: Sequence[int] | None, weights: Sequence[float] | None = None) -> None:
        self.dims = tuple(int(d) for d in dims) if dims else ()
        if any(d <= 0 for d in self.dims) or len(set(self.dims)) != len(self.dims):
            raise LossInputError(f"matryoshka dims must be distinct positive integers, got {list(self.dims)}")
        self.weights = tuple(float(w) for w in weights) if weights is not None else (1.0,) * len(self.dims)
        if len(self.weights) != len(self.dims):
            raise LossInputError(f"{len(self.weights)} matryoshka weights for {len(self.dims)} dims")

    def __call__(
        self, loss_fn: Callable[..., torch.Tensor], *embeddings: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        if not self.dims:
            return loss_fn(*embeddings, **kwargs)
        require_same_width(**{f"embedding {i}": e for i, e in enumerate(embeddings)})
        width = embeddings[0].shape[-1]
        if max(self.dims) > width:
            raise LossInputError(f"matryoshka dim {max(self.dims)} exceeds the embedding width {width}")
        total = None
        for dim, weight in zip(self.dims, self.weights, strict=True):
            truncated = [truncate_and_normalize(e, dim) for e in embeddings]
            term = weight * loss_fn(*truncated, **kwargs)
            total = term if total is None else total + term
        return total
