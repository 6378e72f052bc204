"""bihm: Bidirectional Helmholtz Machines.

The names below are imported on first use (PEP 562), so that light modules of the package
(`bihm.errors`, `bihm.atomic`) do not pull in torch: `bihm --help` answers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bihm.estimators import ESS, Estimates
    from bihm.logspace import log_mean_and_sem
    from bihm.model import BiHM
    from bihm.objectives import LossOutput

_HOMES = {
    "BiHM": "bihm.model",
    "ESS": "bihm.estimators",
    "Estimates": "bihm.estimators",
    "LossOutput": "bihm.objectives",
    "log_mean_and_sem": "bihm.logspace",
}
__all__ = ["BiHM", "ESS", "Estimates", "LossOutput", "log_mean_and_sem"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'bihm' has no attribute {name!r}")
