"""Compiled mode (bihm/compiled.py, `train.compile`): the compiled training step and
estimators against the eager ones on the same counter-based streams, the exact-enumeration
checks of the estimators in compiled mode, the setting's resolution, and a training run
that compiles and resumes, and a DDP run that compiles in each process. Compiling a tiny
model takes some tens of seconds on a small CPU; the tests that compile are marked
`compiled` (`make test-compiled` runs them alone) and are part of the default suite, the
DDP one `slow`."""

from __future__ import annotations

import re

import pytest
import torch

from bihm import compiled, rng
from bihm.compiled import CompileUnavailable, resolve
from bihm.rng import Streams
from pipeline.config import config_from_dict
from pipeline.train import run_training
from tests.conftest import make_shards, read_metrics, run_python, tiny_config
from tests.exact import enumerate_model, fit_q_to_posterior, tiny_model


@pytest.fixture
def compiled_mode():
    """This process in compiled mode for one test, then back to eager."""
    assert compiled.missing_backend("cpu") is None, "the suite needs a C++ compiler (g++)"
    compiled.enable(True, "cpu")
    yield
    compiled.enable(False, "cpu")


def _step(model, x, K, objective):
    """Loss, diagnostics and gradients of one step on the streams (0, 1, row)."""
    model.zero_grad()
    out = model.loss(x, K, objective, generator=Streams.keyed("cpu", 0, 1, keys=range(len(x))))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out, grads


