"""`bihm bench`: throughput of the real training and evaluation code against the matmul limit.

Work per sample is fixed by the model (bihm-math.md; issue "Performance"):
    training    8 * sum_l n_l n_{l+1} FLOPs per (x, h_k) pair: q and p logits, and the
                weight gradients of p and q (no activation gradients: every layer is observed)
    evaluation  4 * sum_l n_l n_{l+1} FLOPs per sample: q and p logits
Each workload's achieved FLOP/s is divided by the FLOP/s of a plain fp32 matmul of the
dominant shape (B*K x 784) @ (784 x 300) measured in the same process: that ratio is what
stays comparable on noisy, shared machines.

Where bf16 matmuls are native (AVX512-BF16 or AMX CPUs, GPUs), the `bf16` entry repeats the
training step and the epoch with train.precision bf16-mixed; its ratio is still against the
fp32 matmul, so a ratio above 1 is the gain bf16 buys. Elsewhere bf16 is emulated, many
times slower than fp32, and not measured.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from bihm import BiHM, compiled

PAPER_SIZES = [784, 300, 200, 100, 75, 50, 35, 30, 25, 20, 15, 10, 10]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bmnist_paper.yaml"


def pair_sum(sizes: list[int]) -> int:
    """sum_l n_l * n_{l+1}: the multiply-adds of one pass through p or q for one sample."""
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def timed(
    fn: Callable[[], object], device: torch.device, min_time: float, warmup: int = 2
) -> float:
    """Median seconds per call over repeats lasting at least `min_time` in total."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while not times or time.perf_counter() - start < min_time or len(times) < 3:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def matmul_gflops(
    device: torch.device, rows: int, min_time: float, dtype: torch.dtype = torch.float32
) -> float:
    a = torch.rand(rows, 784, device=device).to(dtype)
    b = torch.rand(784, 300, device=device).to(dtype)
    seconds = timed(lambda: a @ b, device, min_time, warmup=5)
    return 2 * rows * 784 * 300 / seconds / 1e9


def random_data(n: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(n, 784, generator=gen) < 0.13).float().to(device)


