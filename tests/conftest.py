"""Shared test helpers: generated shards and configs, subprocess runs of the CLI.

Import them as `from tests.conftest import ...` (tests/ is a package)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 8  # make_shards: 800 training images, batches of 100


def random_splits(sizes=None, seed=0) -> dict[str, np.ndarray]:
    """Small binary data sets, e.g. {"train": 250, "valid": 70, "test": 31} images."""
    rng = np.random.default_rng(seed)
    sizes = sizes or {"train": 250, "valid": 70, "test": 31}
    return {name: (rng.random((n, 784)) < 0.3).astype(np.uint8) for name, n in sizes.items()}


def make_shards(out_dir: Path, n_train=800, n_valid=200, n_test=200, seed=0, labels=False) -> Path:
    """Learnable binary 'digits': noisy copies of 6 random prototypes; with `labels`, each
    image's label is its prototype (0..5)."""
    from data_shards import write_shards

    rng = np.random.default_rng(seed)
    protos = rng.random((6, 784)) < 0.25
    classes = {}

    def split(name, n):
        classes[name] = rng.integers(0, len(protos), n)
        flip = rng.random((n, 784)) < 0.03
        return (protos[classes[name]] ^ flip).astype(np.uint8)

    data = {
        name: split(name, n)
        for name, n in (("train", n_train), ("valid", n_valid), ("test", n_test))
    }
    write_shards(
        data,
        out_dir,
        shard_size=500,
        source_hash="test-generated",
        labels=classes if labels else None,
        progress=False,
    )
    return out_dir


def tiny_config(shard_dir: Path, run_dir: Path, **sections) -> dict:
    cfg = {
        "name": "tiny",
        "seed": 3,
        "run_dir": str(run_dir),
        "model": {"layers": [784, 16, 8]},
        "data": {
            "shard_dir": str(shard_dir),
            "batch_size": 100,
            "eval_batch_size": 64,
            "shuffle_buffer": 200,
        },
        "train": {
            "K": 5,
            "max_epochs": 3,
            "accelerator": "cpu",
            "log_every_n_steps": 4,
            "cpu_threads": 1,
            # Eager: the same numbers as compiled (tests/test_compiled.py checks that),
            # without a compilation in each of the suite's many processes.
            "compile": False,
        },
        "optim": {"lr": 0.01},
        "validation": {
            "K": 20,
            "z_samples": 1000,
            "z_chunk": 250,
            "gibbs": {
                "every_n_epochs": 2,
                "examples": 6,
                "steps": 2,
                "proposals": 20,
                "inner": 4,
                "chains": 2,
            },
        },
        "samples": {"every_n_epochs": 2, "n": 9, "gibbs_steps": 2, "proposals": 10, "inner": 4},
        "logging": {"wandb": "off", "progress_bar": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def run_python(args: list[str], cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run `python ARGS` with the repository importable; output captured as text."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))
