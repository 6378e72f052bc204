"""bihm: Bidirectional Helmholtz Machines."""

from bihm.model import ESS, BiHM, LossOutput, log_mean_and_sem

__all__ = ["BiHM", "ESS", "LossOutput", "log_mean_and_sem"]