class _StepTimer(pl.Callback):
    """Wall time of each training step: training_step, backward and optimiser step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        self.times.append(time.perf_counter() - self._start)


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively on `device` (else they are emulated, and slow)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from pipeline.train import cpu_has_bf16

    return cpu_has_bf16()


def bench_train(
    x: torch.Tensor,
    K: int,
    steps: int,
    precision: str = "32-true",
    compile: bool = False,
    cuda_graphs: bool = True,
) -> float:
    """Median seconds per training step of the real BiHMModule under a Lightning Trainer
    (configs/bmnist_paper.yaml with train.K = K), on the fixed batch x, in Lightning's
    `precision` (32-true or bf16-mixed, as train.precision), compiled (train.compile: true,
    through bihm train's own Compile callback; the first steps, which compile, are not
    counted) or eager; on a GPU, compiled with or without CUDA graphs."""
    from bihm.lightning import BiHMModule
    from pipeline.config import load_config
    from pipeline.train import Compile

    config = load_config(CONFIG, [f"train.K={K}", f"train.compile={str(compile).lower()}"])
    config = config.to_dict()
    module = BiHMModule(config)
    B = x.shape[0]
    data = TensorDataset(x.cpu().repeat(steps, 1), torch.arange(B).repeat(steps))
    timer = _StepTimer()
    trainer = pl.Trainer(
        accelerator=x.device.type,
        devices=1,
        precision=precision,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, Compile(config["train"]["compile"], cuda_graphs)],
    )
    try:
        trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=B))
    finally:
        compiled.enable(False, x.device)  # the process's mode back to eager
    return statistics.median(timer.times[2:])  # the first steps warm up


def autograd_loss(model: BiHM, x: torch.Tensor, K: int) -> torch.Tensor:
    """The straightforward implementation of the BiHM step (Algorithm 1) that the manual
    gradients of BiHM.loss replace: samples without a graph, then autograd through
    log p(x, h) and log q(h | x) with w~ = softmax(d / 2) held constant."""
    hs = model.sample_q(x, K)
    log_p, log_q = model.log_p(hs), model.log_q(hs)
    w = torch.softmax((log_p - log_q).detach() / 2, -1)
    return -((w * log_p).sum(-1) + ((w - 1 / K) * log_q).sum(-1)).mean()


def bench_manual_vs_autograd(x: torch.Tensor, K: int, min_time: float) -> dict:
    """Seconds per step (loss, backward, Adam) of BiHM.loss's manual layer-local gradients
    and of `autograd_loss`, side by side on the same model, batch and thread count."""
    model = BiHM(PAPER_SIZES).to(x.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(loss_fn: Callable[[], torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    # Alternating rounds, medians of each: a change of load on a shared machine hits both.
    times: dict[str, list[float]] = {"manual": [], "autograd": []}
    for _ in range(3):
        times["manual"].append(
            timed(lambda: step(lambda: model.loss(x, K).loss), x.device, min_time / 3)
        )
        times["autograd"].append(
            timed(lambda: step(lambda: autograd_loss(model, x, K)), x.device, min_time / 3)
        )
    manual, auto = (statistics.median(times[k]) for k in ("manual", "autograd"))
    return {"K": K, "manual_s": manual, "autograd_s": auto, "speedup": auto / manual}


def workload(
    seconds_per_call: float, samples_per_call: int, flops_per_sample: float, matmul: float
) -> dict:
    samples_per_s = samples_per_call / seconds_per_call
    gflops = samples_per_s * flops_per_sample / 1e9
    return {
        "samples_per_s": samples_per_s,
        "gflops": gflops,
        "ratio": gflops / matmul,
        "matmul_gflops": matmul,
    }


def eval_batch(model: BiHM, x: torch.Tensor, K: int) -> None:
    """One validation batch: per-example estimates on the per-example streams, as
    `bihm.evaluation.estimates` runs them in validation and `bihm eval`."""
    from bihm import evaluation as ev

    ev.estimates(model, x, torch.arange(x.shape[0], device=x.device), K, seed=0)


def run(
    device_name: str = "cpu",
    min_time: float = 3.0,
    progress: bool = True,
    epoch: dict | None = None,
    compare_compiled: bool = True,
) -> dict:
    """All workloads; `epoch` holds the keyword arguments of `bench_epoch` (shard_dir, limit,
    contention), or None to skip the whole-epoch measurement. Each workload's ratio uses the
    matmul GFLOP/s measured just before and just after it (their mean), so a change of load
    on a shared machine during the run does not skew it. Where bf16 is native, the training
    step at K = 10 and the epoch are measured again in bf16-mixed (the `bf16` entry).
    With `compare_compiled`, where torch.compile has a backend, the training steps, the
    validation batch and the epoch again with train.compile: true (the `compiled` entry)."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = BiHM(PAPER_SIZES).to(device)
    s = pair_sum(PAPER_SIZES)
    B = 100
    x = random_data(B, device)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    matmuls: list[float] = []

    def measure(name: str, fn: Callable[[], float], samples: int, flops: float) -> dict:
        say(f"{name} ...")
        before = matmul_gflops(device, B * 10, min_time / 3)
        seconds = fn()
        after = matmul_gflops(device, B * 10, min_time / 3)
        matmuls.extend([before, after])
        return workload(seconds, samples, flops, (before + after) / 2)

    result: dict = {"machine": machine_info(device), "model": PAPER_SIZES, "batch": B}
    for K in (10, 100):
        steps = max(10, int(min_time * 20_000 / (B * K)))
        result[f"train_k{K}"] = measure(
            f"train K={K}", lambda K=K, steps=steps: bench_train(x, K, steps), B * K, 8 * s
        )
    native = bf16_native(device)
    result["bf16"] = {"native": native}
    if native:
        steps = max(10, int(min_time * 20_000 / (B * 10)))
        result["bf16"]["matmul_gflops"] = matmul_gflops(
            device, B * 10, min_time / 3, torch.bfloat16
        )
        result["bf16"]["train_k10"] = measure(
            "train K=10, bf16-mixed",
            lambda: bench_train(x, 10, steps, precision="bf16-mixed"),
            B * 10,
            8 * s,
        )
    say("training step: manual gradients against autograd ...")
    result["manual_vs_autograd"] = bench_manual_vs_autograd(x, 10, min_time)
    K_eval = 1000
    result["log_likelihood"] = measure(
        f"log_likelihood K={K_eval}",
        lambda: timed(lambda: model.log_likelihood(x[:10], K_eval), device, min_time),
        10 * K_eval,
        4 * s,
    )
    # Each outer sample: an ancestral p pass and log q (4s FLOPs), then `inner` q samples
    # with their p (4s each).
    n_z, inner = 2000, 10
    result["log_z2"] = measure(
        f"estimate_log_z2 n={n_z} inner={inner}",
        lambda: timed(lambda: model.estimate_log_z2(n_z, inner), device, min_time),
        n_z * (1 + inner),
        4 * s,
    )
    # A validation batch (data.eval_batch_size images at validation.K) on per-example streams.
    x_eval = random_data(500, device)
    result["eval_k100"] = measure(
        "validation batch, 500 images at K=100",
        lambda: timed(lambda: eval_batch(model, x_eval, 100), device, min_time, warmup=1),
        500 * 100,
        4 * s,
    )
    if compare_compiled:
        result["compiled"] = bench_compiled(device, x, x_eval, model, min_time, native, measure)
    result["matmul_gflops"] = statistics.median(matmuls)

    chains, proposals = 10, 100
    say(f"gibbs chains={chains} proposals={proposals} ...")
    hs = model.sample_p(chains)
    seconds = timed(lambda: model.gibbs_step(hs, proposals=proposals), device, min_time, warmup=1)
    n_latent = len(PAPER_SIZES) - 1
    per_step = chains * proposals * (2 * n_latent + 1)  # 2S per latent layer, S for x
    result["gibbs"] = {"proposals_per_s": per_step / seconds, "chains": chains, "S": proposals}

    if epoch is not None:
        say("one epoch of configs/bmnist_paper.yaml ...")
        result["epoch_paper"] = bench_epoch(**epoch, progress=progress)
        if native:
            say("one epoch of configs/bmnist_paper.yaml, bf16-mixed ...")
            train_s, val_s, _ = one_epoch(
                epoch_overrides(epoch["shard_dir"], epoch.get("limit"), progress)
                + ["train.precision=bf16-mixed"]
            )
            result["bf16"]["epoch_paper"] = {
                "train_s": train_s,
                "val_s": val_s,
                "epoch_s": train_s + val_s,
            }
        if result.get("compiled", {}).get("available"):
            # Two epochs, the second timed: the first compiles the step for each thread
            # count the governor tries and the estimators for each batch shape, a one-off
            # cost of a run that `first_epoch_s` and `first_call_s` report apart.
            say("two epochs of configs/bmnist_paper.yaml, compiled ...")
            try:
                (first, (train_s, val_s)), _ = run_epochs(
                    epoch_overrides(epoch["shard_dir"], epoch.get("limit"), progress)
                    + ["train.compile=true"],
                    epochs=2,
                )
            finally:
                compiled.enable(False, device)
            result["compiled"]["epoch_paper"] = {
                "train_s": train_s,
                "val_s": val_s,
                "epoch_s": train_s + val_s,
                "first_epoch_s": sum(first),
            }
    if result.get("compiled", {}).get("available"):
        result["compiled"]["first_call_s"] = compiled.seconds()
    if device.type == "cuda":
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # ru_maxrss is in KiB on Linux
        result["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def bench_compiled(
    device: torch.device,
    x: torch.Tensor,
    x_eval: torch.Tensor,
    model: BiHM,
    min_time: float,
    bf16: bool,
    measure: Callable[[str, Callable[[], float], int, float], dict],
) -> dict:
    """The training steps (K = 10, 100; bf16-mixed at K = 10 where `bf16` is native) and
    the validation batch again in compiled mode, beside the eager ones of the same run.
    {"available": False, "reason": ...} where torch.compile has no backend."""
    reason = compiled.missing_backend(device.type)
    if reason is not None:
        return {"available": False, "reason": reason}
    s, B = pair_sum(PAPER_SIZES), x.shape[0]
    out: dict = {"available": True}
    for K in (10, 100):
        steps = max(10, int(min_time * 20_000 / (B * K)))
        out[f"train_k{K}"] = measure(
            f"train K={K}, compiled",
            lambda K=K, steps=steps: bench_train(x, K, steps, compile=True),
            B * K,
            8 * s,
        )
    steps = max(10, int(min_time * 20_000 / (B * 10)))
    if device.type == "cuda":  # what the CUDA graphs buy: the compiled step without them
        out["train_k10_no_graphs"] = measure(
            "train K=10, compiled without CUDA graphs",
            lambda: bench_train(x, 10, steps, compile=True, cuda_graphs=False),
            B * 10,
            8 * s,
        )
    if bf16:
        out["train_k10_bf16"] = measure(
            "train K=10, bf16-mixed, compiled",
            lambda: bench_train(x, 10, steps, precision="bf16-mixed", compile=True),
            B * 10,
            8 * s,
        )
    compiled.enable(True, device)
    try:
        out["eval_k100"] = measure(
            "validation batch, 500 images at K=100, compiled",
            # warmup 2: the first call compiles, the second may compile for dynamic shapes
            lambda: timed(lambda: eval_batch(model, x_eval, 100), device, min_time, warmup=2),
            500 * 100,
            4 * s,
        )
    finally:
        compiled.enable(False, device)
    return out


