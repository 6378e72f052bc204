"""`bihm bench` runs and writes the JSON schema of the performance issue (no speed asserted:
speed goals live in benchmarks/results, not in timed tests)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench
from benchmarks.bench import autograd_loss
from bihm import BiHM, rng
from pipeline.cli import main
from tests.conftest import make_shards


def test_bench_writes_the_documented_json(tmp_path, capsys, monkeypatch):
    # The bf16 entries are measured only where bf16 is native; force that path here, so the
    # test does not depend on the CPU it runs on (emulated bf16 is slow, but this is small).
    monkeypatch.setattr(bench, "bf16_native", lambda device: True)
    out = tmp_path / "bench.json"
    shards = make_shards(tmp_path / "shards")
    args = ["--shards", str(shards), "--epoch-limit", "200"]
    # The comparison with compiled mode compiles the paper model: the slow test below.
    assert main(["bench", "--min-time", "0.05", *args, "--no-compiled", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "compiled" not in result
    assert {"cpu", "cores", "torch_threads", "torch"} <= set(result["machine"])
    assert result["matmul_gflops"] > 0
    for key in ("train_k10", "train_k100", "log_likelihood", "log_z2", "eval_k100"):
        w = result[key]
        assert w["samples_per_s"] > 0 and w["gflops"] > 0
        assert abs(w["ratio"] - w["gflops"] / w["matmul_gflops"]) < 1e-9
    assert result["gibbs"]["proposals_per_s"] > 0
    m = result["manual_vs_autograd"]
    assert m["manual_s"] > 0 and m["speedup"] == m["autograd_s"] / m["manual_s"]
    assert result["peak_mem_mb"] > 0
    e = result["epoch_paper"]
    assert e["train_s"] > 0 and e["val_s"] > 0 and e["epoch_s"] == e["train_s"] + e["val_s"]
    assert e["gibbs_s"] > 0 and e["samples_s"] > 0 and e["amortised_fraction"] > 0
    assert e["contention_slowdown"] == e["contention"]["epoch_s"] / e["epoch_s"]
    b = result["bf16"]
    assert b["native"] is True and b["matmul_gflops"] > 0
    w = b["train_k10"]
    assert w["samples_per_s"] > 0 and abs(w["ratio"] - w["gflops"] / w["matmul_gflops"]) < 1e-9
    be = b["epoch_paper"]
    assert be["train_s"] > 0 and be["val_s"] > 0 and be["epoch_s"] == be["train_s"] + be["val_s"]
    table = capsys.readouterr().out
    assert "train_k10" in table and "train_k10 bf16" in table and "bf16-mixed" in table
    # Where bf16 is emulated, the table says it was not measured; where torch.compile has
    # no backend, the table says why the comparison is missing.
    result["bf16"] = {"native": False}
    assert "bf16: not native" in bench.format_table(result)
    result["compiled"] = {"available": False, "reason": "no C++ compiler"}
    assert "compiled (train.compile: true): not measured: no C++ compiler" in bench.format_table(
        result
    )


@pytest.mark.slow
def test_bench_compares_compiled_with_eager_in_the_same_run(tmp_path, capsys):
    """The `compiled` entry: the training steps, the validation batch and the epoch again
    with train.compile: true, each beside its eager number in the table; the first calls'
    seconds (compilation) reported; the process back in eager mode afterwards."""
    out = tmp_path / "bench.json"
    shards = make_shards(tmp_path / "shards")
    args = ["--shards", str(shards), "--epoch-limit", "200", "--no-contention"]
    assert main(["bench", "--min-time", "0.05", *args, "--json", str(out)]) == 0
    c = json.loads(out.read_text())["compiled"]
    assert c["available"] is True
    for key in ("train_k10", "train_k100", "eval_k100"):
        assert c[key]["samples_per_s"] > 0 and c[key]["ratio"] > 0
    e = c["epoch_paper"]
    assert e["epoch_s"] == e["train_s"] + e["val_s"]
    assert e["first_epoch_s"] > 0  # the compiling epoch, reported apart from the timed one
    assert c["first_call_s"]["bihm training step"] > 0 and c["first_call_s"]["estimators"] > 0
    assert not rng.counter_based()  # back in eager mode
    table = capsys.readouterr().out
    for line in ("training step, K=10", "validation batch (500 x K=100)", "epoch of bmnist"):
        assert f"  {line}" in table
    assert "compiled: the second epoch; the first, compiling: " in table
    assert "first calls (mostly compilation): " in table


def test_the_autograd_baseline_computes_the_same_gradients():
    """The benchmark's autograd step is the same step: on the same draws its gradients
    equal BiHM.loss's manual ones, so the speedup compares like with like."""
    model = BiHM([20, 8, 5, 3])
    x = (torch.rand(6, 20, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    grads = []
    for loss_fn in (lambda: model.loss(x, 7).loss, lambda: autograd_loss(model, x, 7)):
        model.zero_grad()
        torch.manual_seed(5)  # the same global-RNG draws for both
        loss_fn().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for manual, auto in zip(*grads, strict=True):
        torch.testing.assert_close(manual, auto, rtol=1e-4, atol=1e-6)


def test_step_modes_times_each_mode_and_leaves_the_process_eager(capsys):
    """benchmarks/step_modes.py (docs/performance.md's per-part figures): each mode asked
    for is timed, and the process is back to eager draws afterwards. The compiled mode is
    covered by the compiled tests; here eager and the counter-based streams."""
    from benchmarks import step_modes

    assert step_modes.main(["eager", "streams", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("ms/step") == 2 and out.startswith("eager") and "\nstreams" in out
    assert not rng.counter_based()
    # --profile: the profiler's table of the mode's ops, the matmuls among them
    assert step_modes.main(["eager", "--steps", "2", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "eager: 20 steps by self CPU time" in out and "aten::addmm" in out
    with pytest.raises(SystemExit):
        step_modes.main(["fast"])
    assert "unknown mode 'fast'" in capsys.readouterr().err
