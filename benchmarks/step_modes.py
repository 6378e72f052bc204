"""What each part of compiled mode buys for the training step (docs/performance.md).

    python -m benchmarks.step_modes [eager] [streams] [compiled] [--steps N] [--threads T]

Times N steps of the paper model's `model.loss` + backward + fused `Adam.step` (B = 100,
K = 10) in each mode, in the order given, and prints the median:
- eager: the default, one torch.Generator per step;
- streams: the same eager arithmetic drawing from counter-based streams (bihm/rng.py)
  through the compiled hash kernel, i.e. the cost of the streams alone;
- compiled: train.compile: true, with its compile seconds (the hash kernel, the first step).
Set TORCHINDUCTOR_CACHE_DIR to an empty folder to measure a cold compile. `--profile`
then runs 20 more steps of each mode under torch.profiler and prints its ops by self CPU
time: where a step's time goes (matmuls, sampling, elementwise work, the optimizer).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench import PAPER_SIZES
from bihm import BiHM, compiled, rng

MODES = ("eager", "streams", "compiled")


def _step(model: BiHM, opt: torch.optim.Optimizer, x: torch.Tensor, K: int, i: int) -> None:
    opt.zero_grad(set_to_none=True)
    g = rng.step_generator("cpu", 0, 1, i, rows=x.shape[0])
    model.loss(x, K, "bihm", generator=g).loss.backward()
    opt.step()


def step_times(
    model: BiHM, x: torch.Tensor, K: int, steps: int, profile: bool = False
) -> tuple[float, float, str]:
    """(first step's seconds, median seconds of the steps after the first 5, and with
    `profile` the table of 20 more steps' ops by self CPU time, else "")."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        _step(model, opt, x, K, i)
        times.append(time.perf_counter() - start)
    table = ""
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps, steps + 20):
                _step(model, opt, x, K, i)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return times[0], statistics.median(times[min(5, steps - 1) :]), table


def run(
    modes: list[str], steps: int, K: int = 10, profile: bool = False
) -> dict[str, dict[str, float | str]]:
    """{mode: {"step_ms", "first_s", and for compiled "streams_compile_s"; with `profile`
    the profiler's "table"}}; the process is left in eager mode."""
    torch.manual_seed(0)
    model = BiHM(PAPER_SIZES)
    x = (torch.rand(100, PAPER_SIZES[0]) < 0.3).float()
    out: dict[str, dict[str, float | str]] = {}
    try:
        for mode in modes:
            entry: dict[str, float | str] = {}
            if mode == "compiled":
                entry["streams_compile_s"] = compiled.enable(True, "cpu") or 0.0
            else:
                compiled.enable(False, "cpu")
                if mode == "streams":
                    rng.set_counter_based(True, compiled=True)
            first, median, table = step_times(model, x, K, steps, profile)
            entry.update(first_s=first, step_ms=1e3 * median)
            if profile:
                entry["table"] = table
            out[mode] = entry
    finally:
        compiled.enable(False, "cpu")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_modes", description=__doc__)
    p.add_argument("modes", nargs="*", help=f"of {', '.join(MODES)} (default: all)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per mode")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--profile", action="store_true", help="print each mode's ops by self CPU time")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2")
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    torch.set_num_threads(args.threads)
    for mode, e in run(args.modes or list(MODES), args.steps, profile=args.profile).items():
        extra = ""
        if "streams_compile_s" in e:
            extra = f"; compiling the hash {e['streams_compile_s']:.1f} s"
        print(f"{mode:<9} {e['step_ms']:7.1f} ms/step (first step {e['first_s']:.1f} s{extra})")
        if args.profile:
            print(f"{mode}: 20 steps by self CPU time\n{e['table']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
