"""Averages of importance weights in log space.

Every estimator of `bihm-math.md` is an average of importance weights w_k = exp(log w_k)
whose logs are hundreds of nats (log p(x, h) of an MNIST image), so the averages are taken
by log-sum-exp and never through exp(log w) itself:

    log mean_k w_k   = logsumexp_k(log w_k) - log K
    ESS              = (sum_k w_k)^2 / sum_k w_k^2 = exp(2 logsumexp(log w) - logsumexp(2 log w))

For d_k = log p(x, h_k) - log q(h_k | x): log p(x) ~ log mean exp(d_k) and
log p~*(x) ~ 2 log mean exp(d_k / 2) (paper Eq. 4-5); Z^2 (Eq. 7) is the mean of its outer
terms, reported with the delta-method standard error of `log_mean_and_sem`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def log_mean_exp(log_w: Tensor, dim: int = -1) -> Tensor:
    """log (1/K) sum_k exp(log_w_k), stable."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def ess_from_log_weights(log_w: Tensor, dim: int = -1) -> Tensor:
    """Effective sample size (sum_k w_k)^2 / sum_k w_k^2, in [1, K]."""
    return torch.exp(2 * torch.logsumexp(log_w, dim) - torch.logsumexp(2 * log_w, dim))


def log_mean_and_sem(lse_w: float, lse_w2: float, n: int) -> tuple[float, float]:
    """From log sum_n w_n, log sum_n w_n^2 and n: log mean(w) and its standard error.

    The standard error of log mean(w) by the delta method is
    sqrt(Var(w) / n) / mean(w) = sqrt((n sum w^2 / (sum w)^2 - 1) / (n - 1)).
    Only sums enter, so partial sums from several processes combine exactly by
    log-sum-exp before calling this.
    """
    log_mean = lse_w - math.log(n)
    if n < 2:
        return log_mean, float("inf")
    rel = math.exp(math.log(n) + lse_w2 - 2 * lse_w)
    return log_mean, math.sqrt(max(rel - 1.0, 0.0) / (n - 1))