# --------------------------------------------------------------------------- whole epochs
def epoch_overrides(shard_dir: str | os.PathLike, limit: int | None, progress: bool) -> list[str]:
    """Config overrides of configs/bmnist_paper.yaml for one timed epoch: the Gibbs
    validation and sample pictures off (`bench_epoch` times them apart), no wandb; `limit`
    cuts the train and validation splits, and 2 log Z to 10 x limit samples (tests)."""
    from pipeline.config import load_config

    overrides = [
        f"data.shard_dir={shard_dir}",
        "validation.gibbs.every_n_epochs=0",
        "samples.every_n_epochs=0",
        "logging.wandb=off",
        f"logging.progress_bar={str(progress).lower()}",
    ]
    if limit is not None:
        z_samples = min(load_config(CONFIG).validation.z_samples, 10 * limit)
        overrides += [
            f"data.train_limit={limit}",
            f"data.valid_limit={limit}",
            f"validation.z_samples={z_samples}",
        ]
    return overrides


def run_epochs(
    overrides: list[str], epochs: int
) -> tuple[list[tuple[float, float]], torch.nn.Module]:
    """`epochs` epochs through `run_training`, as `bihm train` runs it, in a temporary run
    folder: each epoch's `train_time_s` and `val_time_s` from metrics.csv, and the trained
    model."""
    import tempfile

    from pipeline.config import load_config
    from pipeline.train import run_training

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIG, [*overrides, f"train.max_epochs={epochs}", f"run_dir={tmp}"])
        keep = _KeepModel()
        run_training(cfg, extra_callbacks=[keep])
        with open(Path(tmp) / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        times = [(float(r["train_time_s"]), float(r["val_time_s"])) for r in rows]
        if len(times) != epochs:
            raise RuntimeError(f"bench: {len(times)} epochs in metrics.csv, expected {epochs}")
        return times, keep.model


def one_epoch(overrides: list[str]) -> tuple[float, float, torch.nn.Module]:
    """One epoch (`run_epochs`): its training and validation seconds, and the model."""
    ((train_s, val_s),), model = run_epochs(overrides, epochs=1)
    return train_s, val_s, model


def _busy_loop() -> subprocess.Popen:
    """A second CPU-bound process, as another user's job on a shared machine."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def bench_epoch(
    shard_dir: str | os.PathLike,
    *,
    limit: int | None = None,
    contention: bool = True,
    progress: bool = True,
) -> dict:
    """One epoch of configs/bmnist_paper.yaml through `run_training`, as `bihm train` runs it
    (its CPU defaults: threads, data-loader workers), on the prepared shards in `shard_dir`.

    - `train_s`, `val_s`: the epoch's `train_time_s` and `val_time_s` from metrics.csv, with
      the Gibbs validation and the sample pictures off;
    - `gibbs_s`, `samples_s`: their cost per occurrence, from a few timed sweeps of a group
      of chains (the cost is linear in chains x sweeps), and `amortised_fraction`: both
      divided by their cadence in epochs, relative to the epoch;
    - with `contention`, the same epoch again beside a busy-loop process: `contention_slowdown`.
    `limit` cuts the train and validation splits, and 2 log Z to 10 x limit samples (tests).
    """
    from bihm import evaluation as ev
    from bihm.gibbs import half_mask
    from pipeline.config import load_config

    cfg = load_config(CONFIG)
    overrides = epoch_overrides(shard_dir, limit, progress)
    train_s, val_s, model = one_epoch(overrides)
    out = {"train_s": train_s, "val_s": val_s, "epoch_s": train_s + val_s, "limit": limit}
    # Gibbs validation and sample pictures: seconds per chain and sweep, from one group.
    model.eval()
    g, gv, sm = ev.GIBBS_GROUP, cfg.validation.gibbs, cfg.samples
    x = model.sample_p(g)[0]
    t0 = time.perf_counter()
    ev.inpainting_errors(
        model,
        x,
        torch.arange(g),
        half_mask("bottom"),
        chains=1,
        steps=2,
        proposals=gv.proposals,
        inner=gv.inner,
        seed=0,
    )
    per_chain_sweep = (time.perf_counter() - t0) / (g * 2)
    out["gibbs_s"] = per_chain_sweep * gv.examples * gv.chains * gv.steps
    out["samples_s"] = per_chain_sweep * sm.n * sm.gibbs_steps * (sm.proposals / gv.proposals)
    out["gibbs_every"], out["samples_every"] = gv.every_n_epochs, sm.every_n_epochs
    extra = 0.0
    if gv.every_n_epochs > 0:
        extra += out["gibbs_s"] / gv.every_n_epochs
    if sm.every_n_epochs > 0:
        extra += out["samples_s"] / sm.every_n_epochs
    out["amortised_fraction"] = extra / out["epoch_s"]
    if contention:
        busy = _busy_loop()
        try:
            b_train, b_val, _ = one_epoch(overrides)
        finally:
            busy.kill()
            busy.wait()
        out["contention"] = {"train_s": b_train, "val_s": b_val, "epoch_s": b_train + b_val}
        out["contention_slowdown"] = (b_train + b_val) / out["epoch_s"]
    return out


class _KeepModel(pl.Callback):
    """Keeps the trained model for `bench_epoch` (run_training returns paths only)."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None

    def on_fit_end(self, trainer, module) -> None:
        self.model = module.model


def format_table(result: dict) -> str:
    lines = [
        f"machine: {result['machine']['cpu']} ({result['machine']['torch_threads']} threads), "
        f"torch {result['machine']['torch']}",
        f"fp32 matmul (1000x784 @ 784x300): {result['matmul_gflops']:.1f} GFLOP/s (median)",
        f"{'workload':<16}{'samples/s':>12}{'GFLOP/s':>10}{'matmul':>10}{'ratio':>8}",
    ]
    for key in ("train_k10", "train_k100", "log_likelihood", "log_z2"):
        w = result[key]
        lines.append(
            f"{key:<16}{w['samples_per_s']:>12.0f}{w['gflops']:>10.1f}"
            f"{w['matmul_gflops']:>10.1f}{w['ratio']:>8.2f}"
        )
    b = result["bf16"]
    if "train_k10" in b:
        w = b["train_k10"]
        lines.append(
            f"{'train_k10 bf16':<16}{w['samples_per_s']:>12.0f}{w['gflops']:>10.1f}"
            f"{w['matmul_gflops']:>10.1f}{w['ratio']:>8.2f}"
            f"   (bf16 matmul {b['matmul_gflops']:.1f} GFLOP/s)"
        )
    elif not b["native"]:
        lines.append("bf16: not native on this device (emulated, slow): not measured")
    m = result["manual_vs_autograd"]
    lines.append(
        f"training step at K={m['K']}: manual gradients {1e3 * m['manual_s']:.1f} ms, "
        f"autograd {1e3 * m['autograd_s']:.1f} ms: {m['speedup']:.2f}x"
    )
    lines.append(f"gibbs: {result['gibbs']['proposals_per_s']:.0f} proposals/s")
    lines += _compiled_lines(result)
    if "epoch_paper" in result:
        e = result["epoch_paper"]
        lines.append(
            f"epoch of bmnist_paper.yaml: {e['epoch_s']:.1f} s (train {e['train_s']:.1f} s, "
            f"validation {e['val_s']:.1f} s); Gibbs validation and pictures add "
            f"{100 * e['amortised_fraction']:.1f}% amortised"
        )
        if "contention_slowdown" in e:
            lines.append(
                f"beside a busy-loop process: {e['contention']['epoch_s']:.1f} s, "
                f"{e['contention_slowdown']:.2f}x slower"
            )
    if "epoch_paper" in result["bf16"]:
        e = result["bf16"]["epoch_paper"]
        lines.append(
            f"epoch with train.precision bf16-mixed: {e['epoch_s']:.1f} s "
            f"(train {e['train_s']:.1f} s, validation {e['val_s']:.1f} s, fp32)"
        )
    lines.append(f"peak memory: {result['peak_mem_mb']:.0f} MB")
    return "\n".join(lines)


def _compiled_lines(result: dict) -> list[str]:
    """The eager-against-compiled comparison of `bench_compiled`, side by side."""
    c = result.get("compiled")
    if c is None:
        return []
    if not c["available"]:
        return [f"compiled (train.compile: true): not measured: {c['reason']}"]
    lines = ["compiled (train.compile: true) against eager, this run:"]

    def per_call(w: dict, samples: int) -> float:
        return samples / w["samples_per_s"]

    pairs = [
        ("training step, K=10", result["train_k10"], c["train_k10"], 1000, "ms", 1e3),
        ("training step, K=100", result["train_k100"], c["train_k100"], 10_000, "ms", 1e3),
        ("validation batch (500 x K=100)", result["eval_k100"], c["eval_k100"], 50_000, "s", 1),
    ]
    if "train_k10_no_graphs" in c:
        pairs.append(
            (
                "step, K=10, no CUDA graphs",
                result["train_k10"],
                c["train_k10_no_graphs"],
                1000,
                "ms",
                1e3,
            )
        )
    if "train_k10_bf16" in c and "train_k10" in result["bf16"]:
        pairs.append(
            (
                "step, K=10, bf16-mixed",
                result["bf16"]["train_k10"],
                c["train_k10_bf16"],
                1000,
                "ms",
                1e3,
            )
        )
    for name, eager, comp, samples, unit, scale in pairs:
        a, b = per_call(eager, samples), per_call(comp, samples)
        lines.append(
            f"  {name:<32}{scale * a:>9.2f} {unit:<3}->{scale * b:>9.2f} {unit:<3}"
            f"{a / b:>6.2f}x  (ratio {eager['ratio']:.2f} -> {comp['ratio']:.2f})"
        )
    if "epoch_paper" in c and "epoch_paper" in result:
        a, b = result["epoch_paper"], c["epoch_paper"]
        lines.append(
            f"  {'epoch of bmnist_paper.yaml':<32}{a['epoch_s']:>9.1f} s  ->"
            f"{b['epoch_s']:>9.1f} s  {a['epoch_s'] / b['epoch_s']:>6.2f}x  (train "
            f"{a['train_s']:.1f} -> {b['train_s']:.1f}, validation {a['val_s']:.1f} -> "
            f"{b['val_s']:.1f})"
        )
        if "first_epoch_s" in b:
            lines.append(
                f"  {'':<32}compiled: the second epoch; the first, compiling: "
                f"{b['first_epoch_s']:.1f} s"
            )
    firsts = ", ".join(f"{k} {v:.1f} s" for k, v in c.get("first_call_s", {}).items())
    if firsts:
        lines.append(f"  first calls (mostly compilation): {firsts}")
    return lines


def write_json(result: dict, path: Path) -> None:
    from bihm.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
