"""Sampling from p* by block Gibbs, with reconstruction and inpainting as its uses.

p*(x, h) = sqrt(p(x, h) q(x) q(h | x)) / Z with q(x) = p*(x) (paper Eq. 1-3, `bihm-math.md`).
Each layer's conditional under p* involves only its neighbours, so one sweep updates all
odd layers, then all even ones. Layer h_l is redrawn by importance resampling with

    target  t(h_l) = sqrt( p(h_l | h_{l+1}) p(h_{l-1} | h_l) q(h_l | h_{l-1}) q(h_{l+1} | h_l) )

from S proposals of p(h_l | h_{l+1}), S of q(h_l | h_{l-1}) and the current state, weighted
t(h) / (p(h | .) + q(h | .)) (the top layer: p(h_L) and q(h_L | h_{L-1})). The visible
layer's proposals come from p(x | h_1), weighted sqrt(q(x) q(h_1 | x) / p(x | h_1)) with
q(x) = p*(x) replaced by p~*(x) from `inner` q-samples (paper Sec. 4; the authors' S = 1000,
inner = 10, ~250 sweeps from ancestral p samples). Inpainting clamps the observed pixels
of x (mask 1) and proposes only the others; `reconstruct` is the plain q-then-p baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bihm.logspace import log_mean_exp
from bihm.rng import Generator, uniform

if TYPE_CHECKING:
    from bihm.model import BiHM

IMAGE_SHAPE = (28, 28)


def half_mask(side: str, shape: tuple[int, int] = IMAGE_SHAPE) -> Tensor:
    """A flat 0/1 mask (1 = observed) that hides the `side` half of a row-major image."""
    h, w = shape
    mask = torch.ones(h, w)
    if side == "bottom":
        mask[h // 2 :] = 0
    elif side == "top":
        mask[: h // 2] = 0
    elif side == "left":
        mask[:, : w // 2] = 0
    elif side == "right":
        mask[:, w // 2 :] = 0
    else:
        raise ValueError(f"mask side must be bottom, top, left or right, got {side!r}")
    return mask.reshape(-1)


def _update_latent(model: BiHM, hs: list[Tensor], l: int, S: int, generator: Generator) -> Tensor:
    """New h_l given its neighbours, by importance resampling over 2S + 1 candidates.

    Target t(h_l) = sqrt(p(h_l | h_{l+1}) p(h_{l-1} | h_l) q(h_l | h_{l-1}) q(h_{l+1} | h_l))
    (the top layer has p(h_L) and no h_{L+1} terms). Candidates: S draws from
    p(h_l | h_{l+1}), S from q(h_l | h_{l-1}), and the current h_l; weight
    t(h) / (p(h | .) + q(h | .)). Keeping the current state among the candidates
    (iterated SIR) makes the kernel leave p* invariant for any S.
    For a Gaussian layer the same holds with densities: the proposal density is the
    mixture (p + q) / 2 and the current state is again one of the candidates.
    """
    C, top = hs[0].shape[0], l == model.n_latent
    fams, p_s, q_s = model._fams, model._log_stds("p"), model._log_stds("q")
    fam = fams[l]
    p_pre = model.prior_logits.expand(C, -1) if top else model.p_nets[l](hs[l + 1])
    p_a = fam.finish(p_pre).unsqueeze(1)
    q_a = fam.finish(model.q_nets[l - 1](hs[l - 1])).unsqueeze(1)
    shape = (C, S, model.layer_sizes[l])
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
    a = below.finish(model.p_nets[l - 1](proposals), inplace=True)
    log_t = log_t + below.log_prob(hs[l - 1].unsqueeze(1), a, p_s[l - 1])
    if not top:  # q(h_{l+1} | h_l)
        above = fams[l + 1]
        a = above.finish(model.q_nets[l](proposals), inplace=True)
        log_t = log_t + above.log_prob(hs[l + 1].unsqueeze(1), a, q_s[l + 1])
    log_weight = 0.5 * log_t - torch.logaddexp(log_p_l, log_q_l)
    return _pick(proposals, log_weight, generator)


def _update_visible(
    model: BiHM,
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
    C, fam = hs[0].shape[0], model._fams[0]
    log_std = model._log_stds("p")[0]
    p_logits = fam.finish(model.p_nets[0](hs[1])).unsqueeze(1)  # (C, 1, n_0)
    proposals = fam.sample(p_logits, log_std, (C, S, model.layer_sizes[0]), generator)
    proposals = torch.cat([proposals, hs[0].unsqueeze(1)], dim=1)  # (C, S + 1, n_0)
    free = torch.ones_like(proposals[:1, :1]) if mask is None else 1 - mask.unsqueeze(1)
    if x_observed is not None:
        proposals = free * proposals + (1 - free) * x_observed.unsqueeze(1)
    log_p_free = fam.log_prob_masked(proposals, p_logits, log_std, free)
    fam1 = model._fams[1]
    a = fam1.finish(model.q_nets[0](proposals), inplace=True)
    log_q_h1 = fam1.log_prob(hs[1].unsqueeze(1), a, model._log_stds("q")[1])
    d = model._log_weights(proposals, inner, generator)
    log_ptilde_star = 2 * log_mean_exp(d / 2)
    log_weight = 0.5 * (log_ptilde_star + log_q_h1 - log_p_free)
    return _pick(proposals, log_weight, generator)


@torch.no_grad()
def gibbs_step(
    model: BiHM,
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
    if model.n_classes:
        raise ValueError("Gibbs sampling with a label node is not implemented")
    hs = list(hs)
    for parity in (1, 0):
        for l in range(parity, model.n_latent + 1, 2):
            if l == 0:
                hs[0] = _update_visible(model, hs, proposals, inner, x_observed, mask, generator)
            else:
                hs[l] = _update_latent(model, hs, l, proposals, generator)
    return hs


@torch.no_grad()
def sample_pstar(
    model: BiHM,
    n: int,
    steps: int = 250,
    proposals: int = 1000,
    inner: int = 10,
    generator: Generator = None,
) -> list[Tensor]:
    """n samples [x, h_1, ..., h_L] from p* by block Gibbs, started from ancestral p samples."""
    model._check_positive(n, "n")
    model._check_positive(proposals, "proposals")
    model._check_positive(inner, "inner")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}")
    hs = model.sample_p(n, generator)
    for _ in range(steps):
        hs = model.gibbs_step(hs, proposals, inner, generator=generator)
    return hs


def _check_mask(x: Tensor, mask: Tensor) -> None:
    if mask.shape != x.shape:
        raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must be binary (1 = observed pixel, 0 = to fill in)")


@torch.no_grad()
def reconstruct(model: BiHM, x: Tensor, mask: Tensor, generator: Generator = None) -> Tensor:
    """Plain q-then-p fill-in: h ~ q(h | x with the missing pixels 0), x_free ~ p(x | h_1).

    The baseline that Gibbs inpainting from p* is compared against.
    """
    model._check_x(x)
    _check_mask(x, mask)
    mask = mask.to(model._dtype)
    h1 = model._q_pass(x * mask, 1, generator)[0][1].squeeze(-2)
    fam = model._fams[0]
    a = fam.finish(model.p_nets[0](h1), inplace=True)
    x_free = fam.sample(a, model._log_stds("p")[0], a.shape, generator)
    return mask * x + (1 - mask) * x_free


@torch.no_grad()
def inpaint(
    model: BiHM,
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
    model._check_positive(proposals, "proposals")
    model._check_positive(inner, "inner")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}")
    x0 = model.reconstruct(x, mask, generator)
    mask = mask.to(model._dtype)
    hs = model._q_pass(x0, 1, generator)[0]
    hs = [h.squeeze(-2) for h in hs]
    for _ in range(steps):
        hs = model.gibbs_step(hs, proposals, inner, x_observed=x, mask=mask, generator=generator)
    return hs[0]


def _pick(candidates: Tensor, log_weight: Tensor, generator: Generator) -> Tensor:
    """For each chain c pick candidates[c, j] with probability softmax_j(log_weight[c]).

    By inversion of the cumulative weights with one uniform per chain (not
    torch.multinomial), so that per-chain `Streams` work too: the first j
    with cdf_j >= (1 - u) cdf_J. As 1 - u > 0, a zero-weight candidate is never picked."""
    cdf = torch.softmax(log_weight, dim=-1).cumsum(-1)
    u = uniform((cdf.shape[0], 1), generator, cdf.device, cdf.dtype)
    idx = (cdf < (1 - u) * cdf[:, -1:]).sum(-1, keepdim=True).clamp_(max=cdf.shape[-1] - 1)
    return candidates.gather(1, idx.unsqueeze(-1).expand(-1, 1, candidates.shape[-1])).squeeze(1)
