"""optim.l1 / optim.l2 (a coupled penalty on the weight matrices only) and the optimizer
settings that a `--resume` changes: each takes effect from the first resumed step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from pipeline.config import config_from_dict
from pipeline.train import run_training
from tests.conftest import STEPS_PER_EPOCH, make_shards, tiny_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


class FirstStepGrads(Callback):
    """The (all-reduced) gradients and weights of the first optimizer step of this fit."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.Tensor] = {}
        self.global_step: int | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.global_step is not None:
            return
        self.global_step = trainer.global_step
        for name, p in pl_module.model.named_parameters():
            self.grads[name] = p.grad.detach().clone()
            self.params[name] = p.detach().clone()


def _first_step(shards, run_dir, **optim) -> FirstStepGrads:
    raw = tiny_config(shards, run_dir, train={"max_epochs": 1}, optim={"lr": 0.01, **optim})
    raw["validation"]["gibbs"]["every_n_epochs"] = 0
    raw["samples"]["every_n_epochs"] = 0
    cb = FirstStepGrads()
    run_training(config_from_dict(raw), extra_callbacks=[cb])
    return cb


def _weight_names(params) -> set[str]:
    return {n for n in params if n.startswith(("p_nets.", "q_nets.")) and n.endswith(".weight")}


def test_l1_l2_add_their_gradient_to_weight_matrices_only(shards, tmp_path):
    """Same batch, same draws (seeded by the global step): the penalized gradient minus the
    plain one is exactly d/dW (l2 sum W^2 + l1 sum |W|) on W^p and W^q, and 0 elsewhere."""
    l1, l2 = 3e-3, 5e-2
    plain = _first_step(shards, tmp_path / "plain")
    pen = _first_step(shards, tmp_path / "pen", l1=l1, l2=l2)
    weights = _weight_names(plain.params)
    assert weights and set(plain.params) - weights  # biases and the top prior exist too
    for name, g in plain.grads.items():
        w = plain.params[name]
        assert torch.equal(w, pen.params[name]), name  # same init
        expected = 2 * l2 * w + l1 * torch.sign(w) if name in weights else torch.zeros_like(w)
        # Both sides in float32: the difference of two sums of the same float32 terms.
        tol = 4 * torch.finfo(torch.float32).eps * (g.abs() + expected.abs()).max().item()
        torch.testing.assert_close(pen.grads[name] - g, expected, rtol=0, atol=tol + 1e-12)


def test_weight_matrices_leave_out_label_node_and_gaussian_scales():
    from bihm.model import BiHM

    model = BiHM(
        [784, 6, 5, 4], families=["bernoulli", "gaussian", "bernoulli", "bernoulli"], n_classes=3
    )
    chosen = {id(p) for p in model.weight_matrices()}
    names = {n for n, p in model.named_parameters() if id(p) in chosen}
    assert names == _weight_names(dict(model.named_parameters()))
    assert len(names) == 2 * model.n_latent
    left_out = {n for n, _ in model.named_parameters()} - names
    assert {
        "prior_logits",
        "label_logits",
        "label_prior",
        "q_label.weight",
        "q_log_std_1",
        "p_log_std_1",
        "p_nets.0.bias",
    } <= left_out


def _optimizer_groups(run_dir: Path) -> list[dict]:
    payload = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    (optimizer,) = payload["optimizer_states"]
    return optimizer["param_groups"]


@pytest.mark.parametrize(
    "key, value, group_key, expected",
    [
        ("betas", [0.5, 0.9], "betas", (0.5, 0.9)),
        ("eps", 1e-4, "eps", 1e-4),
        ("weight_decay", 1e-3, "weight_decay", 1e-3),
        ("lr", 2e-3, "lr", 2e-3),
        ("schedule", "exponential", "lr", 0.01 * 0.5**1),  # with gamma 0.5, at epoch 1
        ("switch", {"epoch": 1, "lr": 7e-3}, "lr", 7e-3),
    ],
)
def test_an_optimizer_setting_changed_on_resume_takes_effect(
    shards, tmp_path, key, value, group_key, expected
):
    raw = tiny_config(
        shards, tmp_path / "run", train={"max_epochs": 1}, optim={"lr": 0.01, "gamma": 0.5}
    )
    raw["validation"]["gibbs"]["every_n_epochs"] = 0
    raw["samples"]["every_n_epochs"] = 0
    run_training(config_from_dict(raw))
    raw["train"]["max_epochs"] = 2
    raw["optim"][key] = value
    run_training(config_from_dict(raw), resume=True)
    for group in _optimizer_groups(tmp_path / "run"):
        got = group[group_key]
        assert (tuple(got) if isinstance(got, list | tuple) else got) == pytest.approx(expected)


def test_a_penalty_changed_on_resume_takes_effect_at_the_first_resumed_step(shards, tmp_path):
    """Resume twice from the same epoch-0 checkpoint, with and without optim.l2: the first
    resumed step's gradients differ by exactly 2 l2 W on the weights."""
    import shutil

    raw = tiny_config(shards, tmp_path / "a", train={"max_epochs": 1}, optim={"lr": 0.01})
    raw["validation"]["gibbs"]["every_n_epochs"] = 0
    raw["samples"]["every_n_epochs"] = 0
    run_training(config_from_dict(raw))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    seen = {}
    for name, l2 in (("a", 0.0), ("b", 0.1)):
        cfg = dict(raw, run_dir=str(tmp_path / name))
        cfg["train"] = dict(raw["train"], max_epochs=2)
        cfg["optim"] = dict(raw["optim"], l2=l2)
        cb = FirstStepGrads()
        run_training(config_from_dict(cfg), resume=True, extra_callbacks=[cb])
        assert cb.global_step == STEPS_PER_EPOCH  # resumed, not started over
        seen[name] = cb
    a, b = seen["a"], seen["b"]
    for name in _weight_names(a.params):
        torch.testing.assert_close(
            b.grads[name] - a.grads[name], 0.2 * a.params[name], rtol=1e-4, atol=1e-6
        )
