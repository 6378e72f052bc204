"""The estimators of a BiHM from importance samples: per example over a batch, and 2 log Z.

With K samples h_k ~ q(h | x) and d_k = log p(x, h_k) - log q(h_k | x) (`bihm-math.md`):

    log p(x)   ~ logsumexp_k(d_k) - log K                      (importance sampling with q)
    log p~*(x) ~ 2 (logsumexp_k(d_k / 2) - log K)              (paper Eq. 4-5)
    ESS        = (sum_k w_k)^2 / sum_k w_k^2   for w = sqrt(p/q) (p*) and w = p/q (p)

all stochastic lower bounds that tighten as K grows, and with (x, h) ~ p, h'_m ~ q(h | x):

    Z^2 = E[ sqrt(q(h | x) / p(x, h)) (1/M) sum_m sqrt(p(x, h'_m) / q(h'_m | x)) ]   (Eq. 7)

so log p*(x) ~ log p~*(x) - 2 log Z. A label node y (bihm/labels.py) adds the class
posteriors q(y | x) ~ mean_k q(y | h_{L-1,k}) and p*(y | x), an importance-sampling
estimate of the same kind (`classify`). Each estimator runs over (x, h) pairs in chunks of at
most `chunk`, so K = 10,000 on 10,000 images fits in memory; with per-row streams (bihm/rng.py)
a row's samples, hence its estimates, do not depend on the chunking or the batch.
The reductions over a data set and across processes are in `bihm.evaluation`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bihm import compiled, labels
from bihm.logspace import ess_from_log_weights, log_mean_and_sem, log_mean_exp
from bihm.rng import Generator, RowStreams, Streams

if TYPE_CHECKING:
    from bihm.model import BiHM

# (x, h) pairs evaluated at once by the chunked estimators: bounds memory at any K and N;
# small enough to stay in cache (4096 ran 1.2-1.6x faster than 32768 on a 2-core CPU).
DEFAULT_CHUNK = 4096


@dataclass
class Estimates:
    """Per-example importance-sampling estimates from one set of K samples h_k ~ q(h | x)."""

    log_p: Tensor  # log p(x)
    log_ptilde_star: Tensor  # log p~*(x)
    ess_pstar: Tensor  # ESS of w = sqrt(p(x, h) / q(h | x)), in [1, K]
    ess_p: Tensor  # ESS of w = p(x, h) / q(h | x), in [1, K]


@dataclass
class ESS:
    """Per-example effective sample sizes, in [1, K]; divide by K for the fraction."""

    pstar: Tensor  # weights w = sqrt(p(x, h) / q(h | x))
    p: Tensor  # weights w = p(x, h) / q(h | x)


@torch.no_grad()
def chunked(x: Tensor, K: int, chunk: int, generator: Generator, fn, y=None):
    """Yield (first row, fn(x rows, k, generator, y rows)) covering all (example, k)
    pairs of x in chunks of at most `chunk` pairs."""
    x = x.reshape(-1, x.shape[-1])
    y = None if y is None else y.reshape(-1)
    k_chunk = max(1, min(K, chunk))
    rows = max(1, chunk // k_chunk)
    streams = generator if isinstance(generator, Streams) else None
    draws = 0
    for start in range(0, x.shape[0], rows):
        xb = x[start : start + rows]
        yb = None if y is None else y[start : start + rows]
        # Per-row generators (RowStreams) continue in the same order, chunk by chunk over
        # K, whatever the number of rows per chunk; counter-based Streams draw each chunk
        # of K at its own sample offset k0, from the same draw numbers. Either way a row's
        # samples do not depend on the batch.
        g = generator[start : start + rows] if isinstance(generator, RowStreams) else generator
        for k0 in range(0, K, k_chunk):
            if streams is not None:
                g = streams[start : start + rows].at(k0)
            yield start, fn(xb, min(k_chunk, K - k0), g, yb)
            draws = g.draw if streams is not None else 0
    if streams is not None:
        streams.advance(draws)


@torch.no_grad()
def log_likelihood(
    model: BiHM,
    x: Tensor,
    K: int,
    chunk: int = DEFAULT_CHUNK,
    generator: Generator = None,
) -> tuple[Tensor, Tensor]:
    """Per-example importance-sampling estimates with K samples h_k ~ q(h | x):

        log p(x)   ~ logsumexp_k(d_k) - log K
        log p~*(x) ~ 2 (logsumexp_k(d_k / 2) - log K)

    Both are stochastic lower bounds that tighten as K grows. Computed in chunks of
    at most `chunk` (x, h) pairs, so K = 10,000 on 10,000 images fits in memory.
    Returns (log_p, log_ptilde_star), each of x's leading shape.
    """
    est = model.estimates(x, K, chunk, generator)
    return est.log_p.to(model._dtype), est.log_ptilde_star.to(model._dtype)


@torch.no_grad()
def estimates(
    model: BiHM,
    x: Tensor,
    K: int,
    chunk: int = DEFAULT_CHUNK,
    generator: Generator = None,
    y: Tensor | None = None,
) -> Estimates:
    """`log_likelihood`'s two estimates and the ESS of both weight kinds, from the same
    K samples: with S_a = logsumexp_k(a d_k), ESS = exp(2 S_a - S_2a) for the weights
    w = exp(a d), i.e. a = 1/2 (p* weights) and a = 1 (p weights). One pass, chunked.
    With a label node and labels y (-1 = missing): estimates of log p(x, y) and
    log p~*(x, y) where y is given, of log p(x) and log p~*(x) where it is not.
    Returns float64 tensors of x's leading shape (the reductions run in float64)."""
    model._check_positive(K, "K")
    model._check_positive(chunk, "chunk")
    model._check_x(x)
    labels.check_indices(model, y, x)
    lead = x.shape[:-1]
    n = math.prod(lead)
    # S_{1/2}, S_1, S_2 accumulated over the chunks of K by log-sum-exp, in float64:
    # the ESS exponent 2 S_a - S_2a is a few nats left of numbers the size of
    # log p(x, h) (hundreds of nats), so rounding S to float32 would move the ESS by up
    # to 1.5 ulps of |S| (relative 5e-5 at |S| ~ 500), and by a different rounding for
    # each batch shape's reduction kernel. d itself stays in the model's dtype.
    lse = torch.full((3, n), -math.inf, device=model._device, dtype=torch.float64)
    fn = _weight_sums
    if not isinstance(generator, torch.Generator):  # a generator= breaks a graph
        fn = compiled.function(fn, "estimators")
    fn = functools.partial(fn, model)
    for start, part in chunked(x, K, chunk, generator, fn, y):
        rows = slice(start, start + part.shape[1])
        lse[:, rows] = torch.logaddexp(lse[:, rows], part)
    half, one, two = lse
    return Estimates(
        log_p=(one - math.log(K)).reshape(lead),
        log_ptilde_star=(2 * (half - math.log(K))).reshape(lead),
        ess_pstar=torch.exp(2 * half - one).reshape(lead),
        ess_p=torch.exp(2 * one - two).reshape(lead),
    )


