"""Exact quantities of a tiny BiHM by enumerating every configuration of x and h."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from bihm import BiHM


def all_binary(n: int) -> Tensor:
    """All 2^n binary vectors of length n, shape (2^n, n), in lexicographic order."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)))


def binary_index(x: Tensor) -> Tensor:
    """Row index of each binary vector in `all_binary` (big-endian bits)."""
    n = x.shape[-1]
    powers = 2 ** torch.arange(n - 1, -1, -1, device=x.device)
    return (x.long() * powers).sum(-1)


@dataclass
class Exact:
    xs: Tensor  # (X, n_0) every visible configuration
    log_px: Tensor  # (X,) log p(x)
    log_ptilde_star: Tensor  # (X,) log p~*(x)
    two_log_z: Tensor  # () 2 log Z
    log_pstar: Tensor  # (X,) log p*(x)
    log_pxh: Tensor  # (X, H) log p(x, h)
    log_qhx: Tensor  # (X, H) log q(h | x)


def hidden_grid(model: BiHM) -> list[Tensor]:
    """All joint hidden configurations, as [h_1, ..., h_L] each of shape (H, n_l)."""
    grids = [all_binary(n) for n in model.layer_sizes[1:]]
    combos = list(itertools.product(*[range(g.shape[0]) for g in grids]))
    idx = torch.tensor(combos)
    return [g[idx[:, i]] for i, g in enumerate(grids)]


def enumerate_model(model: BiHM) -> Exact:
    with torch.no_grad():
        xs = all_binary(model.layer_sizes[0]).double()
        hidden = [h.double() for h in hidden_grid(model)]
        X, H = xs.shape[0], hidden[0].shape[0]
        model = model.double()
        hs = [xs[:, None, :].expand(X, H, -1)] + [h[None].expand(X, H, -1) for h in hidden]
        log_pxh = model.log_p(hs)
        log_qhx = model.log_q(hs)
        model.float()
        log_px = torch.logsumexp(log_pxh, 1)
        log_ptilde_star = 2 * torch.logsumexp(0.5 * (log_pxh + log_qhx), 1)
        two_log_z = torch.logsumexp(log_ptilde_star, 0)
        return Exact(
            xs=xs.float(),
            log_px=log_px,
            log_ptilde_star=log_ptilde_star,
            two_log_z=two_log_z,
            log_pstar=log_ptilde_star - two_log_z,
            log_pxh=log_pxh,
            log_qhx=log_qhx,
        )


def tiny_model(sizes=(6, 4, 3), scale: float = 1.5, seed: int = 0) -> BiHM:
    """A tiny BiHM with large random weights, so p, q and p* differ clearly."""
    torch.manual_seed(seed)
    model = BiHM(list(sizes))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, scale)
    return model


def fit_q_to_posterior(model: BiHM, steps: int = 40, lr: float = 0.05) -> BiHM:
    """Move q towards p's exact posterior (minimise E_p(x) KL(p(h|x) || q(h|x)) by Adam).

    With a random q the importance weights have enormous variance, so estimator tests
    would need huge tolerances; a fitted q gives tight ones while q(h|x) != p(h|x).
    """
    xs = all_binary(model.layer_sizes[0])
    hidden = hidden_grid(model)
    X, H = xs.shape[0], hidden[0].shape[0]
    hs = [xs[:, None, :].expand(X, H, -1)] + [h[None].expand(X, H, -1) for h in hidden]
    with torch.no_grad():
        log_pxh = model.log_p(hs)
        weight = torch.softmax(log_pxh, 1) * torch.logsumexp(log_pxh, 1, keepdim=True).exp()
    optimiser = torch.optim.Adam(model.q_nets.parameters(), lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        (-(weight * model.log_q(hs)).sum()).backward()
        optimiser.step()
    return model


def assert_manual_grads_equal_autograd(model: BiHM, x: Tensor, K: int, objective: str) -> dict:
    """`model.loss` computes layer-local gradients by hand; on the very same samples they
    must equal autograd's gradient of -(sum_k w~_k log p + sum_k c_k log q) through
    log_p / log_q. Returns the manual gradients by parameter name."""
    model.zero_grad()
    out = model.loss(x, K, objective=objective, generator=torch.Generator().manual_seed(9))
    out.loss.backward()
    manual = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    hs = model.sample_q(x, K, generator=torch.Generator().manual_seed(9))  # same draws
    log_p, log_q = model.log_p(hs), model.log_q(hs)
    d = (log_p - log_q).detach()
    w = torch.softmax(d / 2 if objective == "bihm" else d, -1)
    c = w - 1 / K if objective == "bihm" else w
    reference = -((w * log_p).sum(-1) + (c * log_q).sum(-1)).mean()
    reference.backward()
    torch.testing.assert_close(out.loss.detach(), reference.detach(), rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(manual[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)
    return manual
