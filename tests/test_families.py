"""Gaussian layers (bihm/families.py) against exact values on tiny models.

Binary latents are enumerated exactly; a continuous layer is integrated numerically on a
fine grid (its dimension is kept at 1 or 2 for that): log p(x), log p~*(x), 2 log Z, the
training gradient and the Gibbs sampler's stationary distribution.
"""

from __future__ import annotations

import math

import pytest
import torch

from bihm import BiHM
from bihm.families import Gaussian, standard_normal
from bihm.rng import Streams
from tests.exact import (
    all_binary,
    assert_manual_grads_equal_autograd,
    binary_index,
    hidden_grid,
)


def gaussian_model(sizes, families, scale=1.0, log_std=(-0.5, 0.3), seed=0, learn_std=True):
    """A tiny BiHM with random weights and per-unit log sigmas spread over `log_std`."""
    torch.manual_seed(seed)
    model = BiHM(list(sizes), families=families, learn_std=learn_std)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if "log_std" in name:
                t.uniform_(*log_std)
            else:
                t.normal_(0.0, scale)
    return model.double()


def hs_for(model, x: torch.Tensor, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    X, H = x.shape[0], hidden[0].shape[0]
    return [x[:, None, :].expand(X, H, -1)] + [h[None].expand(X, H, -1) for h in hidden]


def exact_log_px_and_ptilde(model, x):
    """Enumerate binary latents: log p(x) and log p~*(x) for each row of x (with autograd)."""
    hidden = [h.double() for h in hidden_grid(model)]
    hs = hs_for(model, x, hidden)
    log_pxh, log_qhx = model.log_p(hs), model.log_q(hs)
    return torch.logsumexp(log_pxh, 1), 2 * torch.logsumexp(0.5 * (log_pxh + log_qhx), 1)


@pytest.fixture(scope="module")
def gvis():
    """Gaussian visible layer of 2 units over 3 + 2 binary latents."""
    model = gaussian_model([2, 3, 2], ["gaussian", "bernoulli", "bernoulli"])
    with torch.no_grad():  # q closer to p's posterior than a random one: moderate weights
        for net in model.q_nets:
            net.weight.mul_(0.3)
    return model


@pytest.fixture(scope="module")
def grid2(gvis):
    """A 2-D grid covering the visible density, its cell area, and log p(x), log p~*(x)
    on it (a Riemann sum of a smooth density on a fine grid is accurate to ~1e-6)."""
    t = torch.linspace(-14, 14, 281, dtype=torch.float64)
    xx, yy = torch.meshgrid(t, t, indexing="ij")
    grid = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        log_px, log_pt = exact_log_px_and_ptilde(gvis, grid)
    return grid, float((t[1] - t[0]) ** 2), log_px, log_pt


# --------------------------------------------------------------------------- the family
def test_gaussian_log_density_and_box_muller_samples():
    a, log_std = torch.randn(5, 4), torch.randn(4) * 0.3
    h = torch.randn(5, 4)
    ref = torch.distributions.Normal(a, log_std.exp()).log_prob(h).sum(-1)
    torch.testing.assert_close(Gaussian.log_prob(h, a, log_std), ref)
    z = standard_normal(
        (200_000,), torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64
    )
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs((z**4).mean().item() - 3) < 0.1  # Gaussian kurtosis, not just two moments


def test_gaussian_samples_follow_per_row_streams():
    """Row i of a draw depends only on stream i: evaluation stays independent of batching."""
    # float64: the same draws for a row in any batch, and arithmetic whose rounding by batch
    # shape (the BLAS picks its kernel by shape and CPU) stays below 1e-12 relative.
    model = gaussian_model([4, 3, 2], ["gaussian", "gaussian", "bernoulli"]).double()
    x = torch.randn(5, 4, dtype=torch.float64)

    def streams(rows):
        return Streams.keyed("cpu", 7, keys=rows)

    whole = model._log_weights(x, 6, streams(range(5)))
    parts = torch.cat(
        [model._log_weights(x[i : i + 2], 6, streams(range(i, min(i + 2, 5)))) for i in (0, 2, 4)]
    )
    torch.testing.assert_close(whole, parts, rtol=1e-12, atol=1e-12)
    # The model's own check: a Gaussian visible layer accepts real values, rejects non-finite.
    with pytest.raises(ValueError, match="must be finite"):
        model.loss(torch.full((2, 4), math.nan), 2)


def test_bad_families_are_rejected():
    with pytest.raises(ValueError, match="one family per layer"):
        BiHM([4, 3], families=["gaussian"])
    with pytest.raises(ValueError, match="family must be one of"):
        BiHM([4, 3], families=["poisson", "bernoulli"])
    with pytest.raises(ValueError, match="gaussian_std"):
        BiHM([4, 3], families=["gaussian", "bernoulli"], gaussian_std=0.0)


@pytest.mark.parametrize("learn_std", [True, False])
@pytest.mark.parametrize("objective", ["bihm", "rws"])
def test_manual_gradients_equal_autograd_with_gaussian_layers(objective, learn_std):
    """As tests/test_model_api.py's Bernoulli test: the hand-written local gradients of a
    model with Gaussian visible and latent layers equal autograd's on the same samples
    (log sigma included, some of them at the clamp)."""
    model = gaussian_model(
        [6, 5, 4, 3],
        ["gaussian", "gaussian", "bernoulli", "gaussian"],
        scale=1.5,
        log_std=(-1.0, 1.0),
        learn_std=learn_std,
    ).float()
    with torch.no_grad():
        if learn_std:  # one unit below the floor: its gradient must be 0, as through the clamp
            model.q_log_std_1[0] = -9.0
    manual = assert_manual_grads_equal_autograd(model, torch.randn(5, 6), 7, objective)
    assert any("log_std" in n for n in manual) == learn_std
    if learn_std:
        assert manual["q_log_std_1"][0] == 0


# --------------------------------------------------------------------------- Gaussian visible
def test_gaussian_visible_densities_normalise(gvis, grid2):
    """p(x) integrates to 1 over the grid; Z^2 = integral p~*(x) dx <= 1."""
    grid, area, log_px, log_pt = grid2
    assert torch.logsumexp(log_px, 0).exp().item() * area == pytest.approx(1.0, abs=1e-5)
    z2 = torch.logsumexp(log_pt, 0).exp().item() * area
    assert 0.05 < z2 < 0.99  # p* differs from p clearly


def test_gaussian_visible_estimators_converge_to_exact(gvis):
    """log p^ and log p~*^ with h ~ q approach the enumerated values within a few standard
    errors, computed exactly from the enumeration (as in test_model_exact.py)."""
    x = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-3.0, 1.0]], dtype=torch.float64)
    hidden = [h.double() for h in hidden_grid(gvis)]
    with torch.no_grad():
        hs = hs_for(gvis, x, hidden)
        log_pxh, log_qhx = gvis.log_p(hs), gvis.log_q(hs)
    log_px = torch.logsumexp(log_pxh, 1)
    log_pt = 2 * torch.logsumexp(0.5 * (log_pxh + log_qhx), 1)
    K = 20_000
    gen = torch.Generator().manual_seed(2)
    errors = {}
    for k in (1, 10, 100, K):
        est_p, est_pt = gvis.log_likelihood(x.repeat(8, 1), k, generator=gen)
        errors[k] = (est_p.view(8, -1).mean(0) - log_px).abs().max().item()
        if k == K:
            q = log_qhx.exp()
            for log_w, est, target, scale in (
                (log_pxh - log_qhx, est_p, log_px, 1.0),
                (0.5 * (log_pxh - log_qhx), est_pt, log_pt, 2.0),
            ):
                w = log_w.exp()
                rel_var = (q * w * w).sum(1) / (q * w).sum(1) ** 2 - 1
                tol = scale * (5 * torch.sqrt(rel_var / (8 * K)) + rel_var / (2 * K)) + 1e-4
                err = (est.view(8, -1).mean(0) - target).abs()
                assert bool((err < tol).all()), f"errors {err}, tolerances {tol}"
    print("max |log p^ - log p| by K:", {k: round(v, 4) for k, v in errors.items()})
    assert errors[1] > errors[100] > errors[K]  # the bound tightens as K grows


