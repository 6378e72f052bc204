"""The BiHM's public API: shapes, initialisation, seeding and bad input (checkpoints:
test_checkpoint.py)."""

from __future__ import annotations

import math

import pytest
import torch

from bihm import BiHM
from tests.exact import assert_manual_grads_equal_autograd

PAPER_SIZES = [784, 300, 200, 100, 75, 50, 35, 30, 25, 20, 15, 10, 10]


def binary(*shape, seed=0):
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.5).float()


def test_paper_model_structure_and_authors_initialisation():
    model = BiHM(PAPER_SIZES)
    assert model.n_latent == 12
    assert (
        sum(p.numel() for p in model.parameters())
        == 2 * 331_050 + sum(PAPER_SIZES[:-1]) + sum(PAPER_SIZES[1:]) + PAPER_SIZES[-1]
    )
    # The top prior is learned and starts at bias -1, like every other bias.
    assert model.prior_logits.requires_grad
    assert bool((model.prior_logits == -1).all())
    for net in [*model.p_nets, *model.q_nets]:
        n_out, n_in = net.weight.shape
        bound = math.sqrt(6) / math.sqrt(n_in + n_out) / n_in
        assert bool((net.bias == -1).all())
        assert net.weight.abs().max().item() <= bound
        # Uniform on [-bound, bound]: the largest draw is close to the bound, not far inside.
        assert net.weight.abs().max().item() > 0.9 * bound


def test_shapes_with_free_leading_dims():
    model = BiHM([8, 5, 3])
    x = binary(2, 4, 8)
    hs = model.sample_q(x, K=6)
    assert [tuple(h.shape) for h in hs] == [(2, 4, 6, 8), (2, 4, 6, 5), (2, 4, 6, 3)]
    assert torch.equal(hs[0], x.unsqueeze(-2).expand(2, 4, 6, 8))
    assert model.log_p(hs).shape == (2, 4, 6)
    assert model.log_q(hs).shape == (2, 4, 6)
    hs_p = model.sample_p(7)
    assert [tuple(h.shape) for h in hs_p] == [(7, 8), (7, 5), (7, 3)]
    for h in hs + hs_p:
        assert bool(((h == 0) | (h == 1)).all())
    log_p, log_ps = model.log_likelihood(x, K=5)
    assert log_p.shape == log_ps.shape == (2, 4)
    assert bool((log_p < 0).all())
    ess = model.ess(x, K=9)
    assert ess.pstar.shape == ess.p.shape == (2, 4)
    assert bool(((ess.pstar >= 1 - 1e-5) & (ess.pstar <= 9 + 1e-5)).all())
    value, sem = model.estimate_log_z2(500, inner=3)
    assert value <= 0.5 and sem > 0


def test_loss_returns_finite_surrogate_and_detached_diagnostics():
    model = BiHM([8, 5, 3])
    out = model.loss(binary(16, 8), K=4)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for diag in (out.log_p, out.log_ptilde_star, out.ess):
        assert not diag.requires_grad and diag.ndim == 0
    assert 1 <= out.ess.item() <= 4
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_estimates_reduce_the_float32_log_weights_in_float64():
    """log p, log p~* and the ESS are the float64 formulas applied to the float32 log
    weights d of the same draws. The ESS exp(2 S_a - S_2a) is a few nats left of S's the
    size of log p(x, h) (~500 nats here): float32 S would put it 1.5 ulps of |S| (relative
    ~5e-5) away; float64 S leaves only float64 rounding (1e-12 is ~1e4 ulps of room)."""
    torch.manual_seed(0)
    model = BiHM([784, 12, 6])
    x = binary(10, 784)
    K = 50
    est = model.estimates(x, K, generator=torch.Generator().manual_seed(2))
    d = model._log_weights(x, K, torch.Generator().manual_seed(2))  # the same draws
    assert d.dtype == torch.float32 and d.abs().min() > 100
    S = {a: torch.logsumexp(a * d.double(), -1) for a in (0.5, 1.0, 2.0)}
    exact = {
        "log_p": S[1.0] - math.log(K),
        "log_ptilde_star": 2 * (S[0.5] - math.log(K)),
        "ess_pstar": torch.exp(2 * S[0.5] - S[1.0]),
        "ess_p": torch.exp(2 * S[1.0] - S[2.0]),
    }
    for name, value in exact.items():
        torch.testing.assert_close(getattr(est, name).double(), value, rtol=1e-12, atol=0)


