"""Which instruction sets torch's CPU kernels run with here; fails if asked to hold them to
AVX2 and they are not (`make test-avx2`, run by .ci/run).

Three libraries pick their kernels by CPU at run time, each with its own switch:
- ATen's vectorized kernels (exp, log-sum-exp, sums, random numbers): ATEN_CPU_CAPABILITY,
  read back by torch.backends.cpu.get_cpu_capability();
- MKL, the BLAS behind float32 matmuls: MKL_ENABLE_INSTRUCTIONS, which MKL honours on
  Intel CPUs only (elsewhere it runs its generic, at most AVX2, code path); the header that
  MKL_VERBOSE=1 prints names the code path it chose;
- oneDNN (bf16 matmuls, not used by float32 ones): ONEDNN_MAX_CPU_ISA, named by the "isa:"
  line of ONEDNN_VERBOSE=1.
Run: python -m tests.cpu_isa [--avx2]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

WIDER_THAN_AVX2 = re.compile(r"AVX-?512|Advanced Vector Extensions 512|AMX", re.IGNORECASE)


def _first_line(code: str, env: dict[str, str], pattern: str) -> str:
    """The first line matching `pattern` that `python -c code` prints with `env` added."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    for line in (proc.stdout + proc.stderr).splitlines():
        if re.search(pattern, line):
            return line.strip()
    return f"(no line matching {pattern!r})"


def kernels() -> dict[str, str]:
    """The code path of each library, as it reports it."""
    return {
        "ATen": torch.backends.cpu.get_cpu_capability(),
        "MKL": _first_line(
            "import torch; torch.ones(64, 64) @ torch.ones(64, 64)",
            {"MKL_VERBOSE": "1"},
            r"MKL_VERBOSE .*(processors|architecture)",
        ),
        "oneDNN": _first_line(
            "import torch; torch.ones(1, 8, 8, 8).to_mkldnn().to_dense()",
            {"ONEDNN_VERBOSE": "1"},
            r"onednn_verbose.*isa:",
        ),
    }


def main(argv: list[str]) -> int:
    found = kernels()
    for name, line in found.items():
        print(f"{name}: {line}")
    if "--avx2" not in argv:
        return 0
    wide = [] if found["ATen"] in ("AVX2", "DEFAULT") else ["ATen"]
    wide += [name for name in ("MKL", "oneDNN") if WIDER_THAN_AVX2.search(found[name])]
    if wide:
        print(
            f"cpu_isa: {', '.join(wide)} not held to AVX2; set ATEN_CPU_CAPABILITY=avx2 "
            "MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
