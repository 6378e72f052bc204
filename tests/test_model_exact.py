"""The estimators, gradients and Gibbs sampler against exact enumeration on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from bihm import BiHM
from tests.exact import (
    all_binary,
    binary_index,
    enumerate_model,
    fit_q_to_posterior,
    hidden_grid,
    tiny_model,
)


@pytest.fixture(scope="module")
def model() -> BiHM:
    """q is fitted towards p's posterior: moderate weight variance, tight tolerances."""
    return fit_q_to_posterior(tiny_model(scale=1.0), steps=40)


@pytest.fixture(scope="module")
def exact(model):
    return enumerate_model(model)


@pytest.fixture(scope="module")
def wild_model() -> BiHM:
    """Random p and q: p* differs clearly from p (total variation ~0.2)."""
    return tiny_model(scale=1.5)


@pytest.fixture(scope="module")
def wild_exact(wild_model):
    return enumerate_model(wild_model)


def naive_log_bernoulli(h, probs):
    """An independent reference: log prod_i probs_i^h_i (1 - probs_i)^(1 - h_i), no clamp."""
    return (h * probs.log() + (1 - h) * (1 - probs).log()).sum(-1)


def test_log_p_and_log_q_match_a_naive_implementation(model):
    torch.manual_seed(1)
    hs = [(torch.rand(5, n) < 0.5).float() for n in model.layer_sizes]
    W1p, W2p = model.p_nets[0], model.p_nets[1]
    ref_p = (
        naive_log_bernoulli(hs[2], torch.sigmoid(model.prior_logits))
        + naive_log_bernoulli(hs[1], torch.sigmoid(hs[2] @ W2p.weight.T + W2p.bias))
        + naive_log_bernoulli(hs[0], torch.sigmoid(hs[1] @ W1p.weight.T + W1p.bias))
    )
    W1q, W2q = model.q_nets[0], model.q_nets[1]
    ref_q = naive_log_bernoulli(
        hs[1], torch.sigmoid(hs[0] @ W1q.weight.T + W1q.bias)
    ) + naive_log_bernoulli(hs[2], torch.sigmoid(hs[1] @ W2q.weight.T + W2q.bias))
    torch.testing.assert_close(model.log_p(hs), ref_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.log_q(hs), ref_q, rtol=1e-5, atol=1e-5)


def test_distributions_are_normalised(exact):
    # sum_{x,h} p(x, h) = 1 and sum_h q(h | x) = 1 for every x.
    assert torch.logsumexp(exact.log_pxh.flatten(), 0).item() == pytest.approx(0.0, abs=1e-9)
    torch.testing.assert_close(
        torch.logsumexp(exact.log_qhx, 1), torch.zeros(exact.xs.shape[0], dtype=torch.float64)
    )


def test_bound_and_normalisation_of_pstar(exact, wild_exact):
    # Z <= 1 (paper Eq. 6), p~*(x) <= p(x), and p*(x) sums to one.
    for ex in (exact, wild_exact):
        assert ex.two_log_z.item() <= 0.0
        assert bool((ex.log_ptilde_star <= ex.log_px + 1e-12).all())
        assert torch.exp(ex.log_pstar).sum().item() == pytest.approx(1.0, abs=1e-9)
    # Both tiny models are far enough from Z = 1 for the tests below to tell p from p*.
    assert exact.two_log_z.item() < -0.1
    assert wild_exact.two_log_z.item() < -1.0


def test_log_likelihood_converges_to_exact_values(model, exact):
    """With h_k ~ q: log p^ and log p~*^ approach the exact values within a few standard errors.

    The standard error of log mean(w) is sqrt(Var_q(w) / K) / E_q[w], computed exactly
    from the enumeration (w = p/q for log p, w = sqrt(p/q) for log p~*). The Jensen bias
    Var/(2K E^2) is added to the tolerance.
    """
    K, repeats = 20_000, 4
    gen = torch.Generator().manual_seed(2)
    xs = exact.xs
    est_p, est_ps = model.log_likelihood(xs.repeat(repeats, 1), K, chunk=50_000, generator=gen)
    est_p = est_p.double().view(repeats, -1).mean(0)
    est_ps = est_ps.double().view(repeats, -1).mean(0)
    q = exact.log_qhx.exp()
    for log_w, est, target, square in (
        (exact.log_pxh - exact.log_qhx, est_p, exact.log_px, False),
        (0.5 * (exact.log_pxh - exact.log_qhx), est_ps, exact.log_ptilde_star, True),
    ):
        w = log_w.exp()
        mean, second = (q * w).sum(1), (q * w * w).sum(1)
        rel_var = second / mean**2 - 1
        sem = torch.sqrt(rel_var / (K * repeats))
        bias = rel_var / (2 * K)
        scale = 2.0 if square else 1.0  # log p~* = 2 log mean(sqrt(p/q))
        err = (est - target).abs()
        tol = scale * (5 * sem + bias) + 1e-4
        assert bool((err < tol).all()), f"max error {err.max():.5f}, tolerance {tol.min():.5f}"
        print(
            f"log-likelihood (square={square}): max |err| = {err.max():.2e} nats, K={K}x{repeats}"
        )


