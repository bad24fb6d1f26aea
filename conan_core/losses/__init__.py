"""The paper's losses: embeddings (L2-normalised by the caller) in, a scalar tensor out.

infonce.py (Eq. 1 and hard-negative InfoNCE), cosent.py (Eq. 2), cbb.py (Eq. 3, single-process and
per-rank distributed forms), matryoshka.py (MRL wrapper), guards.py (false-negative guard).
"""

from conan_core.losses.cbb import CBBGroups, CBBLayout, cbb_loss, distributed_cbb_terms, make_cbb_groups
from conan_core.losses.checks import LossInputError
from conan_core.losses.cosent import cosent_loss
from conan_core.losses.guards import false_negative_mask
from conan_core.losses.infonce import (
    distributed_in_batch_infonce,
    hard_negative_infonce,
    in_batch_infonce,
    query_negative_scores,
)
from conan_core.losses.matryoshka import MatryoshkaLoss

__all__ = [
    "CBBGroups",
    "CBBLayout",
    "LossInputError",
    "MatryoshkaLoss",
    "cbb_loss",
    "cosent_loss",
    "distributed_cbb_terms",
    "distributed_in_batch_infonce",
    "false_negative_mask",
    "hard_negative_infonce",
    "in_batch_infonce",
    "make_cbb_groups",
    "query_negative_scores",
]