def test_gaussian_visible_log_z2_matches_the_integral(gvis, grid2):
    grid, area, _, log_pt = grid2
    exact = (torch.logsumexp(log_pt, 0) + math.log(area)).item()
    value, sem = gvis.estimate_log_z2(40_000, inner=10, generator=torch.Generator().manual_seed(3))
    print(f"2 log Z: estimate {value:.4f} +- {sem:.4f}, quadrature {exact:.4f}")
    assert 0 < sem < 0.05
    assert abs(value - exact) < 5 * sem + 2e-3


def test_gaussian_visible_training_gradient_approaches_exact(gvis):
    """The BiHM estimator's mean gradient -> grad log p~*(x) for all parameters, log sigma
    included; K = 1 is visibly biased, so the test can tell."""
    model = gvis
    x = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=torch.float64)
    model.zero_grad()
    exact_log_px_and_ptilde(model, x)[1].mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert ref["p_log_std_0"].abs().sum() > 0

    def rel_error(K, repeats, seed):
        model.zero_grad()
        out = model.loss(x.repeat(repeats, 1), K, generator=torch.Generator().manual_seed(seed))
        (-out.loss).backward()
        num = sum(((p.grad - ref[n]) ** 2).sum() for n, p in model.named_parameters())
        return math.sqrt(num / sum((g**2).sum() for g in ref.values()))

    errors = {K: rel_error(K, 2000, K) for K in (1, 500)}
    model.zero_grad()
    print("relative gradient error by K:", errors)
    assert errors[500] < 0.03
    assert errors[1] > 3 * errors[500]