def test_log_likelihood_is_exact_when_q_is_the_posterior():
    """p(x, h) = p(h) p(x) and q(h | x) = p(h): every d_k equals log p(x), for any K and chunk."""
    model = BiHM([5, 3])
    with torch.no_grad():
        model.p_nets[0].weight.zero_()
        model.q_nets[0].weight.zero_()
        model.prior_logits.copy_(torch.tensor([0.3, -1.0, 2.0]))
        model.q_nets[0].bias.copy_(model.prior_logits)
    x = all_binary(5)
    log_px = model.p_nets[0].bias.new_zeros(32) + (
        x * torch.nn.functional.logsigmoid(model.p_nets[0].bias)
        + (1 - x) * torch.nn.functional.logsigmoid(-model.p_nets[0].bias)
    ).sum(-1)
    for K, chunk in ((1, 1), (7, 3), (100, 64), (1000, 250)):
        log_p, log_ps = model.log_likelihood(x, K, chunk=chunk)
        torch.testing.assert_close(log_p, log_px, rtol=0, atol=1e-4)
        torch.testing.assert_close(log_ps, log_px, rtol=0, atol=1e-4)


def test_estimate_log_z2_converges_to_exact_value(model, exact):
    gen = torch.Generator().manual_seed(3)
    value, sem = model.estimate_log_z2(200_000, inner=10, chunk=30_000, generator=gen)
    err = abs(value - exact.two_log_z.item())
    print(f"2 log Z: estimate {value:.4f} +- {sem:.4f}, exact {exact.two_log_z.item():.4f}")
    assert 0 < sem < 0.05
    assert err < 5 * sem + 1e-3


def test_log_z2_terms_are_unbiased_for_z2(model, exact):
    """E[term] = Z^2 exactly (Eq. 7), also with a single inner sample."""
    gen = torch.Generator().manual_seed(4)
    for inner in (1, 10):
        w = model.log_z2_terms(200_000, inner=inner, generator=gen).double().exp()
        z2, sem = w.mean().item(), w.std().item() / math.sqrt(w.numel())
        assert abs(z2 - exact.two_log_z.exp().item()) < 5 * sem


def exact_grad_of_mean(model, x_idx, objective_of):
    """grad of mean over x_idx of objective_of(exact)[x], on the enumeration's autograd graph."""
    model.zero_grad()
    ex = enumerate_model_with_grad(model)
    objective_of(ex)[x_idx].mean().backward()
    return {n: _grad(p) for n, p in model.named_parameters()}


def enumerate_model_with_grad(model):
    xs = all_binary(model.layer_sizes[0])
    hidden = hidden_grid(model)
    X, H = xs.shape[0], hidden[0].shape[0]
    hs = [xs[:, None, :].expand(X, H, -1)] + [h[None].expand(X, H, -1) for h in hidden]
    return model.log_p(hs), model.log_q(hs)


def estimator_grad(model, x, K, objective, repeats, seed):
    model.zero_grad()
    gen = torch.Generator().manual_seed(seed)
    out = model.loss(x.repeat(repeats, 1), K, objective=objective, generator=gen)
    (-out.loss).backward()  # the estimator ascends the objective
    return {n: _grad(p) for n, p in model.named_parameters()}


def rel_error(est, ref, names):
    num = sum(((est[n] - ref[n]) ** 2).sum() for n in names)
    den = sum((ref[n] ** 2).sum() for n in names)
    return math.sqrt(num / den)


