"""torch.compile for the BiHM's arithmetic: whether to use it (`train.compile`) and its cost.

Compiled mode runs, each as one graph without breaks:
- the training step's arithmetic (`Objective.surrogate`: sampling, log-probabilities,
  weights and the hand-written layer-local gradients);
- the estimators' inner loop (`bihm.estimators`: d_k and its log-sum-exps per chunk);
- the draws of counter-based random streams (`bihm.rng.Streams`), which replace the
  per-row torch.Generators: a generator= argument breaks a graph, a counter-based draw
  is integer arithmetic that the compiler fuses with the rest.

The streams draw other numbers than eager mode's, so estimates differ between the modes
by Monte Carlo noise only; between compiled and eager arithmetic on the same streams they
agree to float rounding (tests/test_compiled.py).

`train.compile: auto` compiles on a GPU (where Triton is present), whose steps are bound
by kernel launches, and not on a CPU: measured on a 2-core Xeon (`bihm bench`, paper
model), a compiled step took 25.1 ms against 27.5 ms eager and a validation batch 0.59 s
against 0.65 s, while a whole epoch gained nothing (docs/performance.md). `true` compiles
anywhere a backend is present, `false` never. On a GPU, compiled functions run as CUDA
graphs unless `train.cuda_graphs` is false.
"""

from __future__ import annotations

import shutil
import time
from typing import Literal

import torch

from bihm import rng
from bihm.errors import UserError

Setting = bool | Literal["auto"]


class CompileUnavailable(UserError, ValueError):
    """`train.compile: true` where torch.compile has no backend (the message says why)."""


def missing_backend(device_type: str) -> str | None:
    """Why torch.compile cannot run on `device_type` ("cpu", "cuda"), or None if it can."""
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed"
        return None
    try:
        from torch._inductor import config as inductor_config

        names = [n for n in inductor_config.cpp.cxx if n]  # $CXX or torch's choice first
    except Exception:  # an inductor without this setting: the usual names only
        names = []
    if any(shutil.which(n) for n in [*names, "g++", "c++", "clang++"]):
        return None
    return "no C++ compiler (g++, c++ or clang++) on the PATH"


def resolve(setting: Setting, device_type: str) -> bool:
    """`train.compile` for a device: auto compiles on a GPU with a backend (see the module
    docstring); true raises CompileUnavailable, naming what is missing, where there is
    no backend."""
    if setting is False:
        return False
    reason = missing_backend(device_type)
    if setting is True and reason is not None:
        raise CompileUnavailable(f"train.compile is true, but torch.compile cannot run: {reason}")
    if setting == "auto" and device_type != "cuda":
        return False
    return reason is None


def enable(setting: Setting, device: torch.device | str, cuda_graphs: bool = True) -> float | None:
    """Resolve `setting` for `device` and put this process in compiled mode (counter-based
    streams, compiled functions) or eager mode. In compiled mode, compile the streams'
    draw now (one small draw of each precision), so that its cost is paid, and measured,
    before training. Returns those seconds, or None in eager mode. Kernels compiled once
    are cached on disk (torch's inductor cache): later processes pay a fraction of that.

    On a GPU with `cuda_graphs`, compiled functions run as CUDA graphs (torch.compile's
    mode "reduce-overhead"): a step that is hundreds of tiny kernels becomes one launch."""
    global _enabled, _mode
    device = torch.device(device)
    use = resolve(setting, device.type)
    rng.set_counter_based(use, compiled=use)
    mode = _mode_for(device, cuda_graphs)
    if use and mode != _mode:
        _functions.clear()  # compiled for the other mode: compile again on first use
        _mode = mode
    _enabled = use
    if not use:
        return None
    # Evaluation meets several K, chunk and batch shapes; a whole graph (fullgraph) fails
    # outright at the recompile limit rather than falling back, so give it room.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    start = time.perf_counter()
    streams = rng.Streams.keyed(device, 0, keys=range(2))
    for dtype in (torch.float32, torch.float64):
        rng.uniform((2, 3, 5), streams, device, dtype)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- functions
_enabled = False
_mode = "default"
_functions: dict[object, object] = {}
_seconds: dict[str, float] = {}


def _mode_for(device: torch.device, cuda_graphs: bool) -> str:
    return "reduce-overhead" if device.type == "cuda" and cuda_graphs else "default"


def function(fn, name: str):
    """`fn` compiled whole (fullgraph: no graph breaks) where `enable` turned compilation
    on, else `fn` itself. One compiled function per `fn`: torch.compile specializes it to
    the model it first sees (its layer widths are constants of one graph, so there is one
    compilation per model, not one per width) and compiles again only for a new K or
    batch shape. The first call's seconds, compilation included, go to `seconds()`."""
    if not _enabled or torch.compiler.is_compiling():
        return fn
    key = (getattr(fn, "__self__", None), getattr(fn, "__func__", fn))
    if key not in _functions:
        compiled_fn = torch.compile(fn, fullgraph=True, mode=_mode)
        if _mode == "reduce-overhead":
            graphed = compiled_fn

            def compiled_fn(*args, **kwargs):
                # Each call is a new iteration for the CUDA graphs: the outputs of the
                # previous call (a step's gradients, an estimator chunk's sums) are used up
                # by then, so their memory may be reused rather than kept per call.
                torch.compiler.cudagraph_mark_step_begin()
                return graphed(*args, **kwargs)

        def timed_first_call(*args, **kwargs):
            start = time.perf_counter()
            out = compiled_fn(*args, **kwargs)
            _seconds[name] = _seconds.get(name, 0.0) + time.perf_counter() - start
            _functions[key] = compiled_fn  # later calls go straight to it
            return out

        _functions[key] = timed_first_call
    return _functions[key]


def forget() -> None:
    """Drop this process's compiled functions and their seconds, as in a fresh process:
    each function is compiled (or taken from torch's caches) and timed again at its next
    call. A compiled function serves every model of the process, so a second run in the
    same process (a resume, a test after another) otherwise reports no compilation."""
    _functions.clear()
    _seconds.clear()


def seconds() -> dict[str, float]:
    """Seconds of the first call of each compiled function (mostly compilation), by name."""
    return dict(_seconds)
