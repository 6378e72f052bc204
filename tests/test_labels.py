"""The label node y against exact enumeration of x, h and y on a tiny model.

p(x, h, y) = p(y) p(h_L | y) prod_l p(h_l | h_{l+1}),  q(h, y | x) = q(h | x) q(y | h_{L-1}).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from bihm import BiHM
from bihm import evaluation as ev
from bihm import labels as label_node
from tests.exact import all_binary, hidden_grid

C = 3


@pytest.fixture(scope="module")
def model() -> BiHM:
    """Random p; q moved towards p's exact posterior over (h, y), so that the importance
    weights have moderate variance (tight tolerances) while q(h, y | x) != p(h, y | x)."""
    torch.manual_seed(0)
    model = BiHM([4, 3, 2], n_classes=C)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    model = model.double()
    with torch.no_grad():
        log_p = joint(model)[1]
        weight = log_p.exp()  # p(x, h, y): minimise E_p KL(p(h, y | x) || q(h, y | x))
    params = [*model.q_nets.parameters(), *model.q_label.parameters()]
    optimiser = torch.optim.Adam(params, lr=0.05)
    for _ in range(40):
        optimiser.zero_grad()
        _, _, log_q_h, log_q_y = joint(model)
        (-(weight * (log_q_h[..., None] + log_q_y)).sum()).backward()
        optimiser.step()
    model.zero_grad()
    return model


def joint(model):
    """log p(x, h, y) and log q(h | x), log q(y | h_{L-1}) for every (x, h, y): (X, H, C)."""
    xs = all_binary(model.layer_sizes[0]).double()
    hidden = [h.double() for h in hidden_grid(model)]
    X, H = xs.shape[0], hidden[0].shape[0]
    hs = [xs[:, None, :].expand(X, H, -1)] + [h[None].expand(X, H, -1) for h in hidden]
    log_p, log_q_y = [], []
    log_q_h = model.log_q(hs)
    for c in range(C):
        y = F.one_hot(torch.tensor(c), C).double().expand(X, H, C)
        log_p.append(model.log_p(hs, y))
        log_q_y.append(model.log_q(hs, y) - log_q_h)
    return xs, torch.stack(log_p, -1), log_q_h, torch.stack(log_q_y, -1)


@pytest.fixture(scope="module")
def exact(model):
    with torch.no_grad():
        xs, log_p, log_q_h, log_q_y = joint(model)
    sqrt_terms = 0.5 * (log_p + log_q_h[..., None])  # labelled: h ~ q(h | x) only
    return {
        "xs": xs,
        "log_p": log_p,
        "log_q_h": log_q_h,
        "log_q_y": log_q_y,
        "log_px": torch.logsumexp(log_p.flatten(1), 1),
        "log_pxy": torch.logsumexp(log_p, 1),  # (X, C)
        "log_pt_x": 2 * torch.logsumexp((sqrt_terms + 0.5 * log_q_y).flatten(1), 1),
        "log_pt_xy": 2 * torch.logsumexp(sqrt_terms, 1),
        "log_pstar_y": torch.log_softmax(torch.logsumexp(sqrt_terms + 0.5 * log_q_y, 1), -1),
        "log_q_yx": torch.logsumexp(log_q_h[..., None] + log_q_y, 1),
    }


def test_joint_is_normalised(exact):
    assert torch.logsumexp(exact["log_p"].flatten(), 0).item() == pytest.approx(0, abs=1e-9)
    log_q = exact["log_q_h"][..., None] + exact["log_q_y"]
    torch.testing.assert_close(torch.logsumexp(log_q.flatten(1), 1), torch.zeros(16).double())


def test_estimators_with_and_without_labels_converge_to_exact(model, exact):
    """y missing: log p(x), log p~*(x) with y summed out; y given: log p(x, y), log p~*(x, y).
    Tolerance: 5 standard errors plus the Jensen bias, both exact from the enumeration."""
    xs, K, R = exact["xs"], 20_000, 2
    gen = torch.Generator().manual_seed(1)
    rows, labels = torch.arange(16), torch.arange(16) % C
    log_q_hy = exact["log_q_h"][..., None] + exact["log_q_y"]
    d_missing = (exact["log_p"] - log_q_hy).flatten(1), log_q_hy.flatten(1)
    d_given = (
        (exact["log_p"] - exact["log_q_h"][..., None])[rows, :, labels],
        exact["log_q_h"],
    )
    for y, (d, log_q), target_p, target_pt in (
        (torch.full((16,), -1), d_missing, exact["log_px"], exact["log_pt_x"]),
        (labels, d_given, exact["log_pxy"][rows, labels], exact["log_pt_xy"][rows, labels]),
    ):
        est = model.estimates(xs.repeat(R, 1), K, generator=gen, y=y.repeat(R))
        for a, value, target in ((1.0, est.log_p, target_p), (0.5, est.log_ptilde_star, target_pt)):
            w, q = (a * d).exp(), log_q.exp()
            rel_var = (q * w * w).sum(1) / (q * w).sum(1) ** 2 - 1
            tol = (1 / a) * (5 * torch.sqrt(rel_var / (K * R)) + rel_var / (2 * K)) + 1e-4
            err = (value.view(R, -1).mean(0) - target).abs()
            assert bool((err < tol).all()), f"errors {err}, tolerances {tol}"
    # With few samples the bound is visibly loose: the test can tell.
    loose = model.estimates(xs, 1, generator=gen, y=torch.full((16,), -1)).log_p
    assert (exact["log_px"] - loose).mean() > 0.1


def test_classify_converges_to_exact_q_and_pstar_posteriors(model, exact):
    gen = torch.Generator().manual_seed(2)
    log_q_yx, log_pstar = model.classify(exact["xs"], 20_000, generator=gen)
    torch.testing.assert_close(log_q_yx.exp(), exact["log_q_yx"].exp(), atol=0.01, rtol=0)
    torch.testing.assert_close(log_pstar.exp(), exact["log_pstar_y"].exp(), atol=0.01, rtol=0)
    # p*(y | x) is not q(y | x) here: the comparison above tells them apart.
    assert (exact["log_pstar_y"].exp() - exact["log_q_yx"].exp()).abs().max() > 0.05
    few = model.classify(exact["xs"], 1, generator=gen)[1].exp()
    assert (few - exact["log_pstar_y"].exp()).abs().max() > 0.05


@pytest.mark.parametrize("objective", ["bihm", "rws"])
def test_manual_gradients_equal_autograd_with_a_label_node(objective):
    """Mixed labelled and unlabelled rows: the hand-written gradients (label parameters
    included) equal autograd's of the same surrogate on the same draws."""
    torch.manual_seed(3)
    model = BiHM([8, 5, 4], n_classes=C)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 2.0)
    x = (torch.rand(5, 8) < 0.5).float()
    y = torch.tensor([0, -1, 2, -1, 1])
    K = 6
    model.zero_grad()
    out = model.loss(x, K, objective, generator=torch.Generator().manual_seed(9), y=y)
    out.loss.backward()
    manual = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert {"label_logits", "label_prior", "q_label.weight", "q_label.bias"} <= set(manual)

    model.zero_grad()
    gen = torch.Generator().manual_seed(9)  # the same draws: q pass, then the labels
    with torch.no_grad():
        hs = model._q_pass(x, K, gen)[0]
        lab = label_node.draw(model, hs[-2], y, gen)
    onehot, observed = lab.onehot, lab.observed
    log_p = model.log_p(hs, onehot)
    log_q_h = model.log_q(hs)
    log_q_y = model.log_q(hs, onehot) - log_q_h
    d = (log_p - log_q_h - (1 - observed) * log_q_y).detach()
    w = torch.softmax(d / 2 if objective == "bihm" else d, -1)
    c = w - 1 / K if objective == "bihm" else w
    surrogate = (
        (w * log_p).sum(-1)
        + (c * (log_q_h + (1 - observed) * log_q_y)).sum(-1)
        + (w * observed * log_q_y).sum(-1)
    )
    reference = -surrogate.mean()
    reference.backward()
    torch.testing.assert_close(out.loss.detach(), reference.detach(), rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(manual[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_training_gradient_approaches_exact_for_labelled_and_unlabelled(model, exact):
    """Unlabelled x: BiHM's mean gradient -> grad log p~*(x) (y summed out) for every
    parameter. Labelled (x, y): p and q(h | x) -> grad log p~*(x, y), and q(y | h_{L-1})
    -> its wake update sum_h pi(h) grad log q(y | h_{L-1}), pi(h) ~ sqrt(p(x, h, y) q(h | x))."""
    x_idx, labels = torch.tensor([3, 9, 14]), torch.tensor([1, 0, 2])
    x = exact["xs"][x_idx]

    def exact_grad(objective):
        model.zero_grad()
        objective().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    def target_unlabelled():
        _, log_p, log_q_h, log_q_y = joint(model)
        t = 0.5 * (log_p + log_q_h[..., None] + log_q_y)
        return (2 * torch.logsumexp(t.flatten(1), 1))[x_idx].mean()

    def target_labelled():
        _, log_p, log_q_h, log_q_y = joint(model)
        t = 0.5 * (log_p + log_q_h[..., None])[x_idx, :, labels]  # (3, H)
        pi = torch.softmax(t, 1).detach()
        wake = (pi * log_q_y[x_idx, :, labels]).sum(1)
        return (2 * torch.logsumexp(t, 1) + wake).mean()

    for y, target in ((torch.full((3,), -1), target_unlabelled), (labels, target_labelled)):
        ref = exact_grad(target)
        errors = {}
        for K in (1, 1000):
            model.zero_grad()
            out = model.loss(
                x.repeat(500, 1), K, generator=torch.Generator().manual_seed(K), y=y.repeat(500)
            )
            (-out.loss).backward()
            num = sum(((p.grad - ref[n]) ** 2).sum() for n, p in model.named_parameters())
            errors[K] = math.sqrt(num / sum((g**2).sum() for g in ref.values()))
        print("labelled" if y[0] >= 0 else "unlabelled", errors)
        assert errors[1000] < 0.03
        assert errors[1] > 3 * errors[1000]
    model.zero_grad()


def test_ancestral_samples_and_log_z2_with_labels(model, exact):
    """p(x, h, y) sampling and Eq. 7 with y latent: 2 log Z = log sum_x p~*(x)."""
    value, sem = model.estimate_log_z2(
        100_000, inner=10, generator=torch.Generator().manual_seed(4)
    )
    z2 = torch.logsumexp(exact["log_pt_x"], 0).item()
    print(f"2 log Z: {value:.4f} +- {sem:.4f}, exact {z2:.4f}")
    assert abs(value - z2) < 5 * sem + 2e-3


def test_bad_labels_are_rejected(model):
    x = torch.zeros(2, 4).double()
    with pytest.raises(ValueError, match="labels must be in"):
        model.loss(x, 2, y=torch.tensor([0, C]))
    with pytest.raises(ValueError, match="integer labels of shape"):
        model.loss(x, 2, y=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="no label node"):
        BiHM([4, 3]).loss(x.float(), 2, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="label node is not implemented"):
        model.gibbs_step(model.sample_p(2), proposals=2, inner=2)
    with pytest.raises(ValueError, match="n_classes"):
        BiHM([4, 3], n_classes=-1)


# --------------------------------------------------------------------------- classification errors
def random_label_model(seed: int, scale: float) -> BiHM:
    """A float64 model with a label node and random weights (q not fitted to p)."""
    torch.manual_seed(seed)
    model = BiHM([4, 3, 2], n_classes=C)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model.double()


def exact_class_posteriors(model: BiHM, K: int) -> dict[str, tuple[Tensor, Tensor]]:
    """For every x: the exact q(y | x) and p*(y | x), each with the standard error of
    `BiHM.classify`'s estimate from K samples h_k ~ q(h | x), (X, C) each:

        q(y | x)  = E_q q(y | h),                     SE^2 = Var_q q(y | h) / K
        p*(y | x) = E_q s(h, y) / E_q S(h),           SE^2 = E_q (s - p* S)^2 / (K (E_q S)^2)
        s(h, y) = sqrt(p(x, h, y) q(y | h) / q(h | x)),   S(h) = sum_y s(h, y)

    (the second a ratio estimator, its standard error by the delta method)."""
    with torch.no_grad():
        _, log_p, log_q_h, log_q_y = joint(model)
    w = log_q_h.exp()[..., None]  # q(h | x), (X, H, 1)
    q_y = log_q_y.exp()
    q = (w * q_y).sum(1)
    q_se = ((w * (q_y - q[:, None]) ** 2).sum(1) / K).sqrt()
    s = (0.5 * (log_p + log_q_y - log_q_h[..., None])).exp()
    S = s.sum(-1, keepdim=True)
    mean_S = (w * S).sum(1)  # (X, 1)
    pstar = (w * s).sum(1) / mean_S
    p_se = ((w * (s - pstar[:, None] * S) ** 2).sum(1) / K).sqrt() / mean_S
    return {"q": (q, q_se), "pstar": (pstar, p_se)}


def clear_argmax(probs: Tensor, se: Tensor, z: float = 5.0) -> Tensor:
    """Inputs whose exact argmax leads every other class by z standard errors of the
    difference (at most the sum of the two SEs): the estimate's argmax is then the exact
    one but with probability ~1e-6."""
    top = probs.argmax(-1, keepdim=True)
    lead = probs.gather(-1, top) - probs
    room = z * (se.gather(-1, top) + se)
    others = torch.ones_like(probs, dtype=torch.bool).scatter(-1, top, False)
    return ((lead > room) | ~others).all(-1)


def test_classification_errors_equal_their_exact_values():
    """`classification_errors` counts the argmax errors of q(y | x) and of p*(y | x), each its
    own: with a random q, the exact q(y | x) and p*(y | x) pick different classes for most
    inputs, and the labels are chosen so that the two exact counts differ."""
    K = 40_000
    model = random_label_model(seed=1, scale=1.0)
    post = exact_class_posteriors(model, K)
    xs = all_binary(model.layer_sizes[0]).double()
    keep = clear_argmax(*post["q"]) & clear_argmax(*post["pstar"])
    best_q, best_p = post["q"][0].argmax(-1)[keep], post["pstar"][0].argmax(-1)[keep]
    assert keep.sum() >= 12 and (best_q != best_p).sum() >= 8
    # Inputs in even places are labelled by q's answer, in odd places by p*'s.
    y = torch.where(torch.arange(len(best_q)) % 2 == 0, best_q, best_p)
    expected = {"q": float((best_q != y).sum()), "pstar": float((best_p != y).sum())}
    assert expected["q"] != expected["pstar"] and min(expected.values()) > 0
    idx = torch.arange(len(y)) + 500
    errors = ev.classification_errors(model, xs[keep], y, idx, K, seed=4)
    assert errors == {"n": float(len(y)), **expected}


def _errors_by_batches(model, x, y, idx, K, seed, batch):
    total = {"n": 0.0, "q": 0.0, "pstar": 0.0}
    for i in range(0, x.shape[0], batch):
        part = ev.classification_errors(
            model, x[i : i + batch], y[i : i + batch], idx[i : i + batch], K, seed
        )
        total = {k: total[k] + part[k] for k in total}
    return total


@pytest.mark.parametrize("K", [1, 3])
def test_classification_errors_do_not_depend_on_batches_or_order(K):
    """Example idx[i]'s samples come from its own streams (seed, CLASSIFY, K, idx[i]): the
    summed errors over one-example batches, the whole batch and shuffled batches of 3 and
    7 are equal. A near-chance model (small weights, p*(y | x) close to uniform) makes each
    error depend on the samples, so streams keyed otherwise would change the sums. float64:
    an argmax moves only on a tie within float64 rounding."""
    model = random_label_model(seed=2, scale=0.3)
    gen = torch.Generator().manual_seed(0)
    n = 60
    x = (torch.rand(n, 4, generator=gen) < 0.5).double()
    y = torch.randint(0, C, (n,), generator=gen)
    idx = torch.arange(n) + 1000
    whole = _errors_by_batches(model, x, y, idx, K, 7, n)
    assert 0.4 < whole["pstar"] / n < 0.9  # near chance (2/3)
    perm = torch.randperm(n, generator=gen)
    for batch in (1, 3, 7):
        xs, ys, ids = (x, y, idx) if batch == 1 else (x[perm], y[perm], idx[perm])
        assert _errors_by_batches(model, xs, ys, ids, K, 7, batch) == whole, batch
    # The counts do depend on the samples: another seed gives others.
    assert _errors_by_batches(model, x, y, idx, K, 8, n) != whole