def _weight_sums(model: BiHM, x: Tensor, K: int, generator: Generator, y=None) -> Tensor:
    """For `estimates`: S_a = logsumexp_k(a d_k) for a = 1/2, 1, 2 over these K samples,
    in float64; (3, rows)."""
    d = model._log_weights(x, K, generator, y).double()
    return torch.stack([torch.logsumexp(a * d, -1) for a in (0.5, 1.0, 2.0)])


@torch.no_grad()
def ess(model: BiHM, x: Tensor, K: int, generator: Generator = None) -> ESS:
    """Effective sample sizes (sum w)^2 / sum w^2 of K samples h_k ~ q(h | x), per example,
    for the p* weights w = sqrt(p/q) and the p weights w = p/q. A BiHM's q matches
    p*'s posterior far better than p's, so ESS_pstar >> ESS_p (paper, Sec. 4)."""
    model._check_positive(K, "K")
    model._check_x(x)
    d = model._log_weights(x, K, generator)
    return ESS(pstar=ess_from_log_weights(d / 2), p=ess_from_log_weights(d))


@torch.no_grad()
def log_z2_terms(model: BiHM, n: int, inner: int = 10, generator: Generator = None) -> Tensor:
    """The n outer terms of the paper's Eq. 7 estimator of Z^2, in log space:

        (x, h) ~ p(x, h),  h'_m ~ q(h | x), m = 1..M (M = inner)
        term = sqrt(q(h | x) / p(x, h)) * (1/M) sum_m sqrt(p(x, h'_m) / q(h'_m | x))

    E[term] = Z^2 exactly, since E_{h'~q} sqrt(p/q) = sqrt(p~*(x)). Returns log term, (n,).
    """
    model._check_positive(n, "n")
    model._check_positive(inner, "inner")
    hs, log_p, y = model._sample_p(n, generator)
    log_q = model.log_q(hs, y)
    d_inner = model._log_weights(hs[0], inner, generator)  # (n, M)
    return 0.5 * (log_q - log_p) + log_mean_exp(d_inner / 2)


