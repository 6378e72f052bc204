"""The training objectives: BiHM (paper Algorithm 1) and reweighted wake-sleep (RWS).

Both draw K samples h_k ~ q(h | x) bottom-up, form d_k = log p(x, h_k) - log q(h_k | x)
(`bihm-math.md`) and the normalized weights w~ = softmax_k(log w) with

    BiHM:  log w_k = d_k / 2     p ascends sum_k w~_k grad log p(x, h_k)
                                 q ascends sum_k (w~_k - 1/K) grad log q(h_k | x)
    RWS:   log w_k = d_k         p ascends sum_k w~_k grad log p(x, h_k)
                                 q ascends sum_k w~_k grad log q(h_k | x)   (wake-phase q)

For BiHM both are consistent estimators of grad log p~*(x) (paper Eq. 5, Algorithm 1):
the -1/K is a zero-mean control variate (E_q grad log q = 0) that cuts the variance of q's
gradient. RWS (Bornschein & Bengio 2015) is the paper's baseline; its p-update estimates
grad log p(x). The loss minimised is the batch mean of the surrogate

    -( sum_k w~_k log p(x, h_k) + sum_k c_k log q(h_k | x) ),   c_k = q's coefficient,

with no gradient through w~ or through the samples. Every layer is sampled, hence
observed, so each conditional's gradient is local: `layer_local_gradients` computes them
directly, one matmul per weight and no autograd graph, and `_LocalGradients` hands them to
autograd so that `loss.backward()`, DDP and Lightning work unchanged.

As in Pyro's `infer/rws.py`, an objective is an object of its own beside the model
(`Objective`: its weights and q's coefficients); `loss` is `BiHM.loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bihm import compiled, labels
from bihm.families import LOG_STD_MAX, LOG_STD_MIN
from bihm.logspace import ess_from_log_weights, log_mean_exp
from bihm.rng import Generator

if TYPE_CHECKING:
    from bihm.model import BiHM


@dataclass
class LossOutput:
    """The surrogate to minimise and detached per-batch diagnostics (batch means)."""

    loss: Tensor
    log_p: Tensor  # log p(x) estimate with the K training samples
    log_ptilde_star: Tensor  # log p~*(x) estimate with the K training samples
    ess: Tensor  # effective sample size of the objective's own weights, in [1, K]


class Objective:
    """An importance-weighted objective over K samples h_k ~ q(h | x): the log weights
    log w_k from d_k, whose softmax w~ is p's coefficient, and q's coefficients c_k."""

    name: str

    def log_weights(self, d: Tensor) -> Tensor:
        raise NotImplementedError

    def q_coefficients(self, w_tilde: Tensor, K: int) -> Tensor:
        raise NotImplementedError

    def loss(
        self, model: BiHM, x: Tensor, K: int, generator: Generator = None, y: Tensor | None = None
    ) -> LossOutput:
        """The batch-mean surrogate (its gradient attached, if any parameter wants one)
        and the diagnostics log p, log p~* and the ESS of w, from the same K draws."""
        model._check_positive(K, "K")
        model._check_x(x)
        return self._loss(model, x, K, generator, y)

    def _loss(
        self, model: BiHM, x: Tensor, K: int, generator: Generator, y: Tensor | None
    ) -> LossOutput:
        want_grads = _grad_wanted(model)  # False in validation (no_grad) and for frozen models
        labels.check_indices(model, y, x)
        step = self.surrogate
        if not isinstance(generator, torch.Generator):  # a generator= breaks a graph
            step = compiled.function(step, f"{self.name} training step")
        with torch.no_grad():
            surrogate, d, log_w, grads = step(model, x, K, want_grads, generator, y)
        loss = -surrogate
        if grads is not None:
            loss = _LocalGradients.apply(loss, grads, *model.parameters())
        return LossOutput(
            loss=loss,
            log_p=log_mean_exp(d).mean(),
            log_ptilde_star=(2 * log_mean_exp(d / 2)).mean(),
            ess=ess_from_log_weights(log_w).mean(),
        )

    def surrogate(
        self,
        model: BiHM,
        x: Tensor,
        K: int,
        want_grads: bool,
        generator: Generator = None,
        y: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor] | None]:
        """The training step's arithmetic, without autograd: the batch-mean surrogate, d,
        log w and (if wanted) the parameter gradients of -surrogate."""
        hs, q_logits, q_probs = model._q_pass(x, K, generator)
        lab = labels.draw(model, hs[-2], y, generator) if model.n_classes else None
        p_logits = model._p_logits(hs, None if lab is None else lab.onehot)
        log_p, log_q = model._log_p_and_log_q(hs, p_logits, q_logits, lab)
        d = log_p - log_q
        log_w = self.log_weights(d)
        w_tilde = torch.softmax(log_w, dim=-1)
        q_coef = self.q_coefficients(w_tilde, K)
        surrogate = (w_tilde * log_p).sum(-1) + (q_coef * log_q).sum(-1)
        if lab is not None:  # the wake update of q(y | h_{L-1}) for observed labels
            surrogate = surrogate + (w_tilde * lab.observed * lab.log_q_y).sum(-1)
        surrogate = surrogate.mean()
        grads = None
        if want_grads:
            n_examples = w_tilde.numel() // K
            grads = layer_local_gradients(
                model, hs, p_logits, q_logits, q_probs, w_tilde, q_coef, n_examples, lab
            )
        return surrogate, d, log_w, grads


class BiHMObjective(Objective):
    """BiHM (paper Algorithm 1): log w = d / 2, q's coefficients w~ - 1/K."""

    name = "bihm"

    def log_weights(self, d: Tensor) -> Tensor:
        return d / 2

    def q_coefficients(self, w_tilde: Tensor, K: int) -> Tensor:
        return w_tilde - 1.0 / K