def test_gibbs_with_gaussian_visible_samples_pstar(gvis, grid2):
    """Block Gibbs on a Gaussian visible layer: the chains' mean and second moments of x match
    p*(x) = p~*(x) / Z^2 on the grid, and differ clearly from those of p(x)."""
    model = gvis.float()
    grid, area, log_px, log_pt = grid2
    moments = {}
    for name, log_dens in (("p", log_px), ("pstar", log_pt)):
        w = torch.softmax(log_dens, 0)[:, None]
        moments[name] = torch.cat([(w * grid).sum(0), (w * grid**2).sum(0)])
    gen = torch.Generator().manual_seed(5)
    hs = model.sample_p(1000, generator=gen)
    samples = []
    for step in range(20):
        hs = model.gibbs_step(hs, proposals=10, inner=50, generator=gen)
        if step >= 8:
            samples.append(hs[0].double())
    xs = torch.cat(samples)
    empirical = torch.cat([xs.mean(0), (xs**2).mean(0)])
    print("moments p*, Gibbs, p:", moments["pstar"], empirical, moments["p"])
    gap = (moments["p"] - moments["pstar"]).abs().max().item()
    assert gap > 0.3
    assert (empirical - moments["pstar"]).abs().max().item() < 0.15 * gap
    model.double()


def test_inpainting_with_gaussian_visible_keeps_observed_values(gvis):
    model = gvis.float()
    gen = torch.Generator().manual_seed(6)
    x = torch.tensor([[0.7, -0.2]]).expand(50, -1).contiguous()
    mask = torch.tensor([1.0, 0.0]).expand(50, -1).contiguous()
    out = model.inpaint(x, mask, steps=3, proposals=5, inner=5, generator=gen)
    assert bool((out[:, 0] == 0.7).all()) and out[:, 1].std() > 0
    model.double()


# --------------------------------------------------------------------------- Gaussian latent
@pytest.fixture(scope="module")
def glat():
    """Binary x (3 pixels), a 1-unit Gaussian h_1, binary h_2 (2 units); q is fair."""
    return gaussian_model([3, 1, 2], ["bernoulli", "gaussian", "bernoulli"], scale=1.5, seed=1)


