"""SIGTERM (scancel, a time limit, a preemption) stops `bihm train` with status 143 and the
line `interrupted at epoch N; continue with --resume`, and `--resume` continues from the
checkpoint it left: the end of the last finished epoch, or the starting state of a run that
was stopped in its first epoch.

Each run is a `bihm train` subprocess. The signal is real: a callback sends it to its own
process (or, under DDP, to its own rank) at a chosen global step, so the point where it
arrives is known; Lightning's and our handler then run as for a signal from outside.
The SLURM requeue is tested against a real local SLURM in tests/test_cluster_e2e.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import config_from_dict
from pipeline.train import EXIT_INTERRUPTED, run_training
from tests.conftest import STEPS_PER_EPOCH, make_shards, read_metrics, run_python, tiny_config

EPOCHS = 3

# `bihm train ARGS` with a callback that records where training started (the first batch's
# epoch and global step) and sends SIGTERM to its own process: {rank: ["batch", global step]}
# at the start of that training batch, {rank: ["validation", epoch]} at the end of that
# epoch's validation (before the module's hook reduces the validation sums across ranks).
SIGNALLER = textwrap.dedent(
    """
    import json, os, signal, sys
    from pytorch_lightning.callbacks import Callback
    import pipeline.train as train
    from pipeline.cli import main

    class Signaller(Callback):
        def __init__(self, when, out):
            self.when, self.out, self.first = when, out, None

        def _signal_at(self, trainer, where, n):
            if self.when.get(str(trainer.global_rank)) == [where, n]:
                os.kill(os.getpid(), signal.SIGTERM)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.first is None and trainer.is_global_zero:
                self.first = [trainer.current_epoch, trainer.global_step]
                with open(self.out, "w") as f:
                    json.dump(self.first, f)
            self._signal_at(trainer, "batch", trainer.global_step)

        def on_validation_epoch_end(self, trainer, pl_module):
            self._signal_at(trainer, "validation", trainer.current_epoch)

    when, out = json.loads(sys.argv[1]), sys.argv[2]
    build = train.build_callbacks
    train.build_callbacks = lambda cfg, run_dir: build(cfg, run_dir) + [Signaller(when, out)]
    sys.exit(main(["train", *sys.argv[3:]]))
    """
)
INTERRUPTED = re.compile(
    r"^bihm train: interrupted at epoch (\d+); continue with --resume", flags=re.M
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """The run folder of an uninterrupted run of the same config."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_training(config_from_dict(config(shards, run_dir)))
    return run_dir


def config(shards: Path, run_dir: Path) -> dict:
    cfg = tiny_config(shards, run_dir, train={"max_epochs": EPOCHS})
    cfg["validation"]["gibbs"]["every_n_epochs"] = 0
    cfg["samples"]["every_n_epochs"] = 0
    return cfg


def train(
    tmp_path: Path, args: list[str], when: dict[int, tuple] | None = None, timeout: float = 400
) -> tuple[subprocess.CompletedProcess, tuple[int, int] | None]:
    """`bihm train ARGS`, SIGTERM as `when` says (see SIGNALLER); returns the process and
    the (epoch, global step) of its first training batch."""
    script, first = tmp_path / "signaller.py", tmp_path / "first.json"
    script.write_text(SIGNALLER)
    first.unlink(missing_ok=True)
    when_arg = json.dumps({str(rank): list(w) for rank, w in (when or {}).items()})
    proc = run_python([str(script), when_arg, str(first), *args], tmp_path, timeout)
    return proc, tuple(json.loads(first.read_text())) if first.exists() else None


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_end_state(run_dir: Path, reference: Path) -> None:
    """The resumed run ends exactly where the uninterrupted one does: the same float32
    operations in the same order on one thread, from the same restored state."""
    a, b = checkpoint(reference), checkpoint(run_dir)
    assert (b["epoch"], b["global_step"]) == (a["epoch"], a["global_step"])
    for key, value in a["state_dict"].items():
        assert torch.equal(b["state_dict"][key], value), key
    assert without_times(read_metrics(run_dir)) == without_times(read_metrics(reference))


