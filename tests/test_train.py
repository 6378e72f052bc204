"""`bihm train` end to end on small generated shards: learning, run folder, schedules,
non-finite loss, and resume after a hard kill mid-epoch."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning.callbacks import Callback

from bihm.lightning import BiHMModule, NonFiniteLossError
from pipeline.config import config_from_dict
from pipeline.train import TrainingError, run_training
from tests.conftest import STEPS_PER_EPOCH, make_shards, read_metrics, run_python, tiny_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


def test_train_end_to_end_improves_and_writes_the_run_folder(shards, tmp_path):
    run_dir = tmp_path / "run"
    cfg = config_from_dict(
        tiny_config(
            shards, run_dir, optim={"lr": 0.01, "switch": {"epoch": 2, "K": 10, "lr": 3e-3}}
        )
    )
    result = run_training(cfg)
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    first, last = float(rows[0]["val/log_ptilde_star"]), float(rows[-1]["val/log_ptilde_star"])
    assert last > first + 5, (first, last)
    for r in rows:  # log p* = log p~* - 2 log Z, and log p~* <= log p (Bhattacharyya bound)
        lpt, z = float(r["val/log_ptilde_star"]), float(r["val/two_log_z"])
        assert float(r["val/log_pstar"]) == pytest.approx(lpt - z)
        assert lpt <= float(r["val/log_p"]) + 1e-6
        assert float(r["val/n"]) == 200
        # Where the time went: training, then validation (with Gibbs and the pictures).
        assert float(r["train_time_s"]) > 0 and float(r["val_time_s"]) > 0
    times = [float(r["time"]) for r in rows]
    assert times == sorted(times) and times[-1] - times[0] >= float(rows[-1]["train_time_s"])
    # The K and lr switch at epoch 2 ("continue with larger K").
    assert [float(r["train/K"]) for r in rows] == [5, 5, 10]
    assert [float(r["train/lr"]) for r in rows] == pytest.approx([0.01, 0.01, 3e-3])
    # Gibbs validation every 2 epochs: both error rates in [0, 1] at epoch 1 only.
    assert rows[0]["val/gibbs_error"] == "" and rows[2]["val/gibbs_error"] == ""
    assert 0 <= float(rows[1]["val/gibbs_error"]) <= 1
    assert 0 <= float(rows[1]["val/recon_error"]) <= 1
    # Run folder.
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == cfg.to_dict()
    assert (run_dir / "curves.png").stat().st_size > 0
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["epoch_0001.png"]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(p.startswith("best-epoch") for p in ckpts), ckpts
    assert result["best"] == pytest.approx(max(float(r["val/log_ptilde_star"]) for r in rows))
    # Checkpoints load with weights_only=True and hold the config as plain types.
    payload = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert payload["hyper_parameters"]["config"] == cfg.to_dict()
    assert payload["epoch"] == 2
    # Refuses to clobber a finished run without --resume.
    with pytest.raises(TrainingError, match="--resume"):
        run_training(cfg)


def _adam_steps(run_dir: Path) -> list[int]:
    """Adam's step count per parameter in the run's last.ckpt."""
    payload = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    (optimizer,) = payload["optimizer_states"]
    return sorted({int(state["step"]) for state in optimizer["state"].values()})


def test_switch_can_start_a_fresh_adam_state_once_also_across_a_resume(shards, tmp_path):
    """optim.switch.reset_optimizer: the switch epoch starts with Adam's moments and step
    count reset (the authors' reload); a resume after it keeps the new state."""
    switch = {"epoch": 2, "lr": 3e-3}
    for reset, expected in ((False, 3 * STEPS_PER_EPOCH), (True, STEPS_PER_EPOCH)):
        run_dir = tmp_path / f"run_{reset}"
        raw = tiny_config(
            shards, run_dir, optim={"lr": 0.01, "switch": {**switch, "reset_optimizer": reset}}
        )
        run_training(config_from_dict(raw))
        assert _adam_steps(run_dir) == [expected], reset
    # Resumed for a fourth epoch: epoch 3 goes on from the fresh state of epoch 2.
    raw["train"]["max_epochs"] = 4
    run_training(config_from_dict(raw), resume=True)
    assert _adam_steps(run_dir) == [2 * STEPS_PER_EPOCH]
    assert [float(r["train/lr"]) for r in read_metrics(run_dir)] == pytest.approx(
        [0.01, 0.01, 3e-3, 3e-3]
    )


def test_rws_runs_select_and_stop_on_validation_log_p(tmp_path):
    """log p~* is the BiHM's objective; an RWS model is judged by log p(x)."""
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    from pipeline.train import build_callbacks

    for objective, metric in (("bihm", "val/log_ptilde_star"), ("rws", "val/log_p")):
        raw = tiny_config(tmp_path, tmp_path / "run", train={"objective": objective})
        callbacks = build_callbacks(config_from_dict(raw), tmp_path / "run")
        watching = [c.monitor for c in callbacks if isinstance(c, ModelCheckpoint | EarlyStopping)]
        # best-*.ckpt and early stopping watch the metric; last.ckpt watches nothing.
        assert watching == [metric, None, metric], (objective, watching)


class PoisonAt(Callback):
    """Sets a weight to NaN before the given global step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.q_nets[0].weight[0, 0] = math.nan


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "run"
    cfg = config_from_dict(tiny_config(shards, run_dir))
    bad_step = STEPS_PER_EPOCH + 3  # epoch 1, after epoch 0's checkpoint
    with pytest.raises(NonFiniteLossError) as err:
        run_training(cfg, extra_callbacks=[PoisonAt(bad_step)])
    message = str(err.value)
    assert f"global step {bad_step}" in message and "epoch 1" in message, message
    payload = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert payload["epoch"] == 0 and payload["global_step"] == STEPS_PER_EPOCH
    assert all(torch.isfinite(v).all() for v in payload["state_dict"].values())
    assert [int(r["epoch"]) for r in read_metrics(run_dir)] == [0]


def test_resume_without_checkpoint_is_a_clear_error(shards, tmp_path):
    cfg = config_from_dict(tiny_config(shards, tmp_path / "run"))
    with pytest.raises(TrainingError, match="no checkpoint to resume from"):
        run_training(cfg, resume=True)


def test_schedules_are_pure_functions_of_the_epoch():
    cfg = config_from_dict(
        {
            "optim": {
                "lr": 1e-3,
                "schedule": "step",
                "gamma": 0.5,
                "step_size": 10,
                "switch": {"epoch": 25, "K": 100, "lr": 4e-4},
            },
            "train": {"K": 10, "max_epochs": 100},
        }
    ).to_dict()
    m = BiHMModule(cfg)
    assert [m.K_at(e) for e in (0, 24, 25, 99)] == [10, 10, 100, 100]
    assert m.lr_at(0) == pytest.approx(1e-3) and m.lr_at(10) == pytest.approx(5e-4)
    assert m.lr_at(25) == pytest.approx(4e-4 * 0.25)
    cfg["optim"].update(schedule="cosine", min_factor=0.1, switch={"epoch": None})
    m = BiHMModule(cfg)
    assert m.lr_at(0) == pytest.approx(1e-3) and m.lr_at(100) == pytest.approx(1e-4)
    assert m.lr_at(50) == pytest.approx(0.55e-3)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import yaml
    from pytorch_lightning.callbacks import Callback
    from pipeline.config import config_from_dict
    from pipeline.train import run_training

    class KillAt(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no checkpoint

    cfg = config_from_dict(yaml.safe_load(open(sys.argv[1])))
    run_training(cfg, extra_callbacks=[KillAt()])
    """
)


