"""Exact distributed evaluation: 1 and 2 DDP processes give the same numbers; the eval JSON
schema; sample and inpaint pictures; BiHM.save files as checkpoints."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from bihm import evaluation as ev
from bihm import rng
from bihm.evaluation import combine_log_z2, log_z2_partial
from bihm.model import BiHM
from bihm.rng import Streams
from pipeline.cli import main
from pipeline.config import config_from_dict
from pipeline.train import run_training
from tests.conftest import make_shards, run_python, tiny_config
from tests.rounding import (
    assert_same_up_to_rounding,
    eval_tolerances,
    log_weight_rounding,
    validation_tolerances,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A checkpoint of the tiny model after one epoch on generated shards."""
    tmp = tmp_path_factory.mktemp("eval")
    # 129 examples in batches of 64: rank 0 gets 1 batch, rank 1 gets 2 (uneven on purpose).
    shards = make_shards(tmp / "shards", n_valid=129, n_test=129)
    cfg = tiny_config(shards, tmp / "run", train={"max_epochs": 1})
    cfg["validation"].update(z_samples=700, z_chunk=200)  # 4 chunks, the last one short
    run_training(config_from_dict(cfg))
    return tmp / "run" / "checkpoints" / "last.ckpt"


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = run_python(["-m", "pipeline.cli", *args], cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# --------------------------------------------------------------------------- unit level
def test_log_z_chunks_combine_exactly_across_any_rank_count():
    torch.manual_seed(0)
    model = BiHM([784, 12, 6])
    one = log_z2_partial(model, 1000, 5, 128, seed=7)
    three = torch.stack([log_z2_partial(model, 1000, 5, 128, 7, r, 3) for r in range(3)])
    z1, z3 = combine_log_z2(one, 1000), combine_log_z2(three, 1000)
    assert z1[0] == pytest.approx(z3[0], abs=1e-12) and z1[1] == pytest.approx(z3[1], rel=1e-9)
    # ... and it is the mean of the Eq. 7 terms, in log space.
    terms = torch.cat(
        [
            model.log_z2_terms(min(128, 1000 - c * 128), 5, generator=_gen(7, c)).double()
            for c in range(8)
        ]
    )
    assert z1[0] == pytest.approx(float(torch.logsumexp(terms, 0) - math.log(1000)), abs=1e-9)


def test_log_z_with_counter_based_streams_does_not_depend_on_the_chunk_size():
    """Compiled mode (counter-based streams): outer sample m draws from the stream
    (seed, LOG_Z, inner, m), so any chunk size and rank count give the mean of the same
    terms. (The compiled kernel draws the eager one's bits: tests/test_rng.py.)"""
    torch.manual_seed(0)
    # float64: the terms of one batch of 1000 and of chunks of 128 round alike (in float32
    # the BLAS's kernel by shape and CPU moved the mean by 1.3e-8 under AVX2 on a Xeon).
    model = BiHM([784, 12, 6]).double()
    rng.set_counter_based(True, compiled=False)  # the eager draw: no compilation here
    try:
        one = combine_log_z2(log_z2_partial(model, 1000, 5, 128, seed=7), 1000)
        parts = [log_z2_partial(model, 1000, 5, 300, 7, r, 2) for r in range(2)]
        other = combine_log_z2(torch.stack(parts), 1000)
    finally:
        rng.set_counter_based(False)
    assert other[0] == pytest.approx(one[0], abs=1e-12)
    streams = Streams.keyed("cpu", 7, ev.LOG_Z, 5, keys=range(1000))
    terms = model.log_z2_terms(1000, 5, generator=streams).double()
    assert one[0] == pytest.approx(float(torch.logsumexp(terms, 0) - math.log(1000)), abs=1e-9)


def _gen(seed, chunk):
    from bihm.rng import make_generator

    return make_generator("cpu", seed, ev.LOG_Z, chunk)


def _estimates(model, x, idx, K, seed, batch):
    parts = [
        ev.estimates(model, x[i : i + batch], idx[i : i + batch], K, seed)
        for i in range(0, x.shape[0], batch)
    ]
    return {
        name: torch.cat([getattr(p, name) for p in parts])
        for name in ("log_p", "log_ptilde_star", "ess_pstar", "ess_p")
    }


@pytest.mark.parametrize("K", [7, 1000])  # K = 1000: several rows per chunk and chunks per row
def test_per_example_estimates_do_not_depend_on_batch_size_or_order(K):
    torch.manual_seed(0)
    model = BiHM([784, 12, 6])
    x = (torch.rand(10, 784) < 0.3).float()
    idx = torch.arange(100, 110)
    ref = _estimates(model, x, idx, K, seed=3, batch=10)
    perm = torch.randperm(10)
    for batch in (1, 3, 7):
        got = _estimates(model, x[perm], idx[perm], K, seed=3, batch=batch)
        # The same samples; the matmuls' blocking may differ with the row count, so the
        # float32 log weights may round differently: by DELTA per example, which moves
        # log p and log p~* by DELTA and the ESS by a factor exp(4 DELTA) (tests/rounding.py).
        delta = log_weight_rounding(ref["log_ptilde_star"][perm])
        for name, value in got.items():
            want = ref[name][perm]
            tol = torch.expm1(4 * delta) * want if name.startswith("ess") else delta
            assert ((value - want).abs() <= tol).all(), (name, (value - want).abs().max())
    assert (ref["log_ptilde_star"] <= ref["log_p"] + 1e-9).all()
    assert ((1 <= ref["ess_p"]) & (ref["ess_p"] <= ref["ess_pstar"] + 1e-6)).all()
    assert (ref["ess_pstar"] <= K + 1e-6).all()
    # Another seed gives other samples.
    assert not torch.equal(ev.estimates(model, x, idx, K, seed=4).log_p, ref["log_p"])


# --------------------------------------------------------------------------- 1 vs 2 processes
def test_validation_metrics_from_two_ddp_processes_equal_one_process(trained, tmp_path):
    assert (
        main(
            [
                "validate",
                "--checkpoint",
                str(trained),
                "--json",
                str(tmp_path / "one.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    _run_cli(
        [
            "validate",
            "--checkpoint",
            str(trained),
            "--devices",
            "2",
            "--json",
            str(tmp_path / "two.json"),
            "--no-progress",
        ],
        tmp_path,
    )
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["val/n"] == 129.0  # every validation example exactly once
    assert {
        "val/log_p",
        "val/log_ptilde_star",
        "val/two_log_z",
        "val/log_pstar",
        "val/gibbs_error",
        "val/recon_error",
        "train_eval/log_p",
        "train_eval/log_ptilde_star",
        "train_eval/log_pstar",
        "gap/log_p",
        "gap/log_pstar",
    } <= one.keys()
    # As many training images as validation images, spread over the 800 (idx 0, 6, 12, ...).
    assert one["train_eval/n"] == 129.0
    # The same samples; float32 rounding may differ (see tests/rounding.py). 700: z_samples.
    assert_same_up_to_rounding(one, two, validation_tolerances(one, z_samples=700))
    # The training run validated the same weights with the same seeds: same numbers again.
    import csv

    with open(trained.parent.parent / "metrics.csv") as f:
        row = list(csv.DictReader(f))[-1]
    for key in ("val/log_p", "val/log_ptilde_star", "val/two_log_z"):
        assert float(row[key]) == pytest.approx(one[key], rel=1e-9), key


def test_eval_json_schema_and_two_processes(trained, tmp_path):
    common = [
        "eval",
        "--checkpoint",
        str(trained),
        "--split",
        "test",
        "--samples",
        "1,10,50",
        "--z-samples",
        "3000",
        "--z-chunk",
        "700",
        "--batch-size",
        "64",
        "--no-progress",
    ]
    assert main([*common, "--json", str(tmp_path / "one.json")]) == 0
    proc = _run_cli([*common, "--devices", "2", "--json", str(tmp_path / "two.json")], tmp_path)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    for key in ("log_p", "log_ptilde_star", "log_pstar"):
        assert list(one[key]) == ["1", "10", "50"]
        for entry in one[key].values():
            assert set(entry) == {"mean", "sem"} and entry["sem"] > 0
    assert set(one["two_log_z"]) == {"value", "sem", "n"} and one["two_log_z"]["n"] == 3000
    z_sem = one["two_log_z"]["sem"]
    for k in ("1", "10", "50"):  # log p* carries the standard errors of p~* and of 2 log Z
        assert one["log_pstar"][k]["sem"] == pytest.approx(
            math.hypot(one["log_ptilde_star"][k]["sem"], z_sem)
        )
        ess = one["ess"][k]  # fractions ESS / K; sqrt-weights are the flatter ones
        assert 0 < ess["p"] <= ess["pstar"] <= 1
    assert one["ess"]["1"] == {"p": 1.0, "pstar": 1.0}
    assert one["n_examples"] == 129 and (one["processes"], two["processes"]) == (1, 2)
    # Estimates tighten with K (stochastic lower bounds); log p* = log p~* - 2 log Z.
    means = [one["log_ptilde_star"][k]["mean"] for k in ("1", "10", "50")]
    assert means[0] < means[1] < means[2]
    for k in ("1", "10", "50"):
        assert one["log_pstar"][k]["mean"] == pytest.approx(
            one["log_ptilde_star"][k]["mean"] - one["two_log_z"]["value"]
        )
    # Batches of one example: the same samples per example, but the matmuls take the BLAS's
    # matrix-vector path, which rounds otherwise than the 64-row kernel: here the ESS
    # moved by 3e-6 (float32 log-sum-exps) or 7e-7 (float64), against rel_tol 1e-7 before.
    assert main([*common, "--batch-size", "1", "--json", str(tmp_path / "b1.json")]) == 0
    b1 = json.loads((tmp_path / "b1.json").read_text())
    one.pop("processes"), two.pop("processes"), b1.pop("processes")
    # The same samples; float32 rounding may differ (see tests/rounding.py).
    assert_same_up_to_rounding(one, two, eval_tolerances(one))
    assert_same_up_to_rounding(one, b1, eval_tolerances(one))
    assert "log p~*" in proc.stdout and "2 log Z" in proc.stdout  # the table, from rank 0 only
    assert proc.stdout.count("2 log Z") == 1


def test_classification_error_from_two_processes_equals_one_process(tmp_path):
    """A label node's test error, from q(y | x) and from p*(y | x), is reduced exactly
    across ranks: 129 labelled examples in batches of 64, dealt unevenly to 2 processes."""
    shards = make_shards(tmp_path / "shards", n_train=100, n_valid=50, n_test=129, labels=True)
    torch.manual_seed(0)
    model = BiHM([784, 16, 8], n_classes=10)
    with torch.no_grad():  # larger weights than at initialisation, and p(h_L | y) using y
        for param in model.parameters():
            param.mul_(4)
        model.label_prior.normal_(0, 2)
    model.save(tmp_path / "model.pt")
    common = ["eval", "--checkpoint", str(tmp_path / "model.pt"), "--split", "test"]
    common += ["--set", f"data.shard_dir={shards}", "--set", "train.accelerator=cpu"]
    common += ["--samples", "1,20", "--z-samples", "500", "--z-chunk", "200"]
    common += ["--batch-size", "64", "--no-progress"]
    assert main([*common, "--json", str(tmp_path / "one.json")]) == 0
    _run_cli([*common, "--devices", "2", "--json", str(tmp_path / "two.json")], tmp_path)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["n_examples"] == 129 and (one["processes"], two["processes"]) == (1, 2)
    errors = one["classification"]
    assert list(errors) == ["1", "20"]
    for err in errors.values():  # fractions of the 129 examples
        for kind in ("q", "pstar"):
            assert 0 <= err[kind] <= 1 and round(err[kind] * 129, 6) == int(round(err[kind] * 129))
    assert errors["20"]["q"] != errors["20"]["pstar"]  # p*(y | x) is not q's answer again
    one.pop("processes"), two.pop("processes")
    assert_same_up_to_rounding(one, two, eval_tolerances(one))  # error counts: equal


# --------------------------------------------------------------------------- pictures, files
def test_sample_and_inpaint_write_pictures(trained, tmp_path):
    out = tmp_path / "samples.png"
    args = "--n 9 --gibbs-steps 3 --proposals 10 --inner 3 --no-progress".split()
    assert main(["sample", "--checkpoint", str(trained), "--out", str(out), *args]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "inpaint.png"
    args = "--mask left --digits 3 --chains 2 --steps 2 --proposals 10 --inner 3 --no-progress"
    assert main(["inpaint", "--checkpoint", str(trained), "--out", str(out), *args.split()]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_accepts_a_bihm_save_file(trained, tmp_path):
    payload = torch.load(trained, weights_only=True)
    model = BiHM(payload["hyper_parameters"]["config"]["model"]["layers"])
    model.load_state_dict({k[len("model.") :]: v for k, v in payload["state_dict"].items()})
    model.save(tmp_path / "model.pt")
    shard_dir = payload["hyper_parameters"]["config"]["data"]["shard_dir"]
    args = [
        "eval",
        "--checkpoint",
        str(tmp_path / "model.pt"),
        "--set",
        f"data.shard_dir={shard_dir}",
        "--set",
        "train.accelerator=cpu",
        "--samples",
        "5",
        "--z-samples",
        "500",
        "--z-chunk",
        "500",
        "--no-progress",
    ]
    assert main([*args, "--json", str(tmp_path / "a.json")]) == 0
    args[2] = str(trained)
    assert main([*args, "--json", str(tmp_path / "b.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    a.pop("checkpoint"), b.pop("checkpoint")
    # Same weights, same seeds: the same numbers, but for rounding (the checkpoint's config
    # sets 1 CPU thread, the bare model's default config all cores: other BLAS blocking).
    assert_same_up_to_rounding(a, b, eval_tolerances(a))


def test_eval_on_a_non_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