@torch.no_grad()
def estimate_log_z2(
    model: BiHM,
    n: int,
    inner: int = 10,
    chunk: int = DEFAULT_CHUNK,
    generator: Generator = None,
) -> tuple[float, float]:
    """2 log Z ~ logsumexp_n(term_n) - log N (Eq. 7), and its delta-method standard error.

    Biased low for small N (Jensen): report N with it. The authors used N = 10^6,
    M = 10. Chunked over N, so memory stays bounded.
    """
    model._check_positive(n, "n")
    model._check_positive(chunk, "chunk")
    outer_chunk = max(1, chunk // (inner + 1))
    lse_w = lse_w2 = -math.inf
    for start in range(0, n, outer_chunk):
        terms = model.log_z2_terms(min(outer_chunk, n - start), inner, generator).double()
        lse_w = float(torch.logaddexp(torch.tensor(lse_w), torch.logsumexp(terms, 0)))
        lse_w2 = float(torch.logaddexp(torch.tensor(lse_w2), torch.logsumexp(2 * terms, 0)))
    return log_mean_and_sem(lse_w, lse_w2, n)


@torch.no_grad()
def classify(
    model: BiHM,
    x: Tensor,
    K: int,
    chunk: int = DEFAULT_CHUNK,
    generator: Generator = None,
) -> tuple[Tensor, Tensor]:
    """Class log-probabilities of the label node from K samples h_k ~ q(h | x):

        log q(y | x)  ~ log (1/K) sum_k q(y | h_{L-1,k})          (bottom-up)
        log p*(y | x) ~ log softmax_y logsumexp_k
                        (1/2)(log p(x, h_k, y) + log q(y | h_{L-1,k}) - log q(h_k | x))

    The second because p*(x, h, y) is proportional to sqrt(p(x, h, y) q(h, y | x)) for
    a fixed x (q(x) = p*(x) does not depend on y), so p*(y | x) is proportional to
    E_{q(h|x)} sqrt(p(x, h, y) q(y | h_{L-1}) / q(h | x)). Consistent as K grows.
    Returns (log q(y | x), log p*(y | x)), each (N, C) for x of N rows; chunked.
    """
    if not model.n_classes:
        raise ValueError("classify needs a label node (n_classes > 0)")
    model._check_positive(K, "K")
    model._check_positive(chunk, "chunk")
    model._check_x(x)
    x = x.reshape(-1, x.shape[-1])
    lse = torch.full((x.shape[0], 2, model.n_classes), -math.inf, device=x.device)
    lse = lse.to(model._dtype)
    scores = functools.partial(_class_scores, model)
    for start, part in chunked(x, K, chunk, generator, scores):
        rows = slice(start, start + part.shape[0])
        lse[rows] = torch.logaddexp(lse[rows], part)
    return lse[:, 1] - math.log(K), torch.log_softmax(lse[:, 0], -1)


def _class_scores(model: BiHM, x: Tensor, K: int, generator: Generator, _y=None) -> Tensor:
    """For `classify`: logsumexp over these K samples of the p* score and of
    log q(y | h_{L-1}), per class; (rows, 2, C)."""
    fams, p_s, q_s, L = model._fams, model._log_stds("p"), model._log_stds("q"), model.n_latent
    hs, q_a, _ = model._q_pass(x, K, generator)
    log_q_h = sum(fams[l].log_prob(hs[l], q_a[l - 1], q_s[l]) for l in range(1, L + 1))
    log_p = sum(
        fams[l].log_prob(hs[l], fams[l].finish(model.p_nets[l](hs[l + 1])), p_s[l])
        for l in range(L)
    )
    top_a = fams[L].finish(model.prior_logits + model.label_prior.T)  # (C, n_L): b + U y
    log_top = fams[L].log_prob(hs[L].unsqueeze(-2), top_a, p_s[L])  # (rows, K, C)
    log_top = log_top + torch.log_softmax(model.label_logits, -1)
    log_q_y = torch.log_softmax(model.q_label(hs[L - 1]), -1)
    score = 0.5 * ((log_p - log_q_h).unsqueeze(-1) + log_top + log_q_y)
    return torch.stack([torch.logsumexp(score, 1), torch.logsumexp(log_q_y, 1)], 1)