def test_resume_after_kill_mid_epoch_ends_where_an_uninterrupted_run_does(shards, tmp_path):
    epochs = 4
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    # An lr schedule and a K switch in the killed epoch: both must survive the resume.
    optim = {"lr": 0.01, "schedule": "exponential", "gamma": 0.8, "switch": {"epoch": 2, "K": 8}}
    full = config_from_dict(
        tiny_config(shards, full_dir, train={"max_epochs": epochs}, optim=optim)
    )
    run_training(full)

    killed = tiny_config(shards, killed_dir, train={"max_epochs": epochs}, optim=optim)
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(killed))
    (tmp_path / "killer.py").write_text(KILLER)
    kill_step = 2 * STEPS_PER_EPOCH + 3  # in the middle of epoch 2
    proc = run_python(
        [str(tmp_path / "killer.py"), str(tmp_path / "killed.yaml"), str(kill_step)], tmp_path
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    # Lost at most the work since the last checkpoint: the end of epoch 1.
    last = torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 2 * STEPS_PER_EPOCH)

    proc = run_python(
        ["-m", "pipeline.cli", "train", "--run-dir", str(killed_dir), "--resume"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    a = torch.load(full_dir / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert (
        (b["epoch"], b["global_step"])
        == (a["epoch"], a["global_step"])
        == (epochs - 1, epochs * STEPS_PER_EPOCH)
    )
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    # Adam's moments were restored too (they enter every later step).
    exp_avg = [s["exp_avg_sq"] for s in b["optimizer_states"][0]["state"].values()]
    ref = [s["exp_avg_sq"] for s in a["optimizer_states"][0]["state"].values()]
    for x, y in zip(exp_avg, ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)
    rows_a, rows_b = read_metrics(full_dir), read_metrics(killed_dir)
    assert [r["epoch"] for r in rows_b] == [str(e) for e in range(epochs)]
    assert [float(r["train/K"]) for r in rows_b] == [5, 5, 8, 8]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("train/lr", "train/loss", "val/log_ptilde_star", "val/two_log_z"):
            assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-6, abs=1e-6), key


class FirstBatch(Callback):
    """Records (epoch, global step) at the first training batch of a fit."""

    def __init__(self) -> None:
        self.at: tuple[int, int] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.at is None:
            self.at = (trainer.current_epoch, trainer.global_step)


def test_resume_continues_at_the_saved_epoch_and_step_and_keeps_earlier_rows(shards, tmp_path):
    """A resume loads last.ckpt into the Trainer: its first batch is at the saved epoch and
    global step, and the rows of the epochs before stay in metrics.csv byte for byte (their
    times too). Comparing end states cannot tell this from a run started over, since
    training is seeded by the global step."""
    run_dir = tmp_path / "run"
    raw = tiny_config(shards, run_dir, train={"max_epochs": 2})
    raw["data"].update(train_limit=300, valid_limit=64)  # 3 steps an epoch
    raw["validation"]["gibbs"]["every_n_epochs"] = 0
    raw["samples"]["every_n_epochs"] = 0
    first = FirstBatch()
    run_training(config_from_dict(raw), extra_callbacks=[first])
    assert first.at == (0, 0)
    before = (run_dir / "metrics.csv").read_bytes()
    assert len(before.splitlines()) == 3  # the header and epochs 0, 1

    raw["train"]["max_epochs"] = 3
    resumed = FirstBatch()
    result = run_training(config_from_dict(raw), resume=True, extra_callbacks=[resumed])
    assert resumed.at == (2, 2 * 3)
    assert result["epochs"] == 3
    after = (run_dir / "metrics.csv").read_bytes()
    assert after.startswith(before), (before, after)
    assert [r["epoch"] for r in read_metrics(run_dir)] == ["0", "1", "2"]


def test_early_stopping_on_validation_log_ptilde_star(shards, tmp_path):
    """With an lr far below float32 resolution the weights, hence the (fixed-seed) validation
    log p~*, do not change: patience 1 stops the run after 2 of 5 epochs."""
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        shards, run_dir, train={"max_epochs": 5, "early_stopping_patience": 1}, optim={"lr": 1e-20}
    )
    cfg["validation"]["gibbs"]["every_n_epochs"] = 0
    cfg["samples"]["every_n_epochs"] = 0
    result = run_training(config_from_dict(cfg))
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert rows[0]["val/log_ptilde_star"] == rows[1]["val/log_ptilde_star"]
    assert result["epochs"] == 2
    # last.ckpt is the newest epoch even though epoch 1 did not improve (so --resume goes on
    # from where the run stopped, not from its best epoch); best-*.ckpt stays at epoch 0.
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * STEPS_PER_EPOCH
    assert [p.name for p in (run_dir / "checkpoints").glob("best-*.ckpt")] == [
        "best-epoch0000.ckpt"
    ]


def _frozen_config(shards: Path, run_dir: Path, **train) -> dict:
    """A tiny run whose validation log p~* cannot change (an lr far below float32
    resolution): every validation after the first is one without improvement."""
    cfg = tiny_config(shards, run_dir, train=train, optim={"lr": 1e-20})
    cfg["data"].update(train_limit=300, valid_limit=64)  # 3 steps an epoch
    cfg["validation"]["gibbs"]["every_n_epochs"] = 0
    cfg["samples"]["every_n_epochs"] = 0
    return cfg


def test_validation_every_n_epochs_and_patience_in_epochs(shards, tmp_path):
    """validation.every_n_epochs 2: validated epochs 1, 3, 5, ..., a metrics.csv row each;
    a patience of 3 epochs is 2 validations, so the run stops at epoch 5 (not at 7, which a
    patience of 3 validations would give)."""
    run_dir = tmp_path / "run"
    cfg = _frozen_config(shards, run_dir, max_epochs=10, early_stopping_patience=3)
    cfg["validation"]["every_n_epochs"] = 2
    result = run_training(config_from_dict(cfg))
    assert [int(r["epoch"]) for r in read_metrics(run_dir)] == [1, 3, 5]
    assert result["epochs"] == 6


def _every_2nd_epoch(shards: Path, run_dir: Path, max_epochs: int) -> dict:
    cfg = _frozen_config(shards, run_dir, max_epochs=max_epochs, early_stopping_patience=None)
    cfg["validation"]["every_n_epochs"] = 2
    return cfg


def test_validating_every_nth_epoch_still_checkpoints_every_epoch(shards, tmp_path):
    """last.ckpt is written at every train epoch's end, not only at validations (where
    Lightning would write it when validation runs every n-th epoch): a run stopped after
    epoch 2 resumes at epoch 3, and the validated rows 1, 3, 5 stay, one each."""
    run_dir = tmp_path / "run"
    cfg = _every_2nd_epoch(shards, run_dir, max_epochs=3)
    run_training(config_from_dict(cfg))
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 3 * 3)  # 3 steps an epoch
    cfg["train"]["max_epochs"] = 6
    assert run_training(config_from_dict(cfg), resume=True)["epochs"] == 6
    assert [int(r["epoch"]) for r in read_metrics(run_dir)] == [1, 3, 5]