@pytest.fixture(scope="module")
def glat_wild():
    """As glat, with weights for which p* and p differ clearly (TV ~0.4)."""
    return gaussian_model([3, 1, 2], ["bernoulli", "gaussian", "bernoulli"], scale=1.5, seed=3)


def glat_exact(model, xs):
    """log p(x) and log p~*(x) by quadrature over h_1 and enumeration of h_2."""
    t = torch.linspace(-25, 25, 4001, dtype=torch.float64)
    dt = math.log(float(t[1] - t[0]))
    h2 = all_binary(2).double()
    h1 = t[:, None].repeat_interleave(4, 0)
    h2 = h2.repeat(t.numel(), 1)
    X, H = xs.shape[0], h1.shape[0]
    with torch.no_grad():
        hs = [xs[:, None, :].expand(X, H, -1), h1[None].expand(X, H, -1), h2[None].expand(X, H, -1)]
        log_pxh, log_qhx = model.log_p(hs), model.log_q(hs)
    log_px = torch.logsumexp(log_pxh, 1) + dt
    log_pt = 2 * (torch.logsumexp(0.5 * (log_pxh + log_qhx), 1) + dt)
    return log_px, log_pt


def test_gaussian_latent_estimators_converge_as_K_grows(glat):
    xs = all_binary(3).double()
    log_px, log_pt = glat_exact(glat, xs)
    assert torch.logsumexp(log_px, 0).item() == pytest.approx(0.0, abs=1e-6)  # quadrature ok
    gen = torch.Generator().manual_seed(7)
    err_p, err_pt = {}, {}
    for K, repeats in ((1, 400), (10, 400), (100, 100), (10_000, 20)):
        est_p, est_pt = glat.log_likelihood(xs.repeat(repeats, 1), K, generator=gen)
        err_p[K] = (log_px - est_p.view(repeats, -1).mean(0)).mean().item()
        err_pt[K] = (log_pt - est_pt.view(repeats, -1).mean(0)).mean().item()
    print("mean gap to exact, log p:", err_p, "log p~*:", err_pt)
    for err in (err_p, err_pt):
        # Stochastic lower bounds: the gap shrinks towards 0 as K grows (up to noise).
        assert err[1] > err[10] > err[100] > err[10_000] - 0.01
        assert abs(err[10_000]) < 0.02


def test_gibbs_with_gaussian_latent_samples_pstar(glat_wild):
    """Proposals for the Gaussian h_1 come from p(h_1 | h_2) and q(h_1 | x), as for binary
    layers; the chains' x follows p*(x) (TV < 0.05) while p(x) is clearly different."""
    xs = all_binary(3).double()
    log_px, log_pt = glat_exact(glat_wild, xs)
    pstar = torch.softmax(log_pt, 0).float()
    px = log_px.exp().float()
    model = glat_wild.float()
    gen = torch.Generator().manual_seed(8)
    hs = model.sample_p(2000, generator=gen)
    counts = torch.zeros(8)
    for step in range(20):
        hs = model.gibbs_step(hs, proposals=10, inner=50, generator=gen)
        if step >= 10:
            counts += torch.bincount(binary_index(hs[0]), minlength=8)
    empirical = counts / counts.sum()
    tv = 0.5 * (empirical - pstar).abs().sum().item()
    tv_p = 0.5 * (px - pstar).abs().sum().item()
    print(f"Gibbs TV to p*: {tv:.4f}; TV(p, p*) = {tv_p:.4f}")
    model.double()
    assert tv_p > 0.1
    assert tv < 0.05


def test_checkpoint_round_trip_keeps_families(tmp_path):
    model = gaussian_model([4, 3, 2], ["gaussian", "bernoulli", "gaussian"], learn_std=False)
    model.float().save(tmp_path / "m.pt")
    loaded = BiHM.load(tmp_path / "m.pt")
    assert loaded.families == ["gaussian", "bernoulli", "gaussian"] and not loaded.learn_std
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
