"""The distribution families of a BiHM layer: Bernoulli (the paper's) and Gaussian.

Every conditional of p and q (`bihm-math.md`) has a linear pre-activation a = W h_in + c
(for the top prior p(h_L): a = b); a layer's family turns a into a distribution over its
units, independent given a:

    Bernoulli   h_i ~ Bern(sigmoid(a_i)),     a clamped to +-LOGIT_CLAMP (the authors' clip)
    Gaussian    h_i ~ N(a_i, sigma_i^2),      log sigma_i one number per unit and conditional
                                              (learned or fixed), clamped to
                                              [LOG_STD_MIN, LOG_STD_MAX]

Nothing else in the BiHM is specific to a family: the importance weights d_k need only
log-densities, and every layer is sampled, so each conditional's gradient stays local
(paper Sec. 2-3, Algorithm 1). A family therefore supplies exactly three things:
log-densities, samples (drawn through `bihm.rng.uniform`, so per-row streams keep
evaluation independent of batching), and the gradient of coef * log density with respect
to a and log sigma, from which `bihm.objectives.layer_local_gradients` forms the
parameter gradients.

For a continuous layer p~*(x), p*(x) and Z^2 are densities and integrals instead of
probabilities and sums; the estimators of `bihm-math.md` are unchanged (Eq. 7 holds with
the sum over x replaced by an integral).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from bihm.rng import Generator, uniform

# The authors clip sigmoid outputs to [1e-6, 1 - 1e-6]; clamping the logits is the same
# thing in log space and keeps log-probabilities finite.
LOGIT_CLAMP = math.log((1.0 - 1e-6) / 1e-6)

# A floor on sigma keeps a Gaussian unit's density finite when it learns a near-constant
# value (a dequantized MNIST background pixel has std 1/256/sqrt(12) ~ 1.1e-3, just above).
LOG_STD_MIN = math.log(1e-3)
LOG_STD_MAX = math.log(1e3)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

NAMES = ("bernoulli", "gaussian")


def bernoulli_from_probs(
    probs: Tensor, shape: Sequence[int], generator: Generator = None
) -> Tensor:
    """h ~ Bern(probs) of the given shape (probs broadcast to it), as float 0/1.

    With `Streams`, row i (the first dimension) draws from stream i."""
    u = uniform(shape, generator, probs.device, probs.dtype)
    return (u < probs).to(probs.dtype)


def standard_normal(
    shape: Sequence[int], generator: Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """N(0, 1) numbers of `shape` by Box-Muller from two uniforms each (through
    `bihm.rng.uniform`, so `Streams` draw row i from stream i)."""
    u = uniform((*shape, 2), generator, device, dtype)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[..., 0]))  # 1 - u in (0, 1]: finite
    return radius * torch.cos(2.0 * math.pi * u[..., 1])


def log_bernoulli(h: Tensor, logits: Tensor) -> Tensor:
    """sum_i log Bern(h_i; sigmoid(a_i)) = sum_i [h_i a_i - softplus(a_i)], a clamped."""
    a = logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    return (h * a - F.softplus(a)).sum(-1)


class Bernoulli:
    """Binary units: a holds the clamped logits; `stats` is sigmoid(a), shared by sampling
    and the gradient so that it is computed once."""

    name = "bernoulli"
    has_std = False

    @staticmethod
    def finish(a: Tensor, inplace: bool = False) -> Tensor:
        """The clamped logits from the pre-activation (in place for a fresh temporary)."""
        if inplace:
            return a.clamp_(-LOGIT_CLAMP, LOGIT_CLAMP)
        return a.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)

    @staticmethod
    def stats(a: Tensor) -> Tensor:
        return torch.sigmoid(a)

    @staticmethod
    def sample(
        a: Tensor,
        log_std: Tensor | None,
        shape: Sequence[int],
        generator: Generator = None,
        stats: Tensor | None = None,
    ) -> Tensor:
        probs = torch.sigmoid(a) if stats is None else stats
        return bernoulli_from_probs(probs, shape, generator)

    @staticmethod
    def log_prob(h: Tensor, a: Tensor, log_std: Tensor | None = None) -> Tensor:
        """sum_i log Bern(h_i; sigmoid(a_i)) = sum_i [h_i a_i - softplus(a_i)]."""
        return (h * a).sum(-1) - F.softplus(a).sum(-1)

    @staticmethod
    def log_prob_masked(h: Tensor, a: Tensor, log_std: Tensor | None, keep: Tensor) -> Tensor:
        """The log-probability of the units where keep == 1, up to a constant: the dropped
        units count as h = 0 under logit 0, i.e. -log 2 each, the same for every h."""
        return Bernoulli.log_prob(h * keep, a * keep)

    @staticmethod
    def grad(
        h: Tensor, a: Tensor, log_std: Tensor | None, coef: Tensor, stats: Tensor | None = None
    ) -> tuple[Tensor, None]:
        """coef * d log Bern(h; sigmoid(a)) / da = coef (h - sigmoid(a)), zero where a sits
        at the clamp (as autograd through the clamp would give). hardtanh_backward is exactly
        that mask, fused: 3x faster than torch.where."""
        probs = torch.sigmoid(a) if stats is None else stats
        g = (h - probs).mul_(coef)
        return torch.ops.aten.hardtanh_backward(g, a, -LOGIT_CLAMP, LOGIT_CLAMP), None


class Gaussian:
    """Real-valued units: a is the mean, log_std the per-unit log sigma (already clamped)."""

    name = "gaussian"
    has_std = True

    @staticmethod
    def finish(a: Tensor, inplace: bool = False) -> Tensor:
        return a

    @staticmethod
    def stats(a: Tensor) -> None:
        return None

    @staticmethod
    def sample(
        a: Tensor,
        log_std: Tensor,
        shape: Sequence[int],
        generator: Generator = None,
        stats: Tensor | None = None,
    ) -> Tensor:
        """h = a + sigma * eps, eps ~ N(0, 1) (Box-Muller, see `standard_normal`)."""
        eps = standard_normal(shape, generator, a.device, a.dtype)
        return a.detach() + log_std.detach().exp() * eps

    @staticmethod
    def log_prob_terms(h: Tensor, a: Tensor, log_std: Tensor) -> Tensor:
        """log N(h_i; a_i, sigma_i^2) = -(h_i - a_i)^2 / (2 sigma_i^2) - log(sigma_i sqrt(2 pi))."""
        z = (h - a) * torch.exp(-log_std)
        return -0.5 * z * z - log_std - HALF_LOG_2PI

    @staticmethod
    def log_prob(h: Tensor, a: Tensor, log_std: Tensor) -> Tensor:
        return Gaussian.log_prob_terms(h, a, log_std).sum(-1)

    @staticmethod
    def log_prob_masked(h: Tensor, a: Tensor, log_std: Tensor, keep: Tensor) -> Tensor:
        return (Gaussian.log_prob_terms(h, a, log_std) * keep).sum(-1)

    @staticmethod
    def grad(
        h: Tensor, a: Tensor, log_std: Tensor, coef: Tensor, stats: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """coef * d log N / da = coef (h - a) / sigma^2 and, per element,
        coef * d log N / d log sigma = coef ((h - a)^2 / sigma^2 - 1). The caller sums the
        second over all but the unit dimension and masks it where log sigma is clamped."""
        inv_var = torch.exp(-2.0 * log_std)
        diff = h - a
        g_a = diff * inv_var * coef
        g_log_std = (diff * diff * inv_var - 1.0) * coef
        return g_a, g_log_std


FAMILIES = {"bernoulli": Bernoulli, "gaussian": Gaussian}


def get_family(name: str) -> type[Bernoulli] | type[Gaussian]:
    """The family called `name` ("bernoulli" or "gaussian")."""
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(NAMES)}, got {name!r}")
    return FAMILIES[name]