def test_a_resume_from_a_checkpoint_written_at_a_validation_end_keeps_its_row(
    shards, tmp_path, monkeypatch
):
    """Checkpoints written at a validation's end (last.ckpt, before it was saved at the
    train epoch's end) resume after that epoch, which neither trains nor validates again:
    its metrics.csv row stays (it was dropped, losing epoch 3's row here)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    run_dir = tmp_path / "run"
    cfg = _every_2nd_epoch(shards, run_dir, max_epochs=4)
    with monkeypatch.context() as m:  # as Lightning does by default at this cadence
        m.setattr(ModelCheckpoint, "_should_save_on_train_epoch_end", lambda self, t: False)
        run_training(config_from_dict(cfg))
    cfg["train"]["max_epochs"] = 8
    run_training(config_from_dict(cfg), resume=True)
    assert [int(r["epoch"]) for r in read_metrics(run_dir)] == [1, 3, 5, 7]


def test_a_patience_changed_on_resume_takes_effect(shards, tmp_path):
    """Lightning restores EarlyStopping's patience from the checkpoint; the config's wins
    here, while the wait count and best score still come from the checkpoint: 2 epochs at
    patience 5 (waiting 1), then --resume at patience 2 stops after epoch 2 (patience 5
    would run to epoch 5, and a lost wait count to epoch 4)."""
    run_dir = tmp_path / "run"
    cfg = _frozen_config(shards, run_dir, max_epochs=2, early_stopping_patience=5)
    run_training(config_from_dict(cfg))
    cfg["train"].update(max_epochs=8, early_stopping_patience=2)
    result = run_training(config_from_dict(cfg), resume=True)
    assert [int(r["epoch"]) for r in read_metrics(run_dir)] == [0, 1, 2]
    assert result["epochs"] == 3


def test_a_cadence_changed_on_resume_carries_the_wait_over_in_epochs(shards, tmp_path):
    """5 epochs validated every epoch wait 4 epochs since the best (epoch 0); --resume at
    every 2nd epoch with a patience of 10 epochs (5 validations) has waited 2 validations,
    and stops at epoch 9. Carried over as 4 validations, it would stop at epoch 5."""
    run_dir = tmp_path / "run"
    cfg = _frozen_config(shards, run_dir, max_epochs=5, early_stopping_patience=20)
    run_training(config_from_dict(cfg))
    cfg["train"].update(max_epochs=20, early_stopping_patience=10)
    cfg["validation"]["every_n_epochs"] = 2
    result = run_training(config_from_dict(cfg), resume=True)
    assert [int(r["epoch"]) for r in read_metrics(run_dir)] == [0, 1, 2, 3, 4, 5, 7, 9]
    assert result["epochs"] == 10


def test_time_limit_stops_on_a_finished_validated_epoch(shards, tmp_path):
    """train.max_time_s is checked at epoch ends: a limit that has passed after the first
    step still lets epoch 0 finish, validate and checkpoint, then stops (not mid-epoch)."""
    run_dir = tmp_path / "run"
    cfg = tiny_config(shards, run_dir, train={"max_epochs": 4, "max_time_s": 1e-3})
    cfg["validation"]["gibbs"]["every_n_epochs"] = 0
    cfg["samples"]["every_n_epochs"] = 0
    result = run_training(config_from_dict(cfg))
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [0]
    assert math.isfinite(float(rows[0]["val/log_ptilde_star"]))
    assert result["epochs"] == 1
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == STEPS_PER_EPOCH  # the whole epoch, not a part of it


POISON_ONE_RANK = textwrap.dedent(
    """
    import math, sys
    import torch, yaml
    from pytorch_lightning.callbacks import Callback
    from pipeline.config import config_from_dict
    from pipeline.train import run_training

    class PoisonRank1(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_rank == 1 and trainer.global_step == int(sys.argv[2]):
                with torch.no_grad():
                    pl_module.model.p_nets[0].bias[0] = math.nan

    cfg = config_from_dict(yaml.safe_load(open(sys.argv[1])))
    run_training(cfg, devices=2, extra_callbacks=[PoisonRank1()])
    """
)


def test_non_finite_loss_on_one_ddp_rank_stops_all_ranks(shards, tmp_path):
    """A NaN on rank 1 only: both gloo ranks stop at the same step, no hang, no bad save."""
    run_dir = tmp_path / "run"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config(shards, run_dir)))
    (tmp_path / "poison.py").write_text(POISON_ONE_RANK)
    bad_step = STEPS_PER_EPOCH // 2 + 2  # 4 steps per epoch on each of 2 ranks: epoch 1
    proc = run_python(
        [str(tmp_path / "poison.py"), str(tmp_path / "c.yaml"), str(bad_step)], tmp_path
    )
    assert proc.returncode != 0
    assert f"non-finite loss or gradient at global step {bad_step} (epoch 1" in proc.stderr, (
        proc.stderr[-3000:]
    )
    payload = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert payload["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in payload["state_dict"].values())


def test_gaussian_visible_model_trains_on_continuous_shards(tmp_path):
    """model.families with a Gaussian x on dequantized data: trains, validates (bits/dim,
    inpainting mean squared error), samples and checkpoints end to end."""
    import numpy as np

    from data_shards import write_shards

    rng = np.random.default_rng(0)
    protos = rng.integers(0, 256, (6, 784))

    def split(n):
        x = protos[rng.integers(0, 6, n)] + rng.integers(-20, 21, (n, 784))
        return np.clip(x, 0, 255).astype(np.uint8)

    shards = tmp_path / "shards"
    data = {"train": split(800), "valid": split(200), "test": split(200)}
    write_shards(data, shards, source_hash="test", binarization="continuous", progress=False)
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        shards,
        run_dir,
        model={"layers": [784, 16, 8], "families": ["gaussian", "bernoulli", "bernoulli"]},
    )
    cfg["data"]["dataset"] = "mnist_continuous"
    cfg = config_from_dict(cfg)
    run_training(cfg)
    rows = read_metrics(run_dir)
    first, last = float(rows[0]["val/log_p"]), float(rows[-1]["val/log_p"])
    assert last > first + 50, (first, last)
    for r in rows:
        bpd = (-float(r["val/log_p"]) + 784 * math.log(256)) / (784 * math.log(2))
        assert float(r["val/bpd"]) == pytest.approx(bpd)
    assert 0 <= float(rows[1]["val/gibbs_error"]) < 1  # a mean squared error of [0, 1) pixels
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["epoch_0001.png"]
    module = BiHMModule.load_from_checkpoint(
        run_dir / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert module.model.families == ["gaussian", "bernoulli", "bernoulli"]


def test_labelled_model_trains_semi_supervised_and_eval_reports_test_error(tmp_path, capsys):
    """model.labels with half of the training labels: the label node learns the classes of
    generated prototypes (errors far below chance from q(y|x) and p*(y|x)), and `bihm eval`
    reports the test error, the same for any batch size."""
    import json

    import numpy as np

    from bihm.lightning import labelled
    from data_shards import write_shards
    from pipeline.cli import main

    rng = np.random.default_rng(1)
    protos = rng.random((4, 784)) < 0.25

    def split(n):
        y = rng.integers(0, 4, n)
        return (protos[y] ^ (rng.random((n, 784)) < 0.05)).astype(np.uint8), y

    parts = {"train": split(800), "valid": split(200), "test": split(150)}
    shards = tmp_path / "shards"
    write_shards(
        {k: v[0] for k, v in parts.items()},
        shards,
        source_hash="test",
        labels={k: v[1] for k, v in parts.items()},
        progress=False,
    )
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        shards,
        run_dir,
        model={"layers": [784, 16, 8], "labels": 4},
        train={"labelled_fraction": 0.5, "max_epochs": 4},
    )
    cfg["data"]["dataset"] = "mnist_static"
    cfg["validation"]["gibbs"]["every_n_epochs"] = 0
    cfg["samples"]["every_n_epochs"] = 0
    run_training(config_from_dict(cfg))
    rows = read_metrics(run_dir)
    assert float(rows[-1]["val/error_q"]) < 0.2 and float(rows[-1]["val/error_pstar"]) < 0.2
    # Half of the labels, by index: the same examples every epoch.
    keep = labelled(torch.arange(800), 0.5)
    assert abs(keep.float().mean().item() - 0.5) < 0.01

    args = ["eval", "--checkpoint", str(run_dir / "checkpoints" / "last.ckpt"), "--no-progress"]
    args += ["--samples", "1,20", "--z-samples", "500", "--z-chunk", "250"]
    assert main([*args, "--json", str(tmp_path / "a.json"), "--batch-size", "64"]) == 0
    assert main([*args, "--json", str(tmp_path / "b.json"), "--batch-size", "50"]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["classification"] == b["classification"]
    assert set(a["classification"]) == {"1", "20"}
    assert a["classification"]["20"]["pstar"] < 0.2 and a["classification"]["20"]["q"] < 0.2
    assert "classification error" in capsys.readouterr().out
    # `bihm validate` reports the training-time metrics, Gibbs left out for a label node.
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    val = tmp_path / "val.json"
    assert main(["validate", "--checkpoint", ckpt, "--json", str(val), "--no-progress"]) == 0
    metrics = json.loads(val.read_text())
    assert metrics["val/error_q"] == float(rows[-1]["val/error_q"])
    assert "val/gibbs_error" not in metrics
