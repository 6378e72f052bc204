"""Bidirectional Helmholtz Machines (Bornschein, Shabanian, Fischer, Bengio, ICML 2016):
the model, i.e. the two belief nets p and q, their parameters, samplers and log-probabilities.

Symbols follow `bihm-math.md`:

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

What is done with the model is a function of it in the module of its concept, bound to
`BiHM` as a method (the public API, at the end of the class):

    bihm/objectives.py   loss: the BiHM and RWS objectives and their layer-local gradients
    bihm/estimators.py   estimates, log_likelihood, ess, log_z2_terms, estimate_log_z2,
                         classify (the label node's q(y | x) and p*(y | x))
    bihm/labels.py       the label node y: its draws from p(y) and q(y | h_{L-1}), log p(y)
    bihm/gibbs.py        gibbs_step, sample_pstar, reconstruct, inpaint
    bihm/checkpoint.py   save, load, from_payload: the checkpoint format
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bihm import checkpoint, estimators, gibbs, labels, objectives
from bihm.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from bihm.estimators import DEFAULT_CHUNK, ESS, Estimates
from bihm.families import LOG_STD_MAX, LOG_STD_MIN, get_family, log_bernoulli
from bihm.logspace import ess_from_log_weights, log_mean_and_sem, log_mean_exp
from bihm.objectives import LossOutput
from bihm.rng import Generator

# Names that lived here before the split, imported from here by code outside the package.
__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "DEFAULT_CHUNK",
    "ESS",
    "BiHM",
    "Estimates",
    "LossOutput",
    "ess_from_log_weights",
    "log_bernoulli",
    "log_mean_and_sem",
    "log_mean_exp",
]


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
        y, log_p_y = labels.sample_prior(self, n, generator) if self.n_classes else (None, 0.0)
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
        y = labels.check_onehot(self, y)
        fams, log_stds = self._fams, self._log_stds("p")
        log_p = fams[-1].log_prob(hs[-1], fams[-1].finish(self._top_pre(y)), log_stds[-1])
        if y is not None:
            log_p = log_p + labels.log_p_y(self, y)
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
            y = labels.check_onehot(self, y)
            log_q = log_q + (y * torch.log_softmax(self.q_label(hs[-2]), -1)).sum(-1)
        return log_q

    def _log_weights(
        self, x: Tensor, K: int, generator: Generator = None, y: Tensor | None = None
    ) -> Tensor:
        """d_k = log p(x, h_k) - log q(h_k | x) for h_k ~ q(h | x); shape (*, K).

        With a label node, y is part of the sample where it is missing (y_k ~ q(y | h_{L-1}),
        d_k = log p(x, h_k, y_k) - log q(h_k, y_k | x)) and observed where given
        (d_k = log p(x, h_k, y) - log q(h_k | x)): the estimates are of log p(x) or log p(x, y).
        """
        hs, q_logits, _ = self._q_pass(x, K, generator)
        lab = labels.draw(self, hs[-2], y, generator) if self.n_classes else None
        p_logits = self._p_logits(hs, None if lab is None else lab.onehot)
        log_p, log_q = self._log_p_and_log_q(hs, p_logits, q_logits, lab)
        return log_p - log_q

    def _log_p_and_log_q(
        self,
        hs: Sequence[Tensor],
        p_a: Sequence[Tensor],
        q_a: Sequence[Tensor],
        lab: labels.Labels | None = None,
    ) -> tuple[Tensor, Tensor]:
        """log p(x, h[, y]) and log q(h[, y] | x) from every layer's finished
        pre-activations; an observed label is in p only, a sampled one in both."""
        fams, p_s, q_s = self._fams, self._log_stds("p"), self._log_stds("q")
        log_p = sum(fams[l].log_prob(hs[l], p_a[l], p_s[l]) for l in range(len(hs)))
        log_q = sum(fams[l].log_prob(hs[l], q_a[l - 1], q_s[l]) for l in range(1, len(hs)))
        if lab is not None:
            log_p = log_p + labels.log_p_y(self, lab.onehot)
            log_q = log_q + (1 - lab.observed) * lab.log_q_y
        return log_p, log_q

    # ------------------------------------------------------------------ the public API
    # Functions of the model from the modules of their concepts (see the module
    # docstring), bound here as its methods.
    loss = objectives.loss
    log_likelihood = estimators.log_likelihood
    estimates = estimators.estimates
    ess = estimators.ess
    log_z2_terms = estimators.log_z2_terms
    estimate_log_z2 = estimators.estimate_log_z2
    classify = estimators.classify
    gibbs_step = gibbs.gibbs_step
    sample_pstar = gibbs.sample_pstar
    reconstruct = gibbs.reconstruct
    inpaint = gibbs.inpaint
    save = checkpoint.save
    load = classmethod(checkpoint.load)
    from_payload = classmethod(checkpoint.from_payload)
