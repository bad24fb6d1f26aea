"""CoSENT, the STS loss of Conan-embedding (Eq. 2, arXiv 2408.15710; Su 2022, "CoSENT")."""

from __future__ import annotations

import torch

from conan_core.losses.checks import LossInputError, require_dims, require_positive, require_same_width


def cosent_loss(a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """CoSENT over a batch of scored pairs (a_i, b_i, y_i):

        L = log( 1 + sum_{(i, j): y_i > y_j} exp( scale * (cos(a_j, b_j) - cos(a_i, b_i)) ) )

    i.e. Eq. 2 with scale = 1 / tau (default 20, tau 0.05, as in the original CoSENT). Every pair of
    pairs whose gold order is i above j adds a penalty that grows as the model scores j above i; pairs
    with equal gold scores add nothing. a, b [B, d] L2-normalised; scores [B] (any real scale).
    A sum over pairs-of-pairs as in the paper, so its size grows with the batch.
    """
    require_dims("a", a, 2)
    require_dims("b", b, 2)
    require_same_width(a=a, b=b)
    require_positive("scale", scale)
    if a.shape[0] != b.shape[0] or scores.shape != (a.shape[0],):
        raise LossInputError(
            f"need a [B, d], b [B, d], scores [B]; got {tuple(a.shape)}, {tuple(b.shape)}, "
            f"{tuple(scores.shape)}"
        )
    cosines = (a * b).sum(-1) * scale
    # differences[i, j] = scale * (cos_j - cos_i), kept where gold y_i > y_j.
    differences = cosines.unsqueeze(0) - cosines.unsqueeze(1)
    ordered = scores.unsqueeze(1) > scores.unsqueeze(0)
    differences = differences.masked_fill(~ordered.to(differences.device), float("-inf"))
    # The appended 0 is the "1 +" inside the log.
    zero = torch.zeros(1, dtype=differences.dtype, device=differences.device)
    return torch.logsumexp(torch.cat([zero, differences.flatten()]), dim=0)
