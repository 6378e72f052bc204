"""What each part of compiled mode buys for the training step (docs/performance.md).

    python -m benchmarks.step_modes [eager] [streams] [compiled] [--steps N] [--threads T]

Times N steps of the paper model's `model.loss` + backward + fused `Adam.step` (B = 100,
K = 10) in each mode, in the order given, and prints the median:
- eager: the default, one torch.Generator per step;
- streams: the same eager arithmetic drawing from counter-based streams (bihm/rng.py)
  through the compiled hash kernel, i.e. the cost of the streams alone;
- compiled: train.compile: true, with its compile seconds (the hash kernel, the first step).
Set TORCHINDUCTOR_CACHE_DIR to an empty folder to measure a cold compile.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench import PAPER_SIZES
from bihm import BiHM, compiled, rng

MODES = ("eager", "streams", "compiled")


def step_times(model: BiHM, x: torch.Tensor, K: int, steps: int) -> tuple[float, float]:
    """(first step's seconds, median seconds of the steps after the first 5)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        g = rng.step_generator("cpu", 0, 1, i, rows=x.shape[0])
        model.loss(x, K, "bihm", generator=g).loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[min(5, steps - 1) :])


def run(modes: list[str], steps: int, K: int = 10) -> dict[str, dict[str, float]]:
    """{mode: {"step_ms", "first_s", and for compiled "streams_compile_s"}}; the process is
    left in eager mode."""
    torch.manual_seed(0)
    model = BiHM(PAPER_SIZES)
    x = (torch.rand(100, PAPER_SIZES[0]) < 0.3).float()
    out: dict[str, dict[str, float]] = {}
    try:
        for mode in modes:
            entry: dict[str, float] = {}
            if mode == "compiled":
                entry["streams_compile_s"] = compiled.enable(True, "cpu") or 0.0
            else:
                compiled.enable(False, "cpu")
                if mode == "streams":
                    rng.set_counter_based(True, compiled=True)
            first, median = step_times(model, x, K, steps)
            entry.update(first_s=first, step_ms=1e3 * median)
            out[mode] = entry
    finally:
        compiled.enable(False, "cpu")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_modes", description=__doc__)
    p.add_argument("modes", nargs="*", help=f"of {', '.join(MODES)} (default: all)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per mode")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2")
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    torch.set_num_threads(args.threads)
    for mode, e in run(args.modes or list(MODES), args.steps).items():
        extra = ""
        if "streams_compile_s" in e:
            extra = f"; compiling the hash {e['streams_compile_s']:.1f} s"
        print(f"{mode:<9} {e['step_ms']:7.1f} ms/step (first step {e['first_s']:.1f} s{extra})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
