"""bihm: Bidirectional Helmholtz Machines.

The names below are imported on first use (PEP 562), so that light modules of the package
(`bihm.errors`, `bihm.atomic`) do not pull in torch: `bihm --help` answers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bihm.model import ESS, BiHM, Estimates, LossOutput, log_mean_and_sem

__all__ = ["BiHM", "ESS", "Estimates", "LossOutput", "log_mean_and_sem"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("bihm.model"), name)
    raise AttributeError(f"module 'bihm' has no attribute {name!r}")