class RWSObjective(Objective):
    """Reweighted wake-sleep, wake-phase q update: log w = d, q's coefficients w~."""

    name = "rws"

    def log_weights(self, d: Tensor) -> Tensor:
        return d

    def q_coefficients(self, w_tilde: Tensor, K: int) -> Tensor:
        return w_tilde


OBJECTIVES: dict[str, Objective] = {"bihm": BiHMObjective(), "rws": RWSObjective()}


def loss(
    model: BiHM,
    x: Tensor,
    K: int = 10,
    objective: str | Objective = "bihm",
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

    `objective` names one of `OBJECTIVES`, or is an `Objective` of one's own.
    """
    model._check_positive(K, "K")
    model._check_x(x)
    if isinstance(objective, str) and objective in OBJECTIVES:
        objective = OBJECTIVES[objective]
    if not isinstance(objective, Objective):
        raise ValueError(f"objective must be 'bihm' or 'rws', got {objective!r}")
    return objective._loss(model, x, K, generator, y)


def _flat(t: Tensor) -> Tensor:
    """Merge all leading dims: (*, n) -> (prod(*), n)."""
    return t.reshape(-1, t.shape[-1])


def _grad_wanted(model: nn.Module) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())


def layer_local_gradients(
    model: BiHM,
    hs: list[Tensor],
    p_logits: list[Tensor],
    q_logits: list[Tensor],
    q_probs: list[Tensor],
    p_coef: Tensor,
    q_coef: Tensor,
    n_examples: int,
    lab: labels.Labels | None = None,
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
    Returns the gradients in the order of `model.named_parameters()`.
    """
    scale = -1.0 / n_examples
    pc, qc = (p_coef * scale).unsqueeze(-1), (q_coef * scale).unsqueeze(-1)
    fams, L = model._fams, model.n_latent
    p_s, q_s = model._log_stds("p"), model._log_stds("q")
    grads: dict[str, Tensor] = {}

    def log_std_grad(name: str, g_elem: Tensor) -> None:
        raw = getattr(model, name)
        if isinstance(raw, nn.Parameter):
            g = _flat(g_elem).sum(0)
            grads[name] = torch.ops.aten.hardtanh_backward(g, raw, LOG_STD_MIN, LOG_STD_MAX)

    # Prior p(h_L): its pre-activation is the bias b itself.
    g, g_s = fams[L].grad(hs[L], p_logits[L], p_s[L], pc)
    grads["prior_logits"] = _flat(g).sum(0)
    if g_s is not None:
        log_std_grad(f"p_log_std_{L}", g_s)
    if lab is not None:
        grads["label_prior"] = model._own(_flat(g).T @ _flat(lab.onehot))
        p_y = torch.softmax(model.label_logits, -1)
        grads["label_logits"] = _flat(pc * (lab.onehot - p_y)).sum(0)
        y_coef = qc * (1 - lab.observed.unsqueeze(-1)) + pc * lab.observed.unsqueeze(-1)
        g = _flat(y_coef * (lab.onehot - lab.log_q.exp()))
        grads["q_label.weight"] = model._own(g.T @ _flat(hs[L - 1]))
        grads["q_label.bias"] = g.sum(0)
    for l in range(L):
        g, g_s = fams[l].grad(hs[l], p_logits[l], p_s[l], pc)
        g = _flat(g)
        # _own(): under bf16 autocast the product runs in bf16 (g rounded, h exact).
        grads[f"p_nets.{l}.weight"] = model._own(g.T @ _flat(hs[l + 1]))
        grads[f"p_nets.{l}.bias"] = g.sum(0)
        if g_s is not None:
            log_std_grad(f"p_log_std_{l}", g_s)
    for l in range(L):
        g, g_s = fams[l + 1].grad(hs[l + 1], q_logits[l], q_s[l + 1], qc, q_probs[l])
        h_in = hs[l]
        if l == 0:  # layer 1's logits are shared by the K samples: sum over k first
            g, h_in = g.sum(-2), h_in[..., 0, :]
        g = _flat(g)
        grads[f"q_nets.{l}.weight"] = model._own(g.T @ _flat(h_in))
        grads[f"q_nets.{l}.bias"] = g.sum(0)
        if g_s is not None:
            log_std_grad(f"q_log_std_{l + 1}", g_s)
    return [grads[name] for name, _ in model.named_parameters()]


class _LocalGradients(torch.autograd.Function):
    """Attach precomputed parameter gradients to a loss value.

    BiHM's gradients are local per layer (see `layer_local_gradients`), so they are
    computed directly instead of through an autograd graph; this hands them to autograd so
    that loss.backward(), DDP's gradient all-reduce and Lightning work unchanged.
    """

    @staticmethod
    def forward(ctx, loss: Tensor, grads: list[Tensor], *params: Tensor) -> Tensor:
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return (None, None, *(grad_output * g for g in ctx.grads))