def without_times(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [
        {k: v for k, v in r.items() if k not in ("train_time_s", "val_time_s", "time")}
        for r in rows
    ]


@pytest.mark.parametrize(
    "step, epoch, saved_step",
    [
        # In epoch 2: the resume point is the end of epoch 1.
        (2 * STEPS_PER_EPOCH + 3, 2, 2 * STEPS_PER_EPOCH),
        # In epoch 0, before any checkpoint: the run's starting state is written.
        (3, 0, 0),
    ],
    ids=["mid-run", "first-epoch"],
)
def test_sigterm_exits_143_and_resume_continues_from_the_saved_epoch(
    shards, reference, tmp_path, step, epoch, saved_step
):
    run_dir = tmp_path / "run"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config(shards, run_dir)))
    proc, first = train(tmp_path, ["--config", "c.yaml"], when={0: ("batch", step)})
    assert proc.returncode == EXIT_INTERRUPTED == 143, proc.stderr[-3000:]
    assert [int(n) for n in INTERRUPTED.findall(proc.stderr)] == [epoch], proc.stderr[-3000:]
    assert "done" not in proc.stdout
    assert first == (0, 0)
    saved = checkpoint(run_dir)
    assert saved["global_step"] == saved_step
    rows_before = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows_before] == list(range(epoch))

    proc, first = train(tmp_path, ["--run-dir", "run", "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"bihm train: done after {EPOCHS} epochs" in proc.stdout
    # It continued from the saved epoch and step, and left the earlier rows as they were.
    assert first == (epoch, saved_step)
    assert read_metrics(run_dir)[:epoch] == rows_before
    assert_same_end_state(run_dir, reference)


def test_sigterm_at_an_epoch_s_last_batch_keeps_that_epoch(shards, tmp_path):
    """Lightning would stop before the epoch's validation, i.e. before its checkpoint: the
    run validates and checkpoints the epoch first, then stops."""
    run_dir = tmp_path / "run"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config(shards, run_dir)))
    proc, _ = train(tmp_path, ["--config", "c.yaml"], when={0: ("batch", STEPS_PER_EPOCH - 1)})
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert INTERRUPTED.findall(proc.stderr) == ["1"], proc.stderr[-3000:]
    assert checkpoint(run_dir)["global_step"] == STEPS_PER_EPOCH
    assert [r["epoch"] for r in read_metrics(run_dir)] == ["0"]


@pytest.mark.slow
def test_sigterm_to_one_ddp_rank_in_validation_stops_both_ranks_at_one_batch(shards, tmp_path):
    """Two gloo ranks; rank 1 alone is signalled (as one of srun's tasks may be first), while
    the ranks reduce epoch 0's validation sums. Both stop after the next training batch,
    without a deadlock, and the run resumes from epoch 1 and ends as an uninterrupted one.
    (Lightning's own handler broadcasts from rank 0 inside rank 1's signal handler, while
    rank 0 is in the validation's reduction: the ranks then hang, or gloo fails.)"""
    run_dir = tmp_path / "run"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config(shards, run_dir)))
    per_rank = STEPS_PER_EPOCH // 2  # 2 ranks share each epoch's batches
    args = ["--config", "c.yaml", "--devices", "2"]
    when = {1: ("validation", 0)}
    try:
        proc, _ = train(tmp_path, args, when, timeout=240)
    except subprocess.TimeoutExpired:
        kill_leftovers(tmp_path)
        pytest.fail("the DDP run did not stop within 240 s (deadlock)")
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert INTERRUPTED.findall(proc.stderr) == ["1"], proc.stderr[-3000:]  # rank 0 only
    assert "done" not in proc.stdout
    assert checkpoint(run_dir)["global_step"] == per_rank
    proc, first = train(tmp_path, ["--run-dir", "run", "--resume", "--devices", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert first == (1, per_rank)
    # Every row as in an uninterrupted DDP run: the signals corrupted no reduction.
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(config(shards, tmp_path / "ref")))
    proc, _ = train(tmp_path, ["--config", "ref.yaml", "--devices", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_end_state(run_dir, tmp_path / "ref")


def kill_leftovers(work: Path) -> None:
    """SIGKILL the signaller processes that run in `work` (hung DDP ranks)."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if "signaller.py" in args and cwd == str(work):
            os.kill(int(proc.name), signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_to_the_ray_driver_is_no_success_and_the_run_resumes(shards, tmp_path):
    """`--launcher ray`: SIGTERM to the driver shuts Ray down and ends the command with
    status 143 and the "interrupted" line, not Ray's abort; `--resume` continues the run."""
    run_dir = tmp_path / "run"
    cfg = config(shards, run_dir)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.update(RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--launcher", "ray", "--workers", "1"]
    driver = subprocess.Popen(
        [*cmd, "--config", "c.yaml"], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        import time

        deadline = time.monotonic() + 600
        while not (run_dir / "checkpoints" / "last.ckpt").exists():
            assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()
            time.sleep(0.5)
        driver.send_signal(signal.SIGTERM)
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 143, out[-3000:]
    assert "bihm train: done" not in out
    assert re.search(r"bihm train: interrupted at epoch \d+; continue with --resume", out), out[
        -3000:
    ]
    proc = run_python([*cmd[1:], "--run-dir", "run", "--resume"], tmp_path, 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"bihm train: done after {EPOCHS} epochs" in proc.stdout
    assert [int(r["epoch"]) for r in read_metrics(run_dir)] == list(range(EPOCHS))
