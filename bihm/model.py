"""Bidirectional Helmholtz Machines (Bornschein, Shabanian, Fischer, Bengio, ICML 2016).

One module: the two belief nets p and q, their samplers and log-probabilities, the
training objectives (BiHM and the RWS baseline), the likelihood estimators, the label
node's classifiers q(y | x) and p*(y | x), and block Gibbs sampling from p*. Symbols
follow `bihm-math.md`:

    layers   h_0 = x, h_1, ..., h_L      (binary by default; any layer may be Gaussian)
    p        p(h_L) = Bern(sigmoid(b)),  p(h_l | h_{l+1}) = Bern(sigmoid(W^p_l h_{l+1} + c^p_l))
    q        q(h_{l+1} | h_l) = Bern(sigmoid(W^q_l h_l + c^q_l))
             (a Gaussian layer: N(b, sigma^2), N(W h + c, sigma^2), see bihm/families.py)
    p*       p*(x, h) = sqrt(p(x, h) q(x) q(h | x)) / Z,  with q(x) = p*(x)       (paper Eq. 1-3)
             p*(x) = p~*(x) / Z^2,   p~*(x) = (sum_h sqrt(p(x, h) q(h | x)))^2       (Eq. 4-5)
    d_k      log p(x, h_k) - log q(h_k | x),   h_k ~ q(h | x), k = 1..K
    w~       softmax_k(d_k / 2)   (BiHM)       softmax_k(d_k)   (RWS)
    y        optional label node (C classes, one-hot): p(y) = softmax(a),
             p(h_L | y) with pre-activation b + U y, q(y | h_{L-1}) = softmax(V h_{L-1} + e);
             observed where the label is known, sampled from q where it is missing

Every hidden layer is sampled, hence observed, so each conditional's gradient is local:
no gradient ever flows through a sample or through the importance weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bihm.atomic import atomic_path
from bihm.errors import CheckpointError, torch_load_error
from bihm.families import (
    LOG_STD_MAX,
    LOG_STD_MIN,
    LOGIT_CLAMP,
    get_family,
)
from bihm.rng import Generator, RowStreams, uniform

CHECKPOINT_FORMAT = "bihm.BiHM"
CHECKPOINT_VERSION = 1

# (x, h) pairs evaluated at once by the chunked estimators: bounds memory at any K and N;
# small enough to stay in cache (4096 ran 1.2-1.6x faster than 32768 on a 2-core CPU).
DEFAULT_CHUNK = 4096


def log_bernoulli(h: Tensor, logits: Tensor) -> Tensor:
    """sum_i log Bern(h_i; sigmoid(a_i)) = sum_i [h_i a_i - softplus(a_i)], a clamped."""
    a = logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    return (h * a - F.softplus(a)).sum(-1)


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


@dataclass
class LossOutput:
    """The surrogate to minimise and detached per-batch diagnostics (batch means)."""

    loss: Tensor
    log_p: Tensor  # log p(x) estimate with the K training samples
    log_ptilde_star: Tensor  # log p~*(x) estimate with the K training samples
    ess: Tensor  # effective sample size of the objective's own weights, in [1, K]


@dataclass
class Estimates:
    """Per-example importance-sampling estimates from one set of K samples h_k ~ q(h | x)."""

    log_p: Tensor  # log p(x)
    log_ptilde_star: Tensor  # log p~*(x)
    ess_pstar: Tensor  # ESS of w = sqrt(p(x, h) / q(h | x)), in [1, K]
    ess_p: Tensor  # ESS of w = p(x, h) / q(h | x), in [1, K]


@dataclass
class _Labels:
    """The label node in one q pass: y one-hot (*, K, C), log q(y | h_{L-1}) for every class
    (*, K, C), and 1 where y was observed rather than drawn from q (*, 1)."""

    onehot: Tensor
    log_q: Tensor
    observed: Tensor

    @property
    def log_q_y(self) -> Tensor:
        """log q(y | h_{L-1}) of the label in use, (*, K)."""
        return (self.onehot * self.log_q).sum(-1)


@dataclass
class ESS:
    """Per-example effective sample sizes, in [1, K]; divide by K for the fraction."""

    pstar: Tensor  # weights w = sqrt(p(x, h) / q(h | x))
    p: Tensor  # weights w = p(x, h) / q(h | x)


class BiHM(nn.Module):
    """A Bidirectional Helmholtz Machine with layer sizes [n_0 = |x|, n_1, ..., n_L].

    p is a top-down belief net with a learned top prior b; q is bottom-up.
    ``p_nets[l]`` maps h_{l+1} -> pre-activation of h_l; ``q_nets[l]`` maps h_l -> that of
    h_{l+1}. ``families[l]`` is layer l's family, "bernoulli" (default) or "gaussian"
    (bihm/families.py). A Gaussian layer l has a per-unit log sigma in each conditional
    that generates it: ``p_log_std_{l}`` (for l = L, the prior's) and ``q_log_std_{l}``
    (l >= 1), learned parameters or, with ``learn_std=False``, fixed buffers; both start
    at log(gaussian_std). For a Gaussian top layer, ``prior_logits`` holds the prior mean.
    """

    def __init__(
        self,
        layer_sizes: Sequence[int],
        families: Sequence[str] | None = None,
        gaussian_std: float = 1.0,
        learn_std: bool = True,
        n_classes: int = 0,
    ) -> None:
        super().__init__()
        sizes = [int(n) for n in layer_sizes]
        if len(sizes) < 2:
            raise ValueError(
                f"layer_sizes must list the visible layer and at least one latent layer, "
                f"got {list(layer_sizes)!r}"
            )
        if any(n < 1 for n in sizes):
            raise ValueError(f"layer_sizes must be positive integers, got {sizes!r}")
        names = ["bernoulli"] * len(sizes) if families is None else [str(f) for f in families]
        if len(names) != len(sizes):
            raise ValueError(
                f"families must name one family per layer ({len(sizes)}), got {list(names)!r}"
            )
        if not (isinstance(gaussian_std, int | float) and 0 < gaussian_std < math.inf):
            raise ValueError(f"gaussian_std must be a positive number, got {gaussian_std!r}")
        self.layer_sizes: list[int] = sizes
        self.families: list[str] = names
        self._fams = [get_family(name) for name in names]
        self.gaussian_std, self.learn_std = float(gaussian_std), bool(learn_std)
        self.prior_logits = nn.Parameter(torch.empty(sizes[-1]))  # b: p(h_L)
        self.p_nets = nn.ModuleList(nn.Linear(sizes[l + 1], sizes[l]) for l in range(self.n_latent))
        self.q_nets = nn.ModuleList(nn.Linear(sizes[l], sizes[l + 1]) for l in range(self.n_latent))
        for l, fam in enumerate(self._fams):
            if fam.has_std:
                sides = ("p", "q") if l > 0 else ("p",)  # q(x) is not modelled
                for side in sides:
                    value = torch.empty(sizes[l])
                    if self.learn_std:
                        self.register_parameter(f"{side}_log_std_{l}", nn.Parameter(value))
                    else:
                        self.register_buffer(f"{side}_log_std_{l}", value)
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 0:
            raise ValueError(f"n_classes must be an integer >= 0, got {n_classes!r}")
        self.n_classes = n_classes
        if n_classes:
            # The label node y (one-hot, C classes) joins the top of both nets:
            # p(y) = softmax(label_logits), p(h_L | y) has pre-activation b + U y;
            # q(y | h_{L-1}) = softmax(q_label(h_{L-1})), beside q(h_L | h_{L-1}).
            self.label_logits = nn.Parameter(torch.empty(n_classes))
            self.label_prior = nn.Parameter(torch.empty(sizes[-1], n_classes))  # U
            self.q_label = nn.Linear(sizes[-2], n_classes)
        self.reset_parameters()

    def weight_matrices(self) -> list[nn.Parameter]:
        """The weight matrices W^p_l and W^q_l of the two nets: what an L1/L2 penalty acts
        on. Not the biases c_l, the top prior b, the label node or a Gaussian layer's log
        sigmas, whose scale carries no notion of "simpler"."""
        return [net.weight for net in [*self.p_nets, *self.q_nets]]

    @property
    def n_latent(self) -> int:
        """L, the number of latent layers."""
        return len(self.layer_sizes) - 1

    def reset_parameters(self) -> None:
        """The authors' init: W ~ U(+-sqrt(6) / sqrt(n_in + n_out) / n_in), all biases -1.

        This is Glorot scaled down by the fan-in, far smaller than plain Glorot; with
        biases -1 every unit starts mostly off (one of the port's differences, #2).
        """
        nn.init.constant_(self.prior_logits, -1.0)
        for net in [*self.p_nets, *self.q_nets]:
            n_out, n_in = net.weight.shape
            bound = math.sqrt(6.0) / math.sqrt(n_in + n_out) / n_in
            nn.init.uniform_(net.weight, -bound, bound)
            nn.init.constant_(net.bias, -1.0)
        if self.n_classes:  # uniform p(y), y not yet used by p(h_L | y); q_label as q_nets
            nn.init.zeros_(self.label_logits)
            nn.init.zeros_(self.label_prior)
            n_out, n_in = self.q_label.weight.shape
            bound = math.sqrt(6.0) / math.sqrt(n_in + n_out) / n_in
            nn.init.uniform_(self.q_label.weight, -bound, bound)
            nn.init.zeros_(self.q_label.bias)
        # A Gaussian layer's means start at 0 (-1 is a Bernoulli "mostly off"), its log
        # sigmas at log(gaussian_std).
        for l, fam in enumerate(self._fams):
            if not fam.has_std:
                continue
            nn.init.zeros_(self.prior_logits if l == self.n_latent else self.p_nets[l].bias)
            if l > 0:
                nn.init.zeros_(self.q_nets[l - 1].bias)
            for side in ("p", "q"):
                if hasattr(self, f"{side}_log_std_{l}"):
                    with torch.no_grad():
                        getattr(self, f"{side}_log_std_{l}").fill_(math.log(self.gaussian_std))

    def _log_stds(self, side: str) -> list[Tensor | None]:
        """Clamped log sigma of every layer's `side` ("p" or "q") conditional; None for a
        Bernoulli layer (and for q's layer 0, which q does not model)."""
        return [
            getattr(self, f"{side}_log_std_{l}").clamp(LOG_STD_MIN, LOG_STD_MAX)
            if fam.has_std and (side == "p" or l > 0)
            else None
            for l, fam in enumerate(self._fams)
        ]

    # ------------------------------------------------------------------ checks
    def _check_x(self, x: Tensor, name: str = "x") -> None:
        if x.shape[-1] != self.layer_sizes[0]:
            raise ValueError(
                f"{name} must have last dimension {self.layer_sizes[0]} (the visible layer), "
                f"got shape {tuple(x.shape)}"
            )
        if self._fams[0].has_std:
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} must be finite (the visible layer is Gaussian)")
        elif not bool(((x == 0) | (x == 1)).all()):
            raise ValueError(f"{name} must be binary (every value 0 or 1)")

    @staticmethod
    def _check_positive(value: int, name: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def _check_hs(self, hs: Sequence[Tensor]) -> None:
        if len(hs) != len(self.layer_sizes):
            raise ValueError(f"hs must hold {len(self.layer_sizes)} layers, got {len(hs)}")
        for l, (h, n) in enumerate(zip(hs, self.layer_sizes, strict=True)):
            if h.shape[-1] != n:
                raise ValueError(f"hs[{l}] must have last dimension {n}, got {tuple(h.shape)}")

    @property
    def _device(self) -> torch.device:
        return self.prior_logits.device

    @property
    def _dtype(self) -> torch.dtype:
        return self.prior_logits.dtype

    def _own(self, t: Tensor) -> Tensor:
        """t in the model's dtype: a product that bf16 autocast ran in bf16 goes on in fp32
        (or float64 for a float64 model); a no-op without autocast."""
        return t.to(self._dtype)

    # ------------------------------------------------------------------ sampling
    def _q_pass(
        self, x: Tensor, K: int, generator: Generator = None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
        """h_k ~ q(h | x) bottom-up: returns hs ([x, h_1, .., h_L], each (*, K, n_l)), the
        q pre-activations a of h_1 .. h_L (clamped logits, or Gaussian means) and their
        family's stats (sigmoid(a) for Bernoulli, None for Gaussian). Layer 1's depend on x
        alone, so they are computed once per example, shape (*, 1, n_1), and shared by the
        K samples: that saves the largest matmul of q (and of its gradient) K - 1 times."""
        x = x.to(self._dtype)
        fams, log_stds = self._fams, self._log_stds("q")
        # _own(): under bf16 autocast (train.precision bf16-mixed) only the matmuls run in
        # bf16; pre-activations and everything after them are in the model's dtype (fp32).
        # Without autocast it is a no-op.
        a = fams[1].finish(self._own(self.q_nets[0](x)), inplace=True).unsqueeze(-2)
        stats = fams[1].stats(a)
        h = fams[1].sample(a, log_stds[1], (*x.shape[:-1], K, a.shape[-1]), generator, stats)
        hs = [x.unsqueeze(-2).expand(*x.shape[:-1], K, x.shape[-1]), h]
        q_a, q_stats = [a], [stats]
        for l, net in enumerate(self.q_nets[1:], start=2):
            a = fams[l].finish(self._own(net(h)), inplace=True)
            stats = fams[l].stats(a)
            h = fams[l].sample(a, log_stds[l], a.shape, generator, stats)
            hs.append(h)
            q_a.append(a)
            q_stats.append(stats)
        return hs, q_a, q_stats

    def _p_logits(self, hs: Sequence[Tensor], y: Tensor | None = None) -> list[Tensor]:
        """p pre-activations (clamped logits, or Gaussian means) of h_0 .. h_{L-1} given the
        layer above, then the prior's of h_L (b, or b + U y with a label node; y one-hot)."""
        fams = self._fams
        a = [
            fams[l].finish(self._own(net(hs[l + 1])), inplace=True)  # _own(): see _q_pass
            for l, net in enumerate(self.p_nets)
        ]
        return [*a, fams[-1].finish(self._top_pre(y))]

    def _top_pre(self, y: Tensor | None) -> Tensor:
        """The top prior's pre-activation: b, or b + U y for a one-hot label y."""
        if not self.n_classes:
            return self.prior_logits
        return self.prior_logits + self._own(y @ self.label_prior.T)

    def _q_label(self, h_below: Tensor, y: Tensor | None, generator: Generator) -> _Labels:
        """y for the label node: observed where y >= 0, else y ~ q(y | h_{L-1}) (drawn for
        every row, so the random streams do not depend on which labels are known).
        h_below (*, K, n_{L-1}); y (*,) class indices, -1 = missing, or None."""
        log_q = torch.log_softmax(self._own(self.q_label(h_below)), -1)  # (*, K, C)
        cdf = log_q.exp().cumsum(-1)
        u = uniform((*cdf.shape[:-1], 1), generator, cdf.device, cdf.dtype)
        drawn = (cdf < u * cdf[..., -1:]).sum(-1).clamp_(max=self.n_classes - 1)
        if y is None:
            observed = torch.zeros(drawn.shape[:-1] + (1,), device=cdf.device, dtype=cdf.dtype)
        else:
            y = y.to(cdf.device)
            observed = (y >= 0).to(cdf.dtype).unsqueeze(-1)  # (*, 1)
            drawn = torch.where(y.unsqueeze(-1) >= 0, y.clamp(min=0).unsqueeze(-1), drawn)
        onehot = F.one_hot(drawn, self.n_classes).to(cdf.dtype)
        return _Labels(onehot, log_q, observed)

    def _log_p_y(self, y: Tensor) -> Tensor:
        """log p(y) for one-hot y."""
        return (y * torch.log_softmax(self.label_logits, -1)).sum(-1)

    def sample_q(self, x: Tensor, K: int, generator: Generator = None) -> list[Tensor]:
        """[h_0 = x, h_1, ..., h_L] with h ~ q(h | x); x (*, n_0) -> each (*, K, n_l)."""
        self._check_positive(K, "K")
        self._check_x(x)
        with torch.no_grad():
            return self._q_pass(x, K, generator)[0]

    def _sample_p(
        self, n: int, generator: Generator = None
    ) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """(x, h[, y]) ~ p, top-down, and log p(x, h[, y]), reusing the sampling logits.
        The label y (one-hot, (n, C); None without a label node) is drawn first."""
        fams, log_stds, L = self._fams, self._log_stds("p"), self.n_latent
        y, log_p_y = None, 0.0
        if self.n_classes:
            cdf = torch.softmax(self.label_logits, -1).cumsum(-1).expand(n, -1)
            u = uniform((n, 1), generator, cdf.device, cdf.dtype)
            idx = (cdf < u * cdf[:, -1:]).sum(-1).clamp_(max=self.n_classes - 1)
            y = F.one_hot(idx, self.n_classes).to(cdf.dtype)
            log_p_y = self._log_p_y(y)
        a = fams[L].finish(self._top_pre(y)).expand(n, -1)
        h = fams[L].sample(a, log_stds[L], a.shape, generator)
        hs, log_p = [h], fams[L].log_prob(h, a, log_stds[L]) + log_p_y
        for l in range(L - 1, -1, -1):
            a = fams[l].finish(self.p_nets[l](h), inplace=True)
            h = fams[l].sample(a, log_stds[l], a.shape, generator)
            log_p = log_p + fams[l].log_prob(h, a, log_stds[l])
            hs.append(h)
        return hs[::-1], log_p, y

    def sample_p(self, n: int, generator: Generator = None) -> list[Tensor]:
        """[x, h_1, ..., h_L] ~ p(x, h) by ancestral sampling, each of shape (n, n_l)."""
        self._check_positive(n, "n")
        with torch.no_grad():
            return self._sample_p(n, generator)[0]

    # ------------------------------------------------------------------ log-probabilities
    def log_p(self, hs: Sequence[Tensor], y: Tensor | None = None) -> Tensor:
        """log p(x, h) = log p(h_L) + sum_{l=0}^{L-1} log p(h_l | h_{l+1}); with a label
        node, log p(x, h, y) = log p(y) + log p(h_L | y) + ..., y one-hot (*, C)."""
        self._check_hs(hs)
        y = self._check_onehot(y)
        fams, log_stds = self._fams, self._log_stds("p")
        log_p = fams[-1].log_prob(hs[-1], fams[-1].finish(self._top_pre(y)), log_stds[-1])
        if y is not None:
            log_p = log_p + self._log_p_y(y)
        for l, net in enumerate(self.p_nets):
            log_p = log_p + fams[l].log_prob(hs[l], fams[l].finish(net(hs[l + 1])), log_stds[l])
        return log_p

    def log_q(self, hs: Sequence[Tensor], y: Tensor | None = None) -> Tensor:
        """log q(h | x) = sum_{l=0}^{L-1} log q(h_{l+1} | h_l); q(x) is not modelled.
        With y (one-hot, label node): log q(h, y | x), adding log q(y | h_{L-1}); without,
        a label node's log q(h | x) alone."""
        self._check_hs(hs)
        fams, log_stds = self._fams, self._log_stds("q")
        log_q = torch.zeros(hs[0].shape[:-1], device=hs[0].device, dtype=hs[0].dtype)
        for l, net in enumerate(self.q_nets, start=1):
            log_q = log_q + fams[l].log_prob(hs[l], fams[l].finish(net(hs[l - 1])), log_stds[l])
        if y is not None:
            y = self._check_onehot(y)
            log_q = log_q + (y * torch.log_softmax(self.q_label(hs[-2]), -1)).sum(-1)
        return log_q

    def _check_onehot(self, y: Tensor | None) -> Tensor | None:
        if y is None:
            if self.n_classes:
                raise ValueError("y (one-hot labels) is required: the model has a label node")
            return None
        if not self.n_classes:
            raise ValueError("y given, but the model has no label node (n_classes = 0)")
        if y.shape[-1] != self.n_classes:
            raise ValueError(f"y must be one-hot of {self.n_classes} classes, got {tuple(y.shape)}")
        return y

    def _check_y(self, y: Tensor | None, x: Tensor) -> None:
        """y: class indices of x's leading shape, -1 = missing; only with a label node."""
        if y is None:
            return
        if not self.n_classes:
            raise ValueError("y given, but the model has no label node (n_classes = 0)")
        if y.shape != x.shape[:-1] or y.dtype.is_floating_point:
            raise ValueError(f"y must be integer labels of shape {tuple(x.shape[:-1])}")
        if bool(((y < -1) | (y >= self.n_classes)).any()):
            raise ValueError(f"labels must be in 0..{self.n_classes - 1}, or -1 where missing")

    def _log_weights(
        self, x: Tensor, K: int, generator: Generator = None, y: Tensor | None = None
    ) -> Tensor:
        """d_k = log p(x, h_k) - log q(h_k | x) for h_k ~ q(h | x); shape (*, K).

        With a label node, y is part of the sample where it is missing (y_k ~ q(y | h_{L-1}),
        d_k = log p(x, h_k, y_k) - log q(h_k, y_k | x)) and observed where given
        (d_k = log p(x, h_k, y) - log q(h_k | x)): the estimates are of log p(x) or log p(x, y).
        """
        hs, q_logits, _ = self._q_pass(x, K, generator)
        lab = self._q_label(hs[-2], y, generator) if self.n_classes else None
        p_logits = self._p_logits(hs, None if lab is None else lab.onehot)
        log_p, log_q = self._log_p_and_log_q(hs, p_logits, q_logits, lab)
        return log_p - log_q

    def _log_p_and_log_q(
        self,
        hs: Sequence[Tensor],
        p_a: Sequence[Tensor],
        q_a: Sequence[Tensor],
        lab: _Labels | None = None,
    ) -> tuple[Tensor, Tensor]:
        """log p(x, h[, y]) and log q(h[, y] | x) from every layer's finished
        pre-activations; an observed label is in p only, a sampled one in both."""
        fams, p_s, q_s = self._fams, self._log_stds("p"), self._log_stds("q")
        log_p = sum(fams[l].log_prob(hs[l], p_a[l], p_s[l]) for l in range(len(hs)))
        log_q = sum(fams[l].log_prob(hs[l], q_a[l - 1], q_s[l]) for l in range(1, len(hs)))
        if lab is not None:
            log_p = log_p + self._log_p_y(lab.onehot)
            log_q = log_q + (1 - lab.observed) * lab.log_q_y
        return log_p, log_q

    # ------------------------------------------------------------------ training objective
    def loss(
        self,
        x: Tensor,
        K: int = 10,
        objective: str = "bihm",
        generator: Generator = None,
        y: Tensor | None = None,
    ) -> LossOutput:
        """Surrogate whose gradient is the paper's Algorithm 1 (or RWS), batch-averaged.

        With h_k ~ q(h | x) and log w_k = d_k / 2 (BiHM) or d_k (RWS), w~ = softmax_k(log w):

            BiHM:  p ascends sum_k w~_k grad log p(x, h_k),
                   q ascends sum_k (w~_k - 1/K) grad log q(h_k | x)
            RWS:   p ascends sum_k w~_k grad log p(x, h_k),
                   q ascends sum_k w~_k grad log q(h_k | x)    (wake-phase q update)

        For BiHM both are consistent estimators of grad log p~*(x): the -1/K is a
        zero-mean control variate (E_q grad log q = 0) that cuts the variance of q's
        gradient (port difference #4). w~ and the samples carry no gradient.

        With a label node, y (*,) holds class indices, -1 where missing (semi-supervised).
        A missing label is sampled, y_k ~ q(y | h_{L-1}), and is part of q's sample as
        above. A known label is observed: the weights are those of p~*(x, y), and
        q(y | h_{L-1}) ascends sum_k w~_k grad log q(y | h_{L-1,k}), the wake-phase update
        with the data's label as the posterior sample.
        """
        self._check_positive(K, "K")
        self._check_x(x)
        if objective not in ("bihm", "rws"):
            raise ValueError(f"objective must be 'bihm' or 'rws', got {objective!r}")
        want_grads = _grad_wanted(self)  # False in validation (no_grad) and for frozen models
        self._check_y(y, x)
        with torch.no_grad():
            surrogate, d, log_w, grads = self._loss_core(
                x, K, objective == "bihm", want_grads, generator, y
            )
        loss = -surrogate
        if grads is not None:
            loss = _LocalGradients.apply(loss, grads, *self.parameters())
        return LossOutput(
            loss=loss,
            log_p=log_mean_exp(d).mean(),
            log_ptilde_star=(2 * log_mean_exp(d / 2)).mean(),
            ess=ess_from_log_weights(log_w).mean(),
        )

    def _loss_core(
        self,
        x: Tensor,
        K: int,
        bihm: bool,
        want_grads: bool,
        generator: Generator = None,
        y: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor] | None]:
        """The training step's arithmetic, without autograd: the batch-mean surrogate, d,
        log w and (if wanted) the parameter gradients of -surrogate."""
        hs, q_logits, q_probs = self._q_pass(x, K, generator)
        lab = self._q_label(hs[-2], y, generator) if self.n_classes else None
        p_logits = self._p_logits(hs, None if lab is None else lab.onehot)
        log_p, log_q = self._log_p_and_log_q(hs, p_logits, q_logits, lab)
        d = log_p - log_q
        log_w = d / 2 if bihm else d
        w_tilde = torch.softmax(log_w, dim=-1)
        q_coef = w_tilde - 1.0 / K if bihm else w_tilde
        surrogate = (w_tilde * log_p).sum(-1) + (q_coef * log_q).sum(-1)
        if lab is not None:  # the wake update of q(y | h_{L-1}) for observed labels
            surrogate = surrogate + (w_tilde * lab.observed * lab.log_q_y).sum(-1)
        surrogate = surrogate.mean()
        grads = None
        if want_grads:
            n_examples = w_tilde.numel() // K
            grads = self._manual_grads(
                hs, p_logits, q_logits, q_probs, w_tilde, q_coef, n_examples, lab
            )
        return surrogate, d, log_w, grads

    def _manual_grads(
        self,
        hs: list[Tensor],
        p_logits: list[Tensor],
        q_logits: list[Tensor],
        q_probs: list[Tensor],
        p_coef: Tensor,
        q_coef: Tensor,
        n_examples: int,
        lab: _Labels | None = None,
    ) -> list[Tensor]:
        """Gradients of the loss -(1/B) sum [p_coef log p(x, h) + q_coef log q(h | x)].

        Every layer is observed, so each conditional's gradient is local: for a layer with
        samples h, pre-activation a = W h_in + c and coefficient c_k per sample,
            d/da  = c_k (h - sigmoid(a))     Bernoulli (0 where the clamp is active, as
                                             for the authors' clipped sigmoid)
                  = c_k (h - a) / sigma^2    Gaussian, and for its log sigma
            d/dlog sigma = sum_samples c_k ((h - a)^2 / sigma^2 - 1)   (0 where clamped)
            d/dW  = sum_samples (d/da) h_in^T,   d/dc = sum_samples d/da.
        The label node's softmaxes likewise: d/d logits = c_k (onehot(y) - softmax), with
        c_k = w~_k for p(y), and for q(y | h_{L-1}) q's coefficient where y was sampled,
        w~_k where it was observed; U (in b + U y) gets (d/da_L) y^T.
        One matmul per weight, no backward through activations, no autograd graph.
        """
        scale = -1.0 / n_examples
        pc, qc = (p_coef * scale).unsqueeze(-1), (q_coef * scale).unsqueeze(-1)
        fams, L = self._fams, self.n_latent
        p_s, q_s = self._log_stds("p"), self._log_stds("q")
        grads: dict[str, Tensor] = {}

        def log_std_grad(name: str, g_elem: Tensor) -> None:
            raw = getattr(self, name)
            if isinstance(raw, nn.Parameter):
                g = _flat(g_elem).sum(0)
                grads[name] = torch.ops.aten.hardtanh_backward(g, raw, LOG_STD_MIN, LOG_STD_MAX)

        # Prior p(h_L): its pre-activation is the bias b itself.
        g, g_s = fams[L].grad(hs[L], p_logits[L], p_s[L], pc)
        grads["prior_logits"] = _flat(g).sum(0)
        if g_s is not None:
            log_std_grad(f"p_log_std_{L}", g_s)
        if lab is not None:
            grads["label_prior"] = self._own(_flat(g).T @ _flat(lab.onehot))
            p_y = torch.softmax(self.label_logits, -1)
            grads["label_logits"] = _flat(pc * (lab.onehot - p_y)).sum(0)
            y_coef = qc * (1 - lab.observed.unsqueeze(-1)) + pc * lab.observed.unsqueeze(-1)
            g = _flat(y_coef * (lab.onehot - lab.log_q.exp()))
            grads["q_label.weight"] = self._own(g.T @ _flat(hs[L - 1]))
            grads["q_label.bias"] = g.sum(0)
        for l in range(L):
            g, g_s = fams[l].grad(hs[l], p_logits[l], p_s[l], pc)
            g = _flat(g)
            # _own(): under bf16 autocast the product runs in bf16 (g rounded, h exact).
            grads[f"p_nets.{l}.weight"] = self._own(g.T @ _flat(hs[l + 1]))
            grads[f"p_nets.{l}.bias"] = g.sum(0)
            if g_s is not None:
                log_std_grad(f"p_log_std_{l}", g_s)
        for l in range(L):
            g, g_s = fams[l + 1].grad(hs[l + 1], q_logits[l], q_s[l + 1], qc, q_probs[l])
            h_in = hs[l]
            if l == 0:  # layer 1's logits are shared by the K samples: sum over k first
                g, h_in = g.sum(-2), h_in[..., 0, :]
            g = _flat(g)
            grads[f"q_nets.{l}.weight"] = self._own(g.T @ _flat(h_in))
            grads[f"q_nets.{l}.bias"] = g.sum(0)
            if g_s is not None:
                log_std_grad(f"q_log_std_{l + 1}", g_s)
        return [grads[name] for name, _ in self.named_parameters()]

    # ------------------------------------------------------------------ estimators
    @torch.no_grad()
    def _chunked(self, x: Tensor, K: int, chunk: int, generator: Generator, fn, y=None):
        """Yield (first row, fn(x rows, k, generator, y rows)) covering all (example, k)
        pairs of x in chunks of at most `chunk` pairs."""
        x = x.reshape(-1, x.shape[-1])
        y = None if y is None else y.reshape(-1)
        k_chunk = max(1, min(K, chunk))
        rows = max(1, chunk // k_chunk)
        for start in range(0, x.shape[0], rows):
            xb = x[start : start + rows]
            yb = None if y is None else y[start : start + rows]
            # Per-row streams continue in the same order (chunk by chunk over K) whatever
            # the number of rows per chunk, so a row's samples do not depend on the batch.
            g = generator[start : start + rows] if isinstance(generator, RowStreams) else generator
            for k0 in range(0, K, k_chunk):
                yield start, fn(xb, min(k_chunk, K - k0), g, yb)

    @torch.no_grad()
    def log_likelihood(
        self,
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
        est = self.estimates(x, K, chunk, generator)
        return est.log_p.to(self._dtype), est.log_ptilde_star.to(self._dtype)

    @torch.no_grad()
    def estimates(
        self,
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
        self._check_positive(K, "K")
        self._check_positive(chunk, "chunk")
        self._check_x(x)
        self._check_y(y, x)
        lead = x.shape[:-1]
        n = math.prod(lead)
        # S_{1/2}, S_1, S_2 accumulated over the chunks of K by log-sum-exp, in float64:
        # the ESS exponent 2 S_a - S_2a is a few nats left of numbers the size of
        # log p(x, h) (hundreds of nats), so rounding S to float32 would move the ESS by up
        # to 1.5 ulps of |S| (relative 5e-5 at |S| ~ 500), and by a different rounding for
        # each batch shape's reduction kernel. d itself stays in the model's dtype.
        lse = torch.full((3, n), -math.inf, device=self._device, dtype=torch.float64)
        for start, d in self._chunked(x, K, chunk, generator, self._log_weights, y):
            rows = slice(start, start + d.shape[0])
            d = d.double()
            part = torch.stack([torch.logsumexp(a * d, -1) for a in (0.5, 1.0, 2.0)])
            lse[:, rows] = torch.logaddexp(lse[:, rows], part)
        half, one, two = lse
        return Estimates(
            log_p=(one - math.log(K)).reshape(lead),
            log_ptilde_star=(2 * (half - math.log(K))).reshape(lead),
            ess_pstar=torch.exp(2 * half - one).reshape(lead),
            ess_p=torch.exp(2 * one - two).reshape(lead),
        )

    @torch.no_grad()
    def classify(
        self, x: Tensor, K: int, chunk: int = DEFAULT_CHUNK, generator: Generator = None
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
        if not self.n_classes:
            raise ValueError("classify needs a label node (n_classes > 0)")
        self._check_positive(K, "K")
        self._check_positive(chunk, "chunk")
        self._check_x(x)
        x = x.reshape(-1, x.shape[-1])
        lse = torch.full((x.shape[0], 2, self.n_classes), -math.inf, device=x.device)
        lse = lse.to(self._dtype)
        for start, part in self._chunked(x, K, chunk, generator, self._class_scores):
            rows = slice(start, start + part.shape[0])
            lse[rows] = torch.logaddexp(lse[rows], part)
        return lse[:, 1] - math.log(K), torch.log_softmax(lse[:, 0], -1)

    def _class_scores(self, x: Tensor, K: int, generator: Generator, _y=None) -> Tensor:
        """For `classify`: logsumexp over these K samples of the p* score and of
        log q(y | h_{L-1}), per class; (rows, 2, C)."""
        fams, p_s, q_s, L = self._fams, self._log_stds("p"), self._log_stds("q"), self.n_latent
        hs, q_a, _ = self._q_pass(x, K, generator)
        log_q_h = sum(fams[l].log_prob(hs[l], q_a[l - 1], q_s[l]) for l in range(1, L + 1))
        log_p = sum(
            fams[l].log_prob(hs[l], fams[l].finish(self.p_nets[l](hs[l + 1])), p_s[l])
            for l in range(L)
        )
        top_a = fams[L].finish(self.prior_logits + self.label_prior.T)  # (C, n_L): b + U y
        log_top = fams[L].log_prob(hs[L].unsqueeze(-2), top_a, p_s[L])  # (rows, K, C)
        log_top = log_top + torch.log_softmax(self.label_logits, -1)
        log_q_y = torch.log_softmax(self.q_label(hs[L - 1]), -1)
        score = 0.5 * ((log_p - log_q_h).unsqueeze(-1) + log_top + log_q_y)
        return torch.stack([torch.logsumexp(score, 1), torch.logsumexp(log_q_y, 1)], 1)

    @torch.no_grad()
    def log_z2_terms(self, n: int, inner: int = 10, generator: Generator = None) -> Tensor:
        """The n outer terms of the paper's Eq. 7 estimator of Z^2, in log space:

            (x, h) ~ p(x, h),  h'_m ~ q(h | x), m = 1..M (M = inner)
            term = sqrt(q(h | x) / p(x, h)) * (1/M) sum_m sqrt(p(x, h'_m) / q(h'_m | x))

        E[term] = Z^2 exactly, since E_{h'~q} sqrt(p/q) = sqrt(p~*(x)). Returns log term, (n,).
        """
        self._check_positive(n, "n")
        self._check_positive(inner, "inner")
        hs, log_p, y = self._sample_p(n, generator)
        log_q = self.log_q(hs, y)
        d_inner = self._log_weights(hs[0], inner, generator)  # (n, M)
        return 0.5 * (log_q - log_p) + log_mean_exp(d_inner / 2)

    @torch.no_grad()
    def estimate_log_z2(
        self,
        n: int,
        inner: int = 10,
        chunk: int = DEFAULT_CHUNK,
        generator: Generator = None,
    ) -> tuple[float, float]:
        """2 log Z ~ logsumexp_n(term_n) - log N (Eq. 7), and its delta-method standard error.

        Biased low for small N (Jensen): report N with it. The authors used N = 10^6,
        M = 10. Chunked over N, so memory stays bounded.
        """
        self._check_positive(n, "n")
        self._check_positive(chunk, "chunk")
        outer_chunk = max(1, chunk // (inner + 1))
        lse_w = lse_w2 = -math.inf
        for start in range(0, n, outer_chunk):
            terms = self.log_z2_terms(min(outer_chunk, n - start), inner, generator).double()
            lse_w = float(torch.logaddexp(torch.tensor(lse_w), torch.logsumexp(terms, 0)))
            lse_w2 = float(torch.logaddexp(torch.tensor(lse_w2), torch.logsumexp(2 * terms, 0)))
        return log_mean_and_sem(lse_w, lse_w2, n)

    @torch.no_grad()
    def ess(self, x: Tensor, K: int, generator: Generator = None) -> ESS:
        """Effective sample sizes (sum w)^2 / sum w^2 of K samples h_k ~ q(h | x), per example,
        for the p* weights w = sqrt(p/q) and the p weights w = p/q. A BiHM's q matches
        p*'s posterior far better than p's, so ESS_pstar >> ESS_p (paper, Sec. 4)."""
        self._check_positive(K, "K")
        self._check_x(x)
        d = self._log_weights(x, K, generator)
        return ESS(pstar=ess_from_log_weights(d / 2), p=ess_from_log_weights(d))

    # ------------------------------------------------------------------ sampling from p*
    def _gibbs_update_latent(
        self, hs: list[Tensor], l: int, S: int, generator: Generator
    ) -> Tensor:
        """New h_l given its neighbours, by importance resampling over 2S + 1 candidates.

        Target t(h_l) = sqrt(p(h_l | h_{l+1}) p(h_{l-1} | h_l) q(h_l | h_{l-1}) q(h_{l+1} | h_l))
        (the top layer has p(h_L) and no h_{L+1} terms). Candidates: S draws from
        p(h_l | h_{l+1}), S from q(h_l | h_{l-1}), and the current h_l; weight
        t(h) / (p(h | .) + q(h | .)). Keeping the current state among the candidates
        (iterated SIR) makes the kernel leave p* invariant for any S.
        For a Gaussian layer the same holds with densities: the proposal density is the
        mixture (p + q) / 2 and the current state is again one of the candidates.
        """
        C, top = hs[0].shape[0], l == self.n_latent
        fams, p_s, q_s = self._fams, self._log_stds("p"), self._log_stds("q")
        fam = fams[l]
        p_pre = self.prior_logits.expand(C, -1) if top else self.p_nets[l](hs[l + 1])
        p_a = fam.finish(p_pre).unsqueeze(1)
        q_a = fam.finish(self.q_nets[l - 1](hs[l - 1])).unsqueeze(1)
        shape = (C, S, self.layer_sizes[l])
        proposals = torch.cat(
            [
                fam.sample(p_a, p_s[l], shape, generator),
                fam.sample(q_a, q_s[l], shape, generator),
                hs[l].unsqueeze(1),
            ],
            dim=1,
        )  # (C, 2S + 1, n_l)
        log_p_l = fam.log_prob(proposals, p_a, p_s[l])
        log_q_l = fam.log_prob(proposals, q_a, q_s[l])
        log_t = log_p_l + log_q_l
        # p(h_{l-1} | h_l)
        below = fams[l - 1]
        a = below.finish(self.p_nets[l - 1](proposals), inplace=True)
        log_t = log_t + below.log_prob(hs[l - 1].unsqueeze(1), a, p_s[l - 1])
        if not top:  # q(h_{l+1} | h_l)
            above = fams[l + 1]
            a = above.finish(self.q_nets[l](proposals), inplace=True)
            log_t = log_t + above.log_prob(hs[l + 1].unsqueeze(1), a, q_s[l + 1])
        log_weight = 0.5 * log_t - torch.logaddexp(log_p_l, log_q_l)
        return _pick(proposals, log_weight, generator)

    def _gibbs_update_visible(
        self,
        hs: list[Tensor],
        S: int,
        inner: int,
        x_observed: Tensor | None,
        mask: Tensor | None,
        generator: Generator,
    ) -> Tensor:
        """New x given h_1, by importance resampling over S + 1 candidates.

        Target sqrt(p(x | h_1) q(x) q(h_1 | x)) with q(x) = p*(x) replaced by its
        estimate p~*(x) (= Z^2 p*(x); the constant cancels) from `inner` q-samples.
        Proposals x ~ p(x | h_1) have weight sqrt(q(x) q(h_1 | x) / p(x | h_1)). With a
        mask (1 = observed), only the free pixels are proposed: the weight's p term is
        then p(x_free | h_1), as p(x_observed | h_1) is the same for every candidate.
        """
        C, fam = hs[0].shape[0], self._fams[0]
        log_std = self._log_stds("p")[0]
        p_logits = fam.finish(self.p_nets[0](hs[1])).unsqueeze(1)  # (C, 1, n_0)
        proposals = fam.sample(p_logits, log_std, (C, S, self.layer_sizes[0]), generator)
        proposals = torch.cat([proposals, hs[0].unsqueeze(1)], dim=1)  # (C, S + 1, n_0)
        free = torch.ones_like(proposals[:1, :1]) if mask is None else 1 - mask.unsqueeze(1)
        if x_observed is not None:
            proposals = free * proposals + (1 - free) * x_observed.unsqueeze(1)
        log_p_free = fam.log_prob_masked(proposals, p_logits, log_std, free)
        fam1 = self._fams[1]
        a = fam1.finish(self.q_nets[0](proposals), inplace=True)
        log_q_h1 = fam1.log_prob(hs[1].unsqueeze(1), a, self._log_stds("q")[1])
        d = self._log_weights(proposals, inner, generator)
        log_ptilde_star = 2 * log_mean_exp(d / 2)
        log_weight = 0.5 * (log_ptilde_star + log_q_h1 - log_p_free)
        return _pick(proposals, log_weight, generator)

    @torch.no_grad()
    def gibbs_step(
        self,
        hs: Sequence[Tensor],
        proposals: int = 1000,
        inner: int = 10,
        x_observed: Tensor | None = None,
        mask: Tensor | None = None,
        generator: Generator = None,
    ) -> list[Tensor]:
        """One block Gibbs sweep on p*(x, h): all odd layers, then all even layers.

        Layers of one parity are conditionally independent given the others (each
        conditional involves only h_{l-1} and h_{l+1}). Chains are the rows of hs,
        each of shape (C, n_l). With `mask` (1 = observed) the observed pixels of x stay
        equal to `x_observed` (inpainting).
        """
        if self.n_classes:
            raise ValueError("Gibbs sampling with a label node is not implemented")
        hs = list(hs)
        for parity in (1, 0):
            for l in range(parity, self.n_latent + 1, 2):
                if l == 0:
                    hs[0] = self._gibbs_update_visible(
                        hs, proposals, inner, x_observed, mask, generator
                    )
                else:
                    hs[l] = self._gibbs_update_latent(hs, l, proposals, generator)
        return hs

    @torch.no_grad()
    def sample_pstar(
        self,
        n: int,
        steps: int = 250,
        proposals: int = 1000,
        inner: int = 10,
        generator: Generator = None,
    ) -> list[Tensor]:
        """n samples [x, h_1, ..., h_L] from p* by block Gibbs, started from ancestral p samples."""
        self._check_positive(n, "n")
        self._check_positive(proposals, "proposals")
        self._check_positive(inner, "inner")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps!r}")
        hs = self.sample_p(n, generator)
        for _ in range(steps):
            hs = self.gibbs_step(hs, proposals, inner, generator=generator)
        return hs

    def _check_mask(self, x: Tensor, mask: Tensor) -> None:
        if mask.shape != x.shape:
            raise ValueError(
                f"mask must have the shape of x {tuple(x.shape)}, got {tuple(mask.shape)}"
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be binary (1 = observed pixel, 0 = to fill in)")

    @torch.no_grad()
    def reconstruct(self, x: Tensor, mask: Tensor, generator: Generator = None) -> Tensor:
        """Plain q-then-p fill-in: h ~ q(h | x with the missing pixels 0), x_free ~ p(x | h_1).

        The baseline that Gibbs inpainting from p* is compared against.
        """
        self._check_x(x)
        self._check_mask(x, mask)
        mask = mask.to(self._dtype)
        h1 = self._q_pass(x * mask, 1, generator)[0][1].squeeze(-2)
        fam = self._fams[0]
        a = fam.finish(self.p_nets[0](h1), inplace=True)
        x_free = fam.sample(a, self._log_stds("p")[0], a.shape, generator)
        return mask * x + (1 - mask) * x_free

    @torch.no_grad()
    def inpaint(
        self,
        x: Tensor,
        mask: Tensor,
        steps: int = 100,
        proposals: int = 1000,
        inner: int = 10,
        generator: Generator = None,
    ) -> Tensor:
        """Fill in the pixels of x (B, n_0) where mask == 0 by Gibbs sampling from p*,
        clamping the observed ones (mask == 1). Starts from `reconstruct`. Returns x (B, n_0);
        repeat rows of x and mask to run several chains per digit."""
        self._check_positive(proposals, "proposals")
        self._check_positive(inner, "inner")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps!r}")
        x0 = self.reconstruct(x, mask, generator)
        mask = mask.to(self._dtype)
        hs = self._q_pass(x0, 1, generator)[0]
        hs = [h.squeeze(-2) for h in hs]
        for _ in range(steps):
            hs = self.gibbs_step(hs, proposals, inner, x_observed=x, mask=mask, generator=generator)
        return hs[0]

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """Write {"format", "version", "layer_sizes", "families", "gaussian_std", "learn_std",
        "n_classes", "state_dict"} with torch.save, atomically (bihm.atomic: a temporary file,
        fsync, rename; readable as the umask allows). Files without the newer keys (written
        before families and labels existed) load as all-Bernoulli models without labels."""
        path = Path(path)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "layer_sizes": list(self.layer_sizes),
            "families": list(self.families),
            "gaussian_std": self.gaussian_std,
            "learn_std": self.learn_std,
            "n_classes": self.n_classes,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> BiHM:
        """Load a file written by `save`. Tensors and plain containers only (weights_only=True)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no BiHM checkpoint at {path}")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # corrupted, not a torch file, or holding code objects
            raise torch_load_error(path, err) from None
        return cls.from_payload(payload, path).to(map_location)

    @classmethod
    def from_payload(cls, payload: object, source: str | os.PathLike = "checkpoint") -> BiHM:
        """The model from the dict that `save` writes (already read by torch.load)."""
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{source} is not a BiHM checkpoint (missing format {CHECKPOINT_FORMAT!r})"
            )
        if payload.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{source}: unsupported checkpoint version {payload.get('version')!r}, "
                f"expected {CHECKPOINT_VERSION}"
            )
        for key in ("layer_sizes", "state_dict"):
            if key not in payload:
                raise CheckpointError(f"{source}: checkpoint is missing the key {key!r}")
        try:
            model = cls(
                payload["layer_sizes"],
                families=payload.get("families"),
                gaussian_std=payload.get("gaussian_std", 1.0),
                learn_std=payload.get("learn_std", True),
                n_classes=payload.get("n_classes", 0),
            )
        except ValueError as err:
            raise CheckpointError(f"{source}: bad model description ({err})") from None
        model.load_state_dict(payload["state_dict"])
        return model


def _flat(t: Tensor) -> Tensor:
    """Merge all leading dims: (*, n) -> (prod(*), n)."""
    return t.reshape(-1, t.shape[-1])


def _grad_wanted(model: nn.Module) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())


class _LocalGradients(torch.autograd.Function):
    """Attach precomputed parameter gradients to a loss value.

    BiHM's gradients are local per layer (see BiHM._manual_grads), so they are computed
    directly instead of through an autograd graph; this hands them to autograd so that
    loss.backward(), DDP's gradient all-reduce and Lightning work unchanged.
    """

    @staticmethod
    def forward(ctx, loss: Tensor, grads: list[Tensor], *params: Tensor) -> Tensor:
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return (None, None, *(grad_output * g for g in ctx.grads))


def _pick(candidates: Tensor, log_weight: Tensor, generator: Generator) -> Tensor:
    """For each chain c pick candidates[c, j] with probability softmax_j(log_weight[c]).

    By inversion of the cumulative weights with one uniform per chain (not
    torch.multinomial), so that per-chain streams (`RowStreams`) work too: the first j
    with cdf_j >= (1 - u) cdf_J. As 1 - u > 0, a zero-weight candidate is never picked."""
    cdf = torch.softmax(log_weight, dim=-1).cumsum(-1)
    u = uniform((cdf.shape[0], 1), generator, cdf.device, cdf.dtype)
    idx = (cdf < (1 - u) * cdf[:, -1:]).sum(-1, keepdim=True).clamp_(max=cdf.shape[-1] - 1)
    return candidates.gather(1, idx.unsqueeze(-1).expand(-1, 1, candidates.shape[-1])).squeeze(1)