@pytest.mark.parametrize("objective", ["bihm", "rws"])
@pytest.mark.parametrize("labels", [False, True])
def test_loss_diagnostics_are_the_estimators_on_the_same_draws(objective, labels):
    """The training step reports log p, log p~* and the ESS of its own weights from its K
    draws; `estimates` with the same generator draws the same h (and y) and must give the
    same batch means: log p = mean(logsumexp d - log K), log p~* = mean(2 (logsumexp d/2 -
    log K)), ESS of d/2 (BiHM) or of d (RWS). float64 throughout, so the two differ only by
    the order of a few float64 sums (1e-12 relative is ~1e4 ulps of room)."""
    torch.manual_seed(5)
    model = BiHM([10, 6, 4], n_classes=3 if labels else 0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.5)
    model = model.double()
    x = binary(12, 10).double()
    y = torch.tensor([0, -1, 2, 1, -1, -1, 2, 0, 1, -1, 0, 2]) if labels else None
    K = 7
    out = model.loss(x, K, objective, generator=torch.Generator().manual_seed(3), y=y)
    est = model.estimates(x, K, generator=torch.Generator().manual_seed(3), y=y)
    ess = est.ess_pstar if objective == "bihm" else est.ess_p
    for got, want in (
        (out.log_p, est.log_p.mean()),
        (out.log_ptilde_star, est.log_ptilde_star.mean()),
        (out.ess, ess.mean()),
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # log p~* < log p strictly here (the weights vary), so a wrong scale could not hide.
    assert float(out.log_ptilde_star) < float(out.log_p) - 0.1


def test_same_seed_same_samples():
    model = BiHM([8, 5, 3])
    x = binary(3, 8)
    a = model.log_likelihood(x, K=20, generator=torch.Generator().manual_seed(7))
    b = model.log_likelihood(x, K=20, generator=torch.Generator().manual_seed(7))
    c = model.log_likelihood(x, K=20, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_logits_are_clamped_like_the_authors_clip():
    """A unit with an enormous logit keeps a finite log-probability of about log(1e-6)."""
    model = BiHM([2, 1])
    with torch.no_grad():
        model.prior_logits.fill_(1e4)
    hs = [torch.zeros(1, 2), torch.zeros(1, 1)]
    assert model.log_p(hs).item() > -40
    assert torch.isfinite(model.log_p(hs))


def test_the_clamp_is_exactly_the_authors_clip_at_1e_6():
    """sigmoid(a) clipped to [1e-6, 1 - 1e-6]: log-probabilities of a saturated unit are
    exactly log(1e-6) and log(1 - 1e-6), and unsaturated units are untouched."""
    from bihm.families import log_bernoulli

    big = torch.tensor([[1e4], [-1e4], [3.0]])
    on, off = torch.ones(3, 1), torch.zeros(3, 1)
    expected_on = torch.tensor([math.log1p(-1e-6), math.log(1e-6), -math.log1p(math.exp(-3))])
    torch.testing.assert_close(log_bernoulli(on, big), expected_on, rtol=1e-5, atol=1e-7)
    expected_off = torch.tensor([math.log(1e-6), math.log1p(-1e-6), -math.log1p(math.exp(3))])
    torch.testing.assert_close(log_bernoulli(off, big), expected_off, rtol=1e-5, atol=1e-7)


def test_bihm_q_gradient_is_exactly_zero_with_one_sample():
    """With K = 1, w~ = 1 and the q coefficient w~ - 1/K is 0: q learns nothing (the -1/K
    baseline of Algorithm 1), while p and RWS's q do."""
    torch.manual_seed(0)
    model = BiHM([12, 6, 3])
    x = binary(5, 12)
    model.loss(x, K=1, objective="bihm").loss.backward()
    for name, param in model.named_parameters():
        if name.startswith("q_nets"):
            assert torch.count_nonzero(param.grad) == 0, name
        else:
            assert torch.count_nonzero(param.grad) > 0, name
    model.zero_grad()
    model.loss(x, K=1, objective="rws").loss.backward()
    assert all(torch.count_nonzero(p.grad) > 0 for p in model.q_nets.parameters())


def test_standard_errors_use_n_minus_1():
    """mean_and_sem and log_mean_and_sem against the textbook formulas (ddof = 1)."""
    from bihm.evaluation import mean_and_sem
    from bihm.logspace import log_mean_and_sem

    v = [1.0, 2.0, 4.0, 7.0]
    mean, sem = mean_and_sem(sum(v), sum(x * x for x in v), len(v))
    sd = math.sqrt(sum((x - 3.5) ** 2 for x in v) / 3)
    assert mean == pytest.approx(3.5) and sem == pytest.approx(sd / 2)
    # log mean(w) and its delta-method SE: sd(w) / (sqrt(n) mean(w)).
    w = torch.tensor(v, dtype=torch.float64)
    log_mean, log_sem = log_mean_and_sem(
        float(torch.logsumexp(w.log(), 0)), float(torch.logsumexp(2 * w.log(), 0)), len(v)
    )
    assert log_mean == pytest.approx(math.log(3.5))
    assert log_sem == pytest.approx(sd / (2 * 3.5))


@pytest.mark.parametrize(
    "sizes, match",
    [([], "layer_sizes"), ([784], "layer_sizes"), ([784, 0], "layer_sizes")],
)
def test_bad_layer_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        BiHM(sizes)


def test_bad_arguments_name_the_argument():
    model = BiHM([8, 5, 3])
    x = binary(4, 8)
    for K in (0, -3, 1.5):
        with pytest.raises(ValueError, match="K must be"):
            model.loss(x, K)
        with pytest.raises(ValueError, match="K must be"):
            model.log_likelihood(x, K)
    with pytest.raises(ValueError, match="n must be"):
        model.sample_p(0)
    with pytest.raises(ValueError, match="x must be binary"):
        model.loss(x * 0.5, 2)
    with pytest.raises(ValueError, match="last dimension 8"):
        model.sample_q(binary(4, 7), 2)
    with pytest.raises(ValueError, match="objective"):
        model.loss(x, 2, objective="vae")
    with pytest.raises(ValueError, match="mask must have the shape"):
        model.inpaint(x, torch.ones(4, 7), steps=1)
    with pytest.raises(ValueError, match="mask must be binary"):
        model.inpaint(x, torch.full((4, 8), 0.5), steps=1)
    with pytest.raises(ValueError, match="inner must be"):
        model.estimate_log_z2(10, inner=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda():
    model = BiHM([8, 5, 3]).cuda()
    x = binary(4, 8).cuda()
    out = model.loss(x, 3)
    out.loss.backward()
    assert model.log_likelihood(x, 7)[0].device.type == "cuda"


@pytest.mark.parametrize("objective", ["bihm", "rws"])
def test_manual_gradients_equal_autograd_of_the_surrogate(objective):
    """loss() computes the layer-local gradients by hand; on the very same samples they must
    equal autograd's gradient of -(sum_k w~_k log p + sum_k c_k log q) through log_p/log_q."""
    model = BiHM([12, 6, 4, 3])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 3.0)  # large weights: some logits hit the clamp
    assert_manual_grads_equal_autograd(model, binary(5, 12, seed=1), 7, objective)


def test_the_public_names_survive_the_split_into_modules():
    """`from bihm import ...`, the names that bihm.model held before it was split, and the
    model's methods are still there, and are the objects of the modules that now hold them."""
    import bihm
    import bihm.model
    from bihm import checkpoint, estimators, gibbs, logspace, objectives

    homes = {
        "BiHM": bihm.model,
        "ESS": estimators,
        "Estimates": estimators,
        "LossOutput": objectives,
        "log_mean_and_sem": logspace,
    }
    for name, home in homes.items():
        assert getattr(bihm, name) is getattr(home, name), name
    for name in bihm.model.__all__:
        assert hasattr(bihm.model, name), name
    assert bihm.model.CHECKPOINT_FORMAT == checkpoint.CHECKPOINT_FORMAT == "bihm.BiHM"
    methods = {
        "loss": objectives.loss,
        "estimates": estimators.estimates,
        "log_likelihood": estimators.log_likelihood,
        "ess": estimators.ess,
        "log_z2_terms": estimators.log_z2_terms,
        "estimate_log_z2": estimators.estimate_log_z2,
        "classify": estimators.classify,
        "gibbs_step": gibbs.gibbs_step,
        "sample_pstar": gibbs.sample_pstar,
        "reconstruct": gibbs.reconstruct,
        "inpaint": gibbs.inpaint,
        "save": checkpoint.save,
    }
    model = BiHM([6, 4, 3])
    for name, function in methods.items():
        assert getattr(model, name).__func__ is function, name
    for name in ("load", "from_payload"):
        assert getattr(BiHM, name).__func__ is getattr(checkpoint, name), name
    for name in ("sample_p", "sample_q", "log_p", "log_q", "weight_matrices", "reset_parameters"):
        assert callable(getattr(model, name)), name