@pytest.mark.compiled
@pytest.mark.timeout(900)
@pytest.mark.parametrize("objective", ["bihm", "rws"])
def test_the_compiled_step_equals_the_eager_step_on_the_same_streams(objective, compiled_mode):
    """float64, so that no sample can fall the other way of its uniform by rounding:
    the same draws, hence the same loss, log p, log p~*, ESS and gradients, up to the
    rounding of reordered float64 sums (1e-12 relative)."""
    model = tiny_model((6, 5, 4, 3), scale=1.0).double()
    x = (torch.rand(9, 6, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    fused_out, fused_grads = _step(model, x, 7, objective)
    assert compiled.seconds()[f"{objective} training step"] > 0
    compiled.enable(False, "cpu")
    rng.set_counter_based(True, compiled=False)  # the same streams, eager arithmetic
    eager_out, eager_grads = _step(model, x, 7, objective)
    for name in ("loss", "log_p", "log_ptilde_star", "ess"):
        a, b = getattr(fused_out, name).detach(), getattr(eager_out, name).detach()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    for name, g in eager_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.compiled
@pytest.mark.timeout(900)
def test_compiled_estimates_equal_eager_ones_and_do_not_depend_on_the_chunking(compiled_mode):
    model = tiny_model((6, 4, 3), scale=1.0).double()
    x = (torch.rand(11, 6, generator=torch.Generator().manual_seed(2)) < 0.5).double()

    def estimates(chunk):
        streams = Streams.keyed("cpu", 5, 2, 50, keys=range(11))
        return model.estimates(x, 50, chunk=chunk, generator=streams)

    fused, fused_chunked = estimates(4096), estimates(20)  # 1 chunk; 3 rows x 20 samples
    compiled.enable(False, "cpu")
    rng.set_counter_based(True, compiled=False)
    eager = estimates(4096)
    for name in ("log_p", "log_ptilde_star", "ess_pstar", "ess_p"):
        for other in (fused, fused_chunked):
            torch.testing.assert_close(getattr(other, name), getattr(eager, name), msg=name)


@pytest.mark.compiled
@pytest.mark.timeout(900)
def test_compiled_estimates_converge_to_the_exact_values(compiled_mode):
    """tests/test_model_exact.py's check of log p and log p~* (K = 20,000 against the
    enumerated values, within 5 standard errors plus the Jensen bias), in compiled mode."""
    model = fit_q_to_posterior(tiny_model())
    exact = enumerate_model(model)
    K, xs = 20_000, exact.xs
    streams = Streams.keyed("cpu", 3, 2, K, keys=range(xs.shape[0]))
    est = model.estimates(xs, K, chunk=50_000, generator=streams)
    q = exact.log_qhx.exp()
    for log_w, value, target, scale in (
        (exact.log_pxh - exact.log_qhx, est.log_p, exact.log_px, 1.0),
        (0.5 * (exact.log_pxh - exact.log_qhx), est.log_ptilde_star, exact.log_ptilde_star, 2.0),
    ):
        w = log_w.exp()
        rel_var = (q * w * w).sum(1) / (q * w).sum(1) ** 2 - 1
        tol = scale * (5 * torch.sqrt(rel_var / K) + rel_var / (2 * K)) + 1e-4
        assert bool(((value - target).abs() < tol).all())


def test_the_setting_resolves_per_device(monkeypatch):
    assert resolve(False, "cuda") is False
    assert resolve("auto", "cpu") is False  # measured not to pay on a CPU
    monkeypatch.setattr(compiled, "missing_backend", lambda device: None)
    assert resolve("auto", "cuda") is True and resolve(True, "cpu") is True
    monkeypatch.setattr(compiled, "missing_backend", lambda device: "Triton is not installed")
    assert resolve("auto", "cuda") is False
    with pytest.raises(CompileUnavailable, match="cannot run: Triton is not installed"):
        resolve(True, "cuda")


@pytest.mark.compiled
@pytest.mark.timeout(900)
def test_a_compiled_run_trains_reports_its_compilation_and_resumes(tmp_path, capfd):
    """train.compile: true through `run_training`: the streams, the step and the
    estimators are compiled (each reported once), and a resume continues compiled."""
    shards = make_shards(tmp_path / "shards")
    cfg = tiny_config(shards, tmp_path / "run", train={"max_epochs": 1, "compile": True})
    cfg["validation"]["gibbs"]["every_n_epochs"] = 0
    cfg["samples"]["every_n_epochs"] = 0
    compiled.forget()  # as in a fresh process: earlier tests here compiled the same functions
    try:
        run_training(config_from_dict(cfg))
        err = capfd.readouterr().err
        for name in ("the random streams", "bihm training step", "estimators"):
            assert f"bihm: compiled {name} in " in err, err[-3000:]
        cfg["train"]["max_epochs"] = 2
        run_training(config_from_dict(cfg), resume=True)
        err += capfd.readouterr().err
        # Each run reports what it compiled itself, not the process's running total: the
        # lines of both runs add up to what compiled.seconds() gained.
        for name, total in compiled.seconds().items():
            got = [float(s) for s in re.findall(rf"bihm: compiled {name} in ([0-9.]+) s", err)]
            assert got and sum(got) == pytest.approx(total, abs=0.1), (name, got)
    finally:
        compiled.enable(False, "cpu")
    rows = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert all(float(r["val/log_ptilde_star"]) < 0 for r in rows)


def test_on_a_gpu_compiled_functions_run_as_cuda_graphs_marking_each_call(monkeypatch):
    """What the CPU can check of the CUDA-graph path: on a CUDA device (with cuda_graphs)
    `compiled.function` compiles with mode reduce-overhead and marks a new CUDA-graph
    iteration before every call (so a call's outputs may be reused by the next one), and
    with cuda_graphs false, or on a CPU, compiles in the default mode without marks. The
    GPU run itself is benchmarks/gpu_session.sh's."""
    modes, marks = [], []

    def fake_compile(fn, fullgraph, mode):
        modes.append(mode)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(compiled, "resolve", lambda setting, device_type: True)
    monkeypatch.setattr(rng, "uniform", lambda *args: None)  # no CUDA draw to warm up
    monkeypatch.setattr(rng.Streams, "keyed", classmethod(lambda cls, *a, **k: None))
    try:
        for device, graphs, mode, n_marks in [
            ("cuda", True, "reduce-overhead", 2),
            ("cuda", False, "default", 0),
            ("cpu", True, "default", 0),
        ]:
            modes.clear(), marks.clear()
            compiled.enable(True, device, cuda_graphs=graphs)

            def double(t):
                return 2 * t

            fn = compiled.function(double, f"double on {device}")
            assert fn(1) == 2 and compiled.function(double, "again")(2) == 4
            assert modes == [mode] and len(marks) == n_marks, (device, graphs)
    finally:
        monkeypatch.undo()
        compiled.enable(False, "cpu")


@pytest.mark.slow
def test_ddp_training_compiles_in_every_process(tmp_path):
    """`bihm train --devices 2 --set train.compile=true`: both gloo processes run compiled
    (rank 0 reports each compilation once) and the run's validation counts every example
    once, as in eager mode."""
    import yaml

    shards = make_shards(tmp_path / "shards")
    cfg = tiny_config(shards, tmp_path / "run", train={"max_epochs": 1, "compile": True})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_python(
        ["-m", "pipeline.cli", "train", "--config", str(tmp_path / "c.yaml"), "--devices", "2"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("the random streams", "bihm training step", "estimators"):
        assert proc.stderr.count(f"bihm: compiled {name} in ") == 1, proc.stderr[-4000:]
    (row,) = read_metrics(tmp_path / "run")
    assert float(row["val/n"]) == 200 and float(row["val/log_ptilde_star"]) < 0