@pytest.mark.parametrize("objective", ["bihm", "rws"])
def test_training_gradient_approaches_exact_gradient(model, exact, objective):
    """BiHM: mean estimator -> grad log p~*(x) for p and q (Algorithm 1).
    RWS: the p part -> grad log p(x) (the importance-sampled marginal likelihood gradient)."""
    x_idx = torch.tensor([5, 22, 40, 63])
    x = exact.xs[x_idx]

    def target(ex):
        log_pxh, log_qhx = ex
        if objective == "bihm":
            return 2 * torch.logsumexp(0.5 * (log_pxh + log_qhx), 1)
        return torch.logsumexp(log_pxh, 1)

    ref = exact_grad_of_mean(model, x_idx, target)
    p_names = [n for n in ref if n.startswith("p_nets") or n == "prior_logits"]
    q_names = [n for n in ref if n.startswith("q_nets")]
    errors = {}
    for K in (1, 3, 1000):
        est = estimator_grad(model, x, K, objective, repeats=3000, seed=K)
        errors[K] = rel_error(est, ref, p_names)
        if objective == "bihm":
            errors[("q", K)] = rel_error(est, ref, q_names)
    print(objective, {str(k): round(v, 4) for k, v in errors.items()})
    assert errors[1000] < 0.03
    assert errors[1] > 3 * errors[1000]  # K = 1 is visibly biased: the test can tell
    if objective == "bihm":
        assert errors[("q", 1000)] < 0.05


def test_gibbs_chain_samples_pstar(wild_model, wild_exact):
    """The empirical distribution of x under block Gibbs matches p*(x): TV < 0.05,
    while the ancestral p(x) samples it starts from are clearly different."""
    model, exact = wild_model, wild_exact
    gen = torch.Generator().manual_seed(5)
    chains, burn_in, keep = 2000, 10, 10
    hs = model.sample_p(chains, generator=gen)
    counts = torch.zeros(exact.xs.shape[0])
    for step in range(burn_in + keep):
        hs = model.gibbs_step(hs, proposals=10, inner=50, generator=gen)
        if step >= burn_in:
            counts += torch.bincount(binary_index(hs[0]), minlength=counts.numel())
    empirical = counts / counts.sum()
    pstar = exact.log_pstar.exp().float()
    px = exact.log_px.exp().float()
    tv_pstar = 0.5 * (empirical - pstar).abs().sum().item()
    tv_p_vs_pstar = 0.5 * (px - pstar).abs().sum().item()
    print(f"Gibbs TV to p*: {tv_pstar:.4f}; TV(p, p*) = {tv_p_vs_pstar:.4f}")
    assert tv_p_vs_pstar > 0.1
    assert tv_pstar < 0.05


def test_inpainting_keeps_observed_pixels_and_samples_the_conditional(wild_model, wild_exact):
    """Observed pixels never change, and the free pixels follow p*(x_free | x_observed)."""
    model, exact = wild_model, wild_exact
    gen = torch.Generator().manual_seed(6)
    observed = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    chains = 2000
    x = observed.expand(chains, -1).clone()
    m = mask.expand(chains, -1).clone()
    samples = []
    x0 = model.reconstruct(x, m, generator=gen)
    assert bool((x0[:, :3] == observed[:3]).all())
    hs = [h.squeeze(-2) for h in model.sample_q(x0, 1, generator=gen)]
    for step in range(20):
        hs = model.gibbs_step(hs, proposals=10, inner=50, x_observed=x, mask=m, generator=gen)
        assert bool((hs[0][:, :3] == observed[:3]).all()), f"observed pixel changed at step {step}"
        if step >= 10:
            samples.append(hs[0])
    xs = torch.cat(samples)
    counts = torch.bincount(binary_index(xs[:, 3:]), minlength=8).float()
    empirical = counts / counts.sum()
    consistent = (exact.xs[:, :3] == observed[:3]).all(1)
    target = torch.softmax(exact.log_pstar[consistent], 0).float()
    tv = 0.5 * (empirical - target).abs().sum().item()
    print(f"inpainting TV to p*(x_free | x_obs): {tv:.4f}")
    assert tv < 0.05
    # The public wrapper clamps too.
    out = model.inpaint(x[:50], m[:50], steps=3, proposals=5, inner=5, generator=gen)
    assert bool((out[:, :3] == observed[:3]).all())


def _grad(param):
    return torch.zeros_like(param) if param.grad is None else param.grad.clone()
