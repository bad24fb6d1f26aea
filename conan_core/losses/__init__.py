"""The paper's losses: embeddings (L2-normalised by the caller) in, a scalar tensor out.

infonce.py (Eq. 1 and hard-negative InfoNCE), cosent.py (Eq. 2), cbb.py (Eq. 3: `cbb_loss` on one process
and `distributed_cbb_loss`, the per-worker form training runs), matryoshka.py (MRL wrapper),
guards.py (false-negative guard).
"""

from conan_core.losses.cbb import (
    CbbEmbeddings,
    CbbShape,
    CbbTerms,
    WorkerRoles,
    cbb_loss,
    distributed_cbb_loss,
)
from conan_core.losses.checks import LossInputError
from conan_core.losses.cosent import cosent_loss
from conan_core.losses.guards import false_negative_mask
from conan_core.losses.infonce import (
    distributed_in_batch_infonce,
    hard_negative_infonce,
    in_batch_infonce,
    query_negative_scores,
    symmetric_in_batch_infonce,
)
from conan_core.losses.matryoshka import MatryoshkaLoss

__all__ = [
    "CbbEmbeddings",
    "CbbShape",
    "CbbTerms",
    "LossInputError",
    "MatryoshkaLoss",
    "cbb_loss",
    "cosent_loss",
    "distributed_cbb_loss",
    "distributed_in_batch_infonce",
    "false_negative_mask",
    "hard_negative_infonce",
    "in_batch_infonce",
    "symmetric_in_batch_infonce",
    "query_negative_scores",
    "WorkerRoles",
]
