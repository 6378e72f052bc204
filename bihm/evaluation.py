"""Evaluation over a data set: the estimators of `bihm-math.md` per example, and their
exact reduction over the processes that share the data set.

Exactness across ranks and batch sizes
--------------------------------------
The samples of example i are drawn from its own stream, keyed by
(seed, purpose, K, global index i) (`bihm.rng.row_streams`), while the arithmetic runs on
whole batches. Ranks accumulate float64 sums (`Sums`, by name) that are summed across
ranks once, at the end, so a mean is the exact mean over the whole split. 2 log Z (paper
Eq. 7) is estimated from N outer samples in fixed chunks, chunk c taken by rank
c mod world_size (and drawn from (seed, c), or sample n from (seed, n) with counter-based
streams); the per-rank log-sum-exp partials of w and w^2 are combined by log-sum-exp. One
process and many, and any batch size, give the same numbers up to the float rounding of
the sums. The Lightning modules sum and gather across ranks through their strategy
(`Collectives`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bihm.estimators import Estimates
from bihm.logspace import log_mean_and_sem
from bihm.model import BiHM
from bihm.rng import (
    RowStreams,
    Streams,
    counter_based,
    make_generator,
    row_streams,
    step_generator,
)

# Purposes mixed into the seeds, so that no two uses share random numbers.
TRAIN, LOG_LIKELIHOOD, LOG_Z, GIBBS, RECONSTRUCT, SAMPLES_P, SAMPLES_PSTAR, CLASSIFY = range(1, 9)
TRAIN_EVAL = 9  # the training subset scored at each validation (BiHMModule)

# Gibbs chains advanced together: each scores (S + 1) x inner configurations of every
# layer per sweep (~70 MB per chain for the paper model with S = 1000, inner = 10).
GIBBS_GROUP = 8


class Sums:
    """Named float64 sums over examples, reduced across ranks in one collective.

    Every rank declares the same names, so the stacked tensor lines up across ranks
    (a rank whose share of the split is empty still takes part in the reduction).
    """

    def __init__(self, names: Sequence[str], device: torch.device | str) -> None:
        self.names = list(names)
        self._values = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self._index = {name: i for i, name in enumerate(self.names)}

    def add(self, name: str, value: Tensor | float) -> None:
        self._values[self._index[name]] += value

    def add_moments(self, name: str, values: Tensor) -> None:
        """Accumulate n, sum and sum of squares of per-example values under `name`."""
        values = values.double()
        self.add(f"{name}.n", float(values.numel()))
        self.add(f"{name}.sum", values.sum())
        self.add(f"{name}.sum_sq", (values * values).sum())

    def reduced(self, reduce_sum: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """The global sums by name; `reduce_sum` sums a tensor over ranks (None: one rank)."""
        values = self._values if reduce_sum is None else reduce_sum(self._values.clone())
        return dict(zip(self.names, values.tolist(), strict=True))


# The per-example estimates that validation and `bihm eval` reduce (`Estimates`' fields).
ESTIMATES = [f.name for f in dataclasses.fields(Estimates)]


def moment_names(name: str) -> list[str]:
    """The names `Sums.add_moments(name, ...)` fills."""
    return [f"{name}.n", f"{name}.sum", f"{name}.sum_sq"]


def mean_and_sem(total: float, total_sq: float, n: float) -> tuple[float, float]:
    """Mean and standard error of the mean across examples from global sums:
    sem = sqrt(s^2 / n), s^2 = (sum v^2 - n mean^2) / (n - 1)."""
    if n <= 0:
        return math.nan, math.nan
    mean = total / n
    if n < 2:
        return mean, math.inf
    var = max(total_sq - n * mean * mean, 0.0) / (n - 1)
    return mean, math.sqrt(var / n)


def moments_mean_and_sem(sums: dict[str, float], name: str) -> tuple[float, float]:
    return mean_and_sem(sums[f"{name}.sum"], sums[f"{name}.sum_sq"], sums[f"{name}.n"])


def log_pstar_sem(log_ptilde_star_sem: float, two_log_z_sem: float) -> float:
    """SE of log p* = log p~* - 2 log Z: the two estimates use independent samples."""
    return math.sqrt(log_ptilde_star_sem**2 + two_log_z_sem**2)


# --------------------------------------------------------------------------- estimators
@torch.no_grad()
def estimates(
    model: BiHM, x: Tensor, idx: Tensor, K: int, seed: int, purpose: int = LOG_LIKELIHOOD
) -> Estimates:
    """Per-example log p(x), log p~*(x) and both ESS with K samples h_k ~ q(h | x), batched.

    Example idx[i] draws its samples from the stream (seed, purpose, K, idx[i]), so its
    estimates do not depend on the batch, the rank or the process count. `purpose` keeps
    the streams of different splits apart (TRAIN_EVAL for the training subset).
    Returns float64 tensors of shape (B,).
    """
    if x.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.float64, device=x.device)
        return Estimates(empty, empty, empty, empty)
    streams = row_streams(x.device, seed, purpose, K, keys=idx)
    est = model.estimates(x, K, generator=streams)
    return Estimates(*(getattr(est, f.name).double() for f in dataclasses.fields(est)))


@torch.no_grad()
def classification_errors(
    model: BiHM, x: Tensor, y: Tensor, idx: Tensor, K: int, seed: int
) -> dict[str, float]:
    """Misclassified examples of the label node, by argmax of q(y | x) and of p*(y | x)
    (`BiHM.classify` with K samples from the streams (seed, CLASSIFY, K, idx[i]), so the
    counts do not depend on the batch or the rank). Returns {"n", "q", "pstar"}, summed."""
    if x.shape[0] == 0:
        return {"n": 0.0, "q": 0.0, "pstar": 0.0}
    streams = row_streams(x.device, seed, CLASSIFY, K, keys=idx)
    log_q, log_pstar = model.classify(x, K, generator=streams)
    return {
        "n": float(x.shape[0]),
        "q": float((log_q.argmax(-1) != y).sum()),
        "pstar": float((log_pstar.argmax(-1) != y).sum()),
    }


@torch.no_grad()
def log_z2_partial(
    model: BiHM,
    n: int,
    inner: int,
    chunk: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> Tensor:
    """This rank's [log sum w, log sum w^2] over its chunks of the N outer Eq. 7 terms.

    Chunk c covers outer samples [c * chunk, min(n, (c + 1) * chunk)) and belongs to rank
    c mod world_size. Its draws come from a generator seeded by (seed, c), or with
    counter-based streams (`set_counter_based`) outer sample m's from (seed, LOG_Z, inner, m),
    which makes the terms independent of the chunk size too. float64, shape (2,).
    """
    device = model.prior_logits.device
    lse = torch.full((2,), -math.inf, dtype=torch.float64, device=device)
    chunks = range(rank, math.ceil(n / chunk), world_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"2 log Z (N={n})", unit="chunk", leave=False)
    for c in chunks:
        size = min(chunk, n - c * chunk)
        if counter_based():
            g = Streams.keyed(device, seed, LOG_Z, inner, keys=range(c * chunk, c * chunk + size))
        else:  # one generator for the chunk: per-row generators would loop over N rows
            g = make_generator(device, seed, LOG_Z, c)
        terms = model.log_z2_terms(size, inner, generator=g).double()
        part = torch.stack([torch.logsumexp(terms, 0), torch.logsumexp(2 * terms, 0)])
        lse = torch.logaddexp(lse, part)
    return lse


def combine_log_z2(partials: Tensor, n: int) -> tuple[float, float]:
    """2 log Z and its standard error from per-rank partials (world_size, 2) by log-sum-exp."""
    lse = torch.logsumexp(partials.reshape(-1, 2).double(), dim=0)
    return log_mean_and_sem(float(lse[0]), float(lse[1]), n)


def _chain_streams(
    device, seed: int, purpose: int, idx: Tensor, chains: int
) -> Streams | RowStreams:
    """One stream per (example, chain), rows ordered example-major as `repeat_interleave`:
    chain c of example i has the stream (seed, purpose, i, c), or with counter-based
    streams (seed, purpose, chains, i * chains + c)."""
    if not counter_based():
        gens = [
            make_generator(device, seed, purpose, i, c) for i in idx.tolist() for c in range(chains)
        ]
        return RowStreams(gens)
    keys = idx.to(device).reshape(-1, 1) * chains + torch.arange(chains, device=device)
    return Streams.keyed(device, seed, purpose, chains, keys=keys.reshape(-1))


@torch.no_grad()
def inpainting_errors(
    model: BiHM,
    x: Tensor,
    idx: Tensor,
    mask: Tensor,
    *,
    chains: int,
    steps: int,
    proposals: int,
    inner: int,
    seed: int,
    group: int = GIBBS_GROUP,
) -> dict[str, float]:
    """Masked-pixel errors of Gibbs inpainting from p* and of q-then-p reconstruction.

    `chains` chains per example, the chains of all examples advancing together in groups
    of `group`; chain c of example idx[i] has its own streams (seed, GIBBS | RECONSTRUCT,
    idx[i], c), so the result does not depend on the rank, the batch or `group`.
    Returns {"gibbs": errors, "recon": errors, "masked": masked pixels}, summed. An error
    is a wrong binary pixel, or for a Gaussian visible layer the squared difference (so
    the ratios are an error rate, or a mean squared error per masked pixel).
    """
    out = {"gibbs": 0.0, "recon": 0.0, "masked": 0.0}
    if x.shape[0] == 0:
        return out
    xs = x.repeat_interleave(chains, dim=0)
    ms = mask.expand_as(xs)

    def error(guess: Tensor, truth: Tensor) -> Tensor:
        return (guess - truth) ** 2 if model.families[0] == "gaussian" else guess != truth

    gibbs = _chain_streams(x.device, seed, GIBBS, idx, chains)
    recon = _chain_streams(x.device, seed, RECONSTRUCT, idx, chains)
    free = 1 - mask
    for start in range(0, xs.shape[0], group):
        rows = slice(start, start + group)
        xg, mg = xs[rows], ms[rows]
        filled = model.inpaint(
            xg, mg, steps=steps, proposals=proposals, inner=inner, generator=gibbs[rows]
        )
        guess = model.reconstruct(xg, mg, generator=recon[rows])
        out["gibbs"] += float((error(filled, xg) * free).sum())
        out["recon"] += float((error(guess, xg) * free).sum())
    out["masked"] = float(free.sum()) * xs.shape[0]
    return out


@torch.no_grad()
def sample_pictures(
    model: BiHM,
    n: int,
    *,
    steps: int,
    proposals: int,
    inner: int,
    seed: int,
    progress: bool = False,
    group: int = GIBBS_GROUP,
) -> tuple[Tensor, Tensor]:
    """n plain top-down samples x ~ p(x), and n samples from p* after `steps` Gibbs sweeps
    started from ancestral p samples; chain j has its own stream (seed, SAMPLES_PSTAR, j)."""
    from tqdm.auto import tqdm

    device = model.prior_logits.device
    x_p = model.sample_p(n, generator=step_generator(device, seed, SAMPLES_P, n, rows=n))[0]
    streams = row_streams(device, seed, SAMPLES_PSTAR, keys=range(n))
    x_star = []
    bar = tqdm(total=n * steps, desc="Gibbs sweeps x chains", disable=not progress)
    for start in range(0, n, group):
        g = streams[start : start + group]
        hs = model.sample_p(len(g), generator=g)
        for _ in range(steps):
            hs = model.gibbs_step(hs, proposals, inner, generator=g)
            bar.update(len(g))
        x_star.append(hs[0])
    bar.close()
    return x_p, torch.cat(x_star)


def bits_per_dim(model: BiHM, log_p: float, prefix: str = "") -> dict[str, float]:
    """{prefix + "bpd": ...} for a Gaussian visible layer on dequantized [0, 1) data, else {}.

    x = (k + u) / 256 with k the 0..255 intensity, so a density on the 0..255 scale is
    p(x) / 256 per pixel: bits/dim = (-log p(x) + D log 256) / (D log 2), D = n_0."""
    if model.families[0] != "gaussian":
        return {}
    D = model.layer_sizes[0]
    return {f"{prefix}bpd": (-log_p + D * math.log(256.0)) / (D * math.log(2.0))}


def evaluation_table(
    sums: dict[str, float], Ks: Sequence[int], two_log_z: float, two_log_z_sem: float
) -> dict[str, Any]:
    """{"log_p" | "log_ptilde_star" | "log_pstar": {K: {"mean", "sem"}}} from reduced sums
    named `log_p@K` and `log_ptilde_star@K` (see `Sums.add_moments`)."""
    table: dict[str, Any] = {"log_p": {}, "log_ptilde_star": {}, "log_pstar": {}}
    for K in Ks:
        lp, lp_sem = moments_mean_and_sem(sums, f"log_p@{K}")
        lpt, lpt_sem = moments_mean_and_sem(sums, f"log_ptilde_star@{K}")
        table["log_p"][str(K)] = {"mean": lp, "sem": lp_sem}
        table["log_ptilde_star"][str(K)] = {"mean": lpt, "sem": lpt_sem}
        table["log_pstar"][str(K)] = {
            "mean": lpt - two_log_z,
            "sem": log_pstar_sem(lpt_sem, two_log_z_sem),
        }
    return table


# --------------------------------------------------------------------------- across ranks
class Collectives:
    """Exact cross-rank sums and gathers through the trainer's strategy (one rank: identity).

    A mixin of the Lightning modules (`bihm.lightning.BiHMModule`,
    `bihm.eval_module.EvalModule`): it uses only `self.trainer` and its strategy's
    `reduce` and `all_gather`, so the modules run unchanged under any launcher."""

    def _rank_world(self) -> tuple[int, int]:
        if self._trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _reduce_sum(self, t: Tensor) -> Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return t
        return self.trainer.strategy.reduce(t.clone(), reduce_op="sum")

    def _log_z2(self, model: BiHM, n: int, inner: int, chunk: int, seed: int, progress: bool):
        """2 log Z (Eq. 7) and its SE: this rank's chunks, all-gathered, log-sum-exp."""
        rank, world = self._rank_world()
        part = log_z2_partial(model, n, inner, chunk, seed, rank, world, progress)
        if world > 1:
            part = self.trainer.strategy.all_gather(part)
        return combine_log_z2(part, n)

    def _show_progress(self) -> bool:
        return (
            self._trainer is not None
            and self.trainer.is_global_zero
            and self.trainer.progress_bar_callback is not None
        )
