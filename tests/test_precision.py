"""train.precision bf16-mixed: bf16 matmuls in the training step only; logits, log-probs,
gradients and the whole of validation stay fp32."""

from __future__ import annotations

import json

import torch

from bihm import BiHM
from pipeline.cli import main
from pipeline.config import config_from_dict
from pipeline.train import run_training
from tests.conftest import make_shards, read_metrics, tiny_config


def _grads(model: BiHM, x: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, dict, list]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model.loss(x, 6, generator=torch.Generator().manual_seed(4))
        hs = model.sample_q(x, 6, generator=torch.Generator().manual_seed(4))
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}, hs


def test_bf16_autocast_rounds_only_the_matmuls():
    """Under bf16 autocast the step's outputs and gradients are fp32 and within bf16
    rounding of the fp32 step. The samples are the same: x and h are exact in bf16, and with
    these seeds no uniform falls between a unit's fp32 and bf16 probability."""
    torch.manual_seed(0)
    model = BiHM([40, 12, 6])
    x = (torch.rand(8, 40, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    ref, ref_grads, ref_hs = _grads(model, x, bf16=False)
    out, grads, hs = _grads(model, x, bf16=True)
    for a, b in zip(hs, ref_hs, strict=True):
        assert torch.equal(a, b)
    assert out.loss.dtype == out.log_p.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: relative rounding 2^-9 per weight, ~0.4% per logit, and
    # p's gradients move by that much. d = log p - log q sums many rounded logits, so w~
    # moves by a few percent, and q's coefficient w~ - 1/K cancels: q's gradients move most
    # (8% here, noise far below that of K = 6 samples; the README's fp32-vs-bf16 runs show
    # that training reaches the same likelihood).
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-3, atol=0)
    for name, g in grads.items():
        assert g.dtype == torch.float32, name
        rel = (g - ref_grads[name]).abs().max() / ref_grads[name].abs().max()
        assert rel <= (0.01 if name.startswith(("p_nets", "prior")) else 0.15), name
    assert any(not torch.equal(g, ref_grads[n]) for n, g in grads.items())  # bf16 did run


def test_bf16_training_validates_in_fp32(tmp_path):
    """A bf16-mixed run's validation numbers are exactly those of an fp32 `bihm validate`
    of its checkpoint (same weights, same seeds): validation does not run under autocast."""
    shards = make_shards(tmp_path / "shards")
    run_dir = tmp_path / "run"
    cfg = tiny_config(shards, run_dir, train={"max_epochs": 1, "precision": "bf16-mixed"})
    cfg["validation"]["gibbs"]["every_n_epochs"] = 0
    cfg["samples"]["every_n_epochs"] = 0
    run_training(config_from_dict(cfg))
    row = read_metrics(run_dir)[-1]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "val.json"
    assert main(["validate", "--checkpoint", str(ckpt), "--json", str(out), "--no-progress"]) == 0
    fp32 = json.loads(out.read_text())
    for key in ("val/log_p", "val/log_ptilde_star", "val/two_log_z"):
        assert float(row[key]) == fp32[key], key
