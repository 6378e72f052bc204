"""`bihm tune --workers-per-trial N`: each trial a Ray Train run of N workers (the code of
`bihm train --launcher ray`, started from the Tune trial: Ray's pattern for tuning Ray Train
runs), and `search_alg: optuna`.

Fast: the flags and checks before Ray starts, Optuna's search space, the pieces that run in
the workers. Slow: real sweeps of 2-worker trials (gloo) on generated shards, each trial
compared with a `bihm train --launcher ray --workers 2` run of the same config and seed, to
the tolerance of the Ray-vs-DDP test (tests/test_ray.py); ASHA stopping a running trial, a
failed trial, a killed worker, `--resume`; an Optuna sweep whose best.yaml trains.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError, config_from_dict
from pipeline.ray_launcher import StopRequested
from pipeline.tune import (
    EPOCHS_DONE,
    METRICS,
    STOP_CHECK_EVERY,
    TrialScaling,
    TrialSettings,
    TrialWorkerCallback,
    check_resources,
    concurrent_trials,
    decode_params,
    load_sweep,
    trial_config,
    trial_scaling,
    tune_result,
)
from tests.conftest import ROOT, make_shards, read_metrics, run_python
from tests.test_ray import (
    KILL_ONCE,
    SECRET,
    STEPS_PER_EPOCH,
    assert_no_secret,
    assert_one_wandb_run,
    assert_same_metrics,
    ray_config,
    ray_train,
    wandb_runs,
    write_config,
)
from tests.test_tune import make_sweep, read_csv, write_yaml

METRIC = "val/log_ptilde_star"


@pytest.fixture(autouse=True)
def ray_env(monkeypatch):
    """The environment of the Ray subprocesses (as tests/test_ray.py): undeduplicated worker
    logs, no usage reports, a fake API key that must not reach any file, no foreign Ray."""
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


# --------------------------------------------------------------------------- flags, checks
def test_multi_worker_flags_are_checked_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.chdir(tmp_path)
    path = str(make_sweep(tmp_path))
    for argv, message in [
        (["--gpus-per-worker", "1"], "--gpus-per-worker needs --workers-per-trial"),
        (["--cpus-per-worker", "2"], "--cpus-per-worker needs --workers-per-trial"),
        (["--max-failures", "1"], "--max-failures needs --workers-per-trial"),
        (["--workers-per-trial", "2", "--gpus-per-worker", "1"], "train.accelerator is cpu"),
        (["--workers-per-trial", "2", "--max-failures", "-2"], "--max-failures must be >= -1"),
    ]:
        assert main(["tune", "--config", path, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exit_:  # refused by argparse, one line
        main(["tune", "--config", path, "--workers-per-trial", "0"])
    assert exit_.value.code == 2
    assert "--workers-per-trial: must be >= 1" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


def test_trial_workers_default_to_the_sweeps_resources_and_must_fit_the_cluster(tmp_path):
    sweep = load_sweep(make_sweep(tmp_path, resources={"cpu": 2, "gpu": 0}))
    assert trial_scaling(sweep, None) is None
    scaling = trial_scaling(sweep, 3)
    assert scaling == TrialScaling(workers=3, cpus_per_worker=2, gpus_per_worker=0)
    assert scaling.max_failures == 2
    assert trial_scaling(sweep, 3, cpus_per_worker=0.5, max_failures=0) == TrialScaling(
        3, 0.5, 0, 0
    )
    check_resources(sweep, {"CPU": 6.0}, scaling)
    with pytest.raises(ConfigError, match=r"--workers-per-trial 3: a trial's workers need 6 CPUs "):
        check_resources(sweep, {"CPU": 5.0}, scaling)
    check_resources(sweep, {"CPU": 5.0})  # one-worker trials of 2 CPUs fit
    # At most as many multi-worker trials as the scarcest resource holds.
    assert concurrent_trials(sweep, {"CPU": 13.0}, scaling) == 2
    assert concurrent_trials(sweep, {"CPU": 13.0, "GPU": 3.0}, TrialScaling(2, 1, 1)) == 1
    assert concurrent_trials(sweep, {"CPU": 13.0, "GPU": 8.0}, TrialScaling(2, 1, 1)) == 4
    assert concurrent_trials(sweep, {"CPU": 13.0}, None) == 0  # Tune's default
    limited = load_sweep(make_sweep(tmp_path, max_concurrent_trials=1))
    assert concurrent_trials(limited, {"CPU": 13.0}, scaling) == 1
    assert concurrent_trials(limited, {"CPU": 13.0}, None) == 1
    more = load_sweep(make_sweep(tmp_path, max_concurrent_trials=3, resources={"cpu": 2}))
    assert concurrent_trials(more, {"CPU": 13.0}, scaling) == 2  # what the cluster holds


def test_a_sweep_resumes_with_the_workers_per_trial_it_was_started_with(
    tmp_path, monkeypatch, capsys
):
    """sweep.json keeps the trials' workers; `--resume` with other ones is refused before
    Ray starts (without any, the sweep's own are used)."""
    import ray

    monkeypatch.chdir(tmp_path)
    path = make_sweep(tmp_path)
    out = tmp_path / "runs" / "s"
    (out / "tune").mkdir(parents=True)
    (out / "tune" / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    started = {"num_samples": 1, "overrides": [], "scaling": None}
    (out / "sweep.json").write_text(json.dumps(started))
    assert main(["tune", "--config", str(path), "--resume", "--workers-per-trial", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume: the sweep was started with one-worker" in err
    started["scaling"] = TrialScaling(workers=2, cpus_per_worker=1.0).to_dict()
    (out / "sweep.json").write_text(json.dumps(started))
    argv = ["tune", "--config", str(path), "--resume", "--workers-per-trial", "2"]
    assert main([*argv, "--cpus-per-worker", "0.5"]) == 2
    err = capsys.readouterr().err
    assert '--resume: the sweep was started with {"workers": 2, "cpus_per_worker": 1.0' in err
    assert not ray.is_initialized()


def test_optuna_without_the_tune_extra_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    path = make_sweep(tmp_path, search_alg="optuna")
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert "sweep key 'search_alg': optuna is not installed" in str(err.value)
    assert 'pip install -e ".[tune]"' in str(err.value)
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bihm tune: error: ") and "[tune]" in err, err
    monkeypatch.delitem(sys.modules, "optuna")
    assert load_sweep(path).spec.search_alg == "optuna"  # with the extra installed


def test_the_tune_extra_is_optuna_and_dev_installs_it():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    assert [r for r in extras["tune"] if r.startswith("optuna")] == extras["tune"] != []
    assert set(extras["tune"]) <= set(extras["dev"])  # the tests run the Optuna sweeps


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"search_alg": "hyperopt"}, "sweep key 'search_alg': must be one of random, optuna"),
        (
            {"search_alg": "optuna", "search": {"optim.lr": {"grid": [1e-3, 1e-2]}}},
            "search key 'optim.lr': grid is for search_alg random; optuna samples",
        ),
        ({"search_alg": "optuna", "search": {}}, "optuna needs a 'search' space"),
    ],
)
def test_bad_optuna_sweeps_are_clear_errors(tmp_path, sweep, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(make_sweep(tmp_path, **sweep))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_optuna_searches_lists_and_bundles_as_categories_of_their_json(tmp_path):
    """Optuna's categories must be plain values: a choice of layer lists or of bundles of
    settings is searched as the choice of their JSON texts, decoded in the trial."""
    from ray.tune.search.optuna import OptunaSearch

    recipes = [{}, {"optim.l2": 1e-4, "data.binarization": "dynamic"}]
    search = {
        "optim.lr": {"loguniform": [1e-3, 1e-2]},
        "train.K": {"choice": [5, 10]},
        "model.layers": {"choice": [[784, 16, 8], [784, 8]]},
        "set": {"choice": recipes},
    }
    sweep = load_sweep(make_sweep(tmp_path, search_alg="optuna", search=search))
    assert sweep.json_keys == ("model.layers", "set")
    space = sweep.param_space()
    assert space["train.K"].categories == [5, 10]
    assert space["model.layers"].categories == ["[784, 16, 8]", "[784, 8]"]
    assert [json.loads(c) for c in space["set"].categories] == recipes
    # Optuna takes the space: categorical distributions of plain values.
    dists = OptunaSearch.convert_search_space(space)
    assert dists["set"].choices == tuple(json.dumps(r) for r in recipes)
    # A trial's values, as Tune hands them over, give the config they name.
    settings = TrialSettings(
        sweep_name="s",
        base=sweep.base,
        sweep_dir="/s",
        cwd="/cwd",
        max_epochs=2,
        cpu_threads=1,
        json_keys=sweep.json_keys,
    )
    params = {"optim.lr": 3e-3, "train.K": 10, "model.layers": "[784, 8]"}
    params["set"] = json.dumps(recipes[1])
    cfg = config_from_dict(trial_config(settings, params, "t1"))
    assert (cfg.optim.lr, cfg.train.K, cfg.model.layers) == (3e-3, 10, [784, 8])
    assert (cfg.optim.l2, cfg.data.binarization) == (1e-4, "dynamic")
    assert decode_params(params, sweep.json_keys)["set"] == recipes[1]
    # Random search keeps the values themselves (Ray Tune takes any value).
    plain = load_sweep(make_sweep(tmp_path, search=search))
    assert plain.json_keys == () and plain.param_space()["set"].categories == recipes


# --------------------------------------------------------------------------- worker pieces
def fake_trainer(other_rank_stops: bool = False, **state) -> SimpleNamespace:
    """What TrialWorkerCallback uses of a Trainer; the strategy's all-reduce (any rank)
    answers for this rank and one other."""
    calls = []

    def reduce_boolean_decision(decision: bool, all: bool = True) -> bool:
        calls.append((decision, all))
        return decision or other_rank_stops

    trainer = SimpleNamespace(
        strategy=SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision),
        current_epoch=1,
        max_epochs=3,
        should_stop=False,
        state=SimpleNamespace(fn="fit"),
        calls=calls,
    )
    trainer.__dict__.update(state)
    return trainer


def test_workers_stop_together_when_tune_stops_the_trial(tmp_path):
    stop_file = tmp_path / "stop-requested"
    callback = TrialWorkerCallback(stop_file)
    trainer = fake_trainer()
    callback.on_train_batch_start(trainer, None, None, 0)
    callback.on_validation_start(trainer, None)
    # Between checks no collective at all: every rank skips the same steps.
    callback.on_train_batch_start(trainer, None, None, STOP_CHECK_EVERY - 1)
    assert trainer.calls == [(False, False), (False, False)]  # all=False: any rank decides
    stop_file.write_text("stopped by Ray Tune\n")
    with pytest.raises(StopRequested, match="Ray Tune stopped the trial"):
        callback.on_train_batch_start(trainer, None, None, STOP_CHECK_EVERY)
    with pytest.raises(StopRequested):
        callback.on_validation_start(trainer, None)
    stop_file.unlink()  # another rank saw it first: this one stops with it
    with pytest.raises(StopRequested):
        callback.on_train_batch_start(fake_trainer(other_rank_stops=True), None, None, 0)


@pytest.mark.parametrize(
    "epoch, should_stop, final", [(1, False, 0.0), (2, False, 1.0), (0, True, 1.0)]
)
def test_workers_mark_the_last_epoch_in_their_report(tmp_path, epoch, should_stop, final):
    """`final` (training ends after this epoch: the last one, early stopping, the time
    limit) goes with the epoch's metrics to Tune, and not to the loggers."""
    logged = []
    module = SimpleNamespace(log=lambda *a, **kw: logged.append((a, kw)))
    trainer = fake_trainer(current_epoch=epoch, should_stop=should_stop)
    TrialWorkerCallback(tmp_path / "stop").on_train_epoch_end(trainer, module)
    ((args, kwargs),) = logged
    assert args == ("final", final) and kwargs["logger"] is False


def test_tune_gets_every_metric_and_the_epochs_done():
    result = tune_result({"epoch": 2, METRIC: -90.5, "final": 1.0, "step": 12})
    assert result[METRIC] == -90.5 and result["final"] is True and result[EPOCHS_DONE] == 3
    # Lightning logs no non-finite value; Tune fails a trial whose result lacks the metric.
    missing = [m for m in METRICS if m != METRIC]
    assert all(math.isnan(result[m]) for m in missing)
    assert tune_result({"epoch": 0})["final"] is False


# --------------------------------------------------------------------------- bihm submit
@pytest.fixture
def job_folder(tmp_path, monkeypatch) -> Path:
    """A sweep over a tiny base config in the job's folder (the current directory)."""
    monkeypatch.chdir(tmp_path)
    make_sweep(tmp_path, name="lr")
    return tmp_path / "sweep.yaml"


def test_submit_slurm_tune_runs_multi_worker_trials(job_folder, capsys):
    argv = ["submit", "slurm", "--tune", str(job_folder), "--gpus-per-node", "4"]
    argv += ["--cpus-per-task", "8", "--workers-per-trial", "2", "--gpus-per-worker", "1"]
    assert main([*argv, "--cpus-per-worker", "4", "--dry-run"]) == 0
    (cmd,) = [x for x in capsys.readouterr().out.splitlines() if "-m pipeline.cli tune" in x]
    # A requeued job adds --resume ("$resume", cluster/slurm-requeue.sh).
    assert cmd == (
        f'"$PYTHON" -m pipeline.cli tune --config {job_folder} --address "$address" '
        "--workers-per-trial 2 --gpus-per-worker 1 --cpus-per-worker 4 "
        '${resume[@]+"${resume[@]}"} &'
    )
    # Without the per-worker flags, `bihm tune` takes the sweep's resources per worker.
    assert main(["submit", "slurm", "--tune", str(job_folder), "--workers-per-trial", "2",
                 "--dry-run"]) == 0  # fmt: skip
    (cmd,) = [x for x in capsys.readouterr().out.splitlines() if "-m pipeline.cli tune" in x]
    assert cmd.endswith('--address "$address" --workers-per-trial 2 ${resume[@]+"${resume[@]}"} &')
    for extra, message in [
        (["--workers-per-trial", "3", "--gpus-per-worker", "2"], "a trial of 3 workers needs 6, "),
        (["--workers-per-trial", "2", "--cpus-per-worker", "5"], "needs 10, the allocation has 8"),
        (["--workers-per-trial", "0"], "--workers-per-trial: must be >= 1"),
        (["--gpus-per-worker", "1"], "--gpus-per-worker: only with --tune and --workers-per"),
    ]:
        assert main([*argv[:4], "--gpus-per-node", "4", "--cpus-per-task", "8", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (extra, err)
    cfg = job_folder.parent / "tiny.yaml"
    assert main(["submit", "slurm", "--config", str(cfg), "--workers-per-trial", "2"]) == 2
    assert "--workers-per-trial: only with --tune" in capsys.readouterr().err


# --------------------------------------------------------------------------- Ray sweeps
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


def ray_sweep(tmp_path: Path, shards: Path, lrs: list[float], epochs: int, **sweep) -> Path:
    """A sweep over the Ray tests' config (tests/test_ray.py: 400 training images, 2
    steps an epoch on each of 2 workers, pictures every 2 epochs, wandb offline): a grid
    over optim.lr, one trial at a time, outputs in tmp_path/out."""
    base = ray_config(shards, tmp_path / "unused", epochs=epochs)
    base.pop("run_dir")
    write_yaml(tmp_path / "base.yaml", base)
    data = {
        "name": "s",
        "base": "base.yaml",
        "run_dir": str(tmp_path / "out"),
        "max_epochs": epochs,
        "search": {"optim.lr": {"grid": lrs}},
        "max_concurrent_trials": 1,
        "scheduler": {"type": "none"},
        **sweep,
    }
    return write_yaml(tmp_path / "sweep.yaml", data)


@pytest.fixture(scope="module")
def ray_runs(shards, tmp_path_factory) -> dict[float, list[dict]]:
    """metrics.csv of `bihm train --launcher ray --workers 2` with each learning rate the
    sweeps below try: 3 epochs at lr 0.01, 2 at 0.003."""
    out = {}
    for lr, epochs in ((0.01, 3), (0.003, 2)):
        tmp = tmp_path_factory.mktemp(f"ray-{lr}")
        cfg = ray_config(shards, tmp / "run", epochs=epochs, wandb="off")
        cfg["optim"]["lr"] = lr
        ray_train(["--config", str(write_config(tmp / "c.yaml", cfg)), "--workers", "2"], tmp)
        out[lr] = read_metrics(tmp / "run")
    return out


def trial_rows(sweep_dir: Path) -> list[dict[str, str]]:
    return read_csv(sweep_dir / "results.csv")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_trials_of_two_workers_equal_ray_train_runs_with_one_wandb_run_each(
    shards, tmp_path, ray_runs
):
    """2 trials x 2 gloo workers, one at a time on 2 CPUs: each trial's metrics are those of
    `bihm train --launcher ray --workers 2` with its config and seed; results.csv, best.yaml
    and trials.png as for one-worker trials; each trial has one wandb run, of rank 0."""
    path = ray_sweep(tmp_path, shards, [0.01, 0.003], epochs=2)
    argv = ["-m", "pipeline.cli", "tune", "--config", str(path), "--num-cpus", "2"]
    proc = run_python([*argv, "--workers-per-trial", "2"], tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = tmp_path / "out"
    rows = trial_rows(out)
    assert [(r["optim.lr"], r["status"], r["epochs"]) for r in rows] == [
        ("0.01", "completed", "2"),
        ("0.003", "completed", "2"),
    ]
    for row in rows:
        trial_dir = out / row["run_dir"]
        metrics = read_metrics(trial_dir)
        assert [m["epoch"] for m in metrics] == ["0", "1"]
        assert_same_metrics(metrics, ray_runs[float(row["optim.lr"])])
        # Tune's values are what the workers reported: Lightning's float32 of metrics.csv.
        best = max(float(m[METRIC]) for m in metrics)
        assert float(row[f"best_{METRIC}"]) == float(torch.tensor(best, dtype=torch.float32))
        assert yaml.safe_load((trial_dir / "config.yaml").read_text())["optim"]["lr"] == float(
            row["optim.lr"]
        )
        assert_one_wandb_run(trial_dir)  # one run id, one start, none of rank 1
        assert list((trial_dir / "ray").glob("checkpoint_*/checkpoint.ckpt"))
        # Tune holds the reported epoch's checkpoint (what --resume continues from).
        assert glob.glob(str(out / "tune" / row["trial_id"] / "checkpoint_*" / "last.ckpt"))
    best_id = max(rows, key=lambda r: float(r[f"best_{METRIC}"]))["trial_id"]
    assert f"(trial {best_id}, epoch 1)" in proc.stdout
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["optim"]["lr"] == float(
        next(r for r in rows if r["trial_id"] == best_id)["optim.lr"]
    )
    assert (out / "trials.png").stat().st_size > 0
    assert json.loads((out / "sweep.json").read_text())["scaling"]["workers"] == 2
    ranks = set(re.findall(r"Ray Train worker rank (\d)/2", proc.stderr))
    assert ranks == {"0", "1"}, proc.stderr[-3000:]
    assert_no_secret(out)


HOLD_AND_SWEEP = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pytorch_lightning.callbacks import Callback
    from pipeline.tune import STOP_FILE, TrialScaling, load_sweep, run_sweep

    class HoldUntilStopped(Callback):
        '''Every worker of the trial with a learning rate below 1e-10 waits at the start of
        its epoch 1 (at most 300 s) until Tune's stop request is in its run folder, so that
        Tune stops it while it runs, on a machine of any speed.'''

        def on_train_epoch_start(self, trainer, pl_module):
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            if lr < 1e-10 and trainer.current_epoch == 1:
                stop = Path(trainer.default_root_dir) / STOP_FILE
                deadline = time.time() + 300
                while not stop.exists() and time.time() < deadline:
                    time.sleep(0.2)

    scaling = TrialScaling(workers=2, cpus_per_worker=1, gpus_per_worker=0, max_failures=0)
    outcome = run_sweep(
        load_sweep(sys.argv[1]), num_cpus=2, scaling=scaling, extra_callbacks=[HoldUntilStopped()]
    )
    print("best", outcome["best"].trial_id)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_asha_stops_a_running_trial_whose_workers_end_cleanly_and_a_failed_trial_is_recorded(
    shards, tmp_path, ray_runs
):
    """One trial at a time: lr 0.01 learns for 3 epochs; ASHA stops lr 1e-20 after its
    first epoch, while it trains (its workers stop at Tune's request, rank 0 finishes its
    wandb run and the run's workers are released, so the next trial can start); lr 1e39
    overflows at step 1, and its Ray Train run fails (no restarts): a failed trial."""
    path = ray_sweep(
        tmp_path,
        shards,
        [0.01, 1e-20, 1e39],
        epochs=3,
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    (tmp_path / "sweep.py").write_text(HOLD_AND_SWEEP)
    proc = run_python([str(tmp_path / "sweep.py"), str(path)], tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = tmp_path / "out"
    rows = trial_rows(out)
    assert [(r["optim.lr"], r["status"], r["epochs"]) for r in rows] == [
        ("0.01", "completed", "3"),
        ("1e-20", "stopped", "1"),
        ("1e+39", "failed", "0"),
    ]
    assert f"best {rows[0]['trial_id']}" in proc.stdout
    assert_same_metrics(read_metrics(out / rows[0]["run_dir"]), ray_runs[0.01])
    error = rows[2]["error"]
    assert error.startswith("pipeline.train.TrainingError: Ray training failed: "), error
    assert "non-finite loss" in error, error
    # The stopped trial: its workers ended at Tune's request at the start of epoch 1.
    stopped = out / rows[1]["run_dir"]
    assert "bihm: stopped: Ray Tune stopped the trial (epoch 1)" in proc.stderr
    assert [m["epoch"] for m in read_metrics(stopped)] == ["0"]
    # Rank 0 finished its wandb run: the run's records are in its offline folder.
    ((run_id, run),) = wandb_runs(stopped).items()
    assert len(run["dirs"]) == 1 and run["logged"] == run["dirs"], run
    assert METRIC in run["keys"]
    assert (stopped / "wandb_run_id").read_text().strip() == run_id
    assert best_lr(out) == 0.01


def best_lr(sweep_dir: Path) -> float:
    return yaml.safe_load((sweep_dir / "best.yaml").read_text())["optim"]["lr"]


# tests/test_ray.py's script up to its KillRank1Once callback (a SIGKILL of rank 1 at a step,
# once), then a sweep of one trial instead of one run.
KILL_AND_SWEEP = KILL_ONCE[: KILL_ONCE.index("cfg = config_from_dict")] + textwrap.dedent(
    """
    from pipeline.tune import TrialScaling, load_sweep, run_sweep

    scaling = TrialScaling(workers=2, cpus_per_worker=1, gpus_per_worker=0, max_failures=1)
    callback = KillRank1Once(sys.argv[2], int(sys.argv[3]))
    run_sweep(load_sweep(sys.argv[1]), num_cpus=2, scaling=scaling, extra_callbacks=[callback])
    """
)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_killed_worker_restarts_its_trial_from_the_checkpoint(shards, tmp_path, ray_runs):
    """Rank 1 of the trial is killed (SIGKILL) in epoch 1; Ray Train restarts the trial's
    workers from its checkpoint of epoch 0 and the trial ends as an uninterrupted run."""
    path = ray_sweep(tmp_path, shards, [0.01], epochs=2)
    marker = tmp_path / "killed"
    (tmp_path / "sweep.py").write_text(KILL_AND_SWEEP)
    kill_step = str(STEPS_PER_EPOCH + 1)  # the middle of epoch 1
    proc = run_python(
        [str(tmp_path / "sweep.py"), str(path), str(marker), kill_step], tmp_path, 900
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert marker.exists()
    ((row,),) = [trial_rows(tmp_path / "out")]
    assert (row["status"], row["epochs"]) == ("completed", "2")
    trial_dir = tmp_path / "out" / row["run_dir"]
    # The restarted rank 0 said where it continued from: Ray's checkpoint of epoch 0.
    resumed = set(re.findall(r"bihm: resuming from (\S+)", proc.stderr))
    assert resumed and all(p.startswith(f"{trial_dir}/ray/checkpoint_") for p in resumed), resumed
    assert len(resumed) == 1, resumed
    assert_same_metrics(read_metrics(trial_dir), ray_runs[0.01])
    assert [m["epoch"] for m in read_metrics(trial_dir)] == ["0", "1"]
    # One wandb run: the first start and the restart (whose records may be cut short).
    assert_one_wandb_run(trial_dir, resumes=1, killed=1)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_an_interrupted_sweep_of_multi_worker_trials_resumes_from_tunes_checkpoint(
    shards, tmp_path, ray_runs
):
    """Ctrl+C once Tune holds a checkpoint of the trial; `--resume` (without the flags: the
    sweep keeps its workers per trial) continues it from that checkpoint, and the trial
    ends with the metrics of an uninterrupted run."""
    path = ray_sweep(tmp_path, shards, [0.01], epochs=3)
    cmd = [sys.executable, "-m", "pipeline.cli", "tune", "--config", str(path), "--num-cpus", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [*cmd, "--workers-per-trial", "2"], cwd=tmp_path, env=env, stdout=log, stderr=log
        )
        try:
            deadline = time.time() + 900
            while time.time() < deadline and first.poll() is None:
                if glob.glob(str(out / "tune" / "*" / "checkpoint_*" / "last.ckpt")):
                    break
                time.sleep(0.2)
            if first.poll() is None:
                os.kill(first.pid, signal.SIGINT)  # Ctrl+C: the driver only
            rc = first.wait(timeout=300)
        finally:
            if first.poll() is None:
                first.kill()
    log_text = (tmp_path / "first.log").read_text()
    assert rc == 130 and "continue it with --resume" in log_text, log_text[-3000:]
    ((row,),) = [trial_rows(out)]
    assert row["status"] == "unfinished" and int(row["epochs"]) < 3, row
    trial_dir = out / row["run_dir"]
    first_row = read_metrics(trial_dir)[0]

    proc = subprocess.run(
        [*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    ((row,),) = [trial_rows(out)]
    assert (row["status"], row["epochs"]) == ("completed", "3"), row
    # It went on from a checkpoint of this trial, not from a fresh start: the run folder's
    # last.ckpt, or Ray's or Tune's checkpoint of the same epoch (the first of equals), which
    # one depends on when the Ctrl+C fell. (Ray may forward a worker's line twice: count the
    # checkpoints named, not the lines.)
    resumed = set(re.findall(r"bihm: resuming from (\S+)", proc.stderr))
    assert len(resumed) == 1, proc.stderr[-5000:]
    (path,) = resumed
    assert path == f"{trial_dir}/checkpoints/last.ckpt" or (
        path.startswith(f"{out}/") and "/checkpoint_" in path
    ), path
    metrics = read_metrics(trial_dir)
    assert metrics[0] == first_row
    assert [m["epoch"] for m in metrics] == ["0", "1", "2"]
    assert_same_metrics(metrics, ray_runs[0.01])
    runs = wandb_runs(trial_dir)
    assert len(runs) == 1 and len(next(iter(runs.values()))["dirs"]) == 2, runs


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_optuna_sweep_of_four_trials_writes_best_yaml_which_trains(shards, tmp_path):
    """`search_alg: optuna`, 4 short one-worker trials, 2 at a time, over a learning rate,
    layer lists and bundles of settings; best.yaml then trains with `bihm train`."""
    recipes = [{}, {"optim.l2": 1e-4}]
    path = make_sweep(
        tmp_path,
        shard_dir=shards,
        search_alg="optuna",
        num_samples=4,
        max_epochs=1,
        max_concurrent_trials=2,
        scheduler={"type": "none"},
        search={
            "optim.lr": {"loguniform": [1e-3, 3e-2]},
            "model.layers": {"choice": [[784, 16, 8], [784, 8]]},
            "set": {"choice": recipes},
        },
    )
    argv = ["-m", "pipeline.cli", "tune", "--config", str(path), "--num-cpus", "2"]
    proc = run_python(argv, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = tmp_path / "runs" / "s"
    rows = trial_rows(out)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}, rows
    for r in rows:
        assert 1e-3 <= float(r["optim.lr"]) <= 3e-2
        assert json.loads(r["model.layers"]) in ([784, 16, 8], [784, 8])
        assert json.loads(r["set"]) in recipes
        ran = yaml.safe_load((out / r["run_dir"] / "config.yaml").read_text())
        assert ran["model"]["layers"] == json.loads(r["model.layers"])
        assert ran["optim"]["l2"] == json.loads(r["set"]).get("optim.l2", 0.0)
    # Optuna chose them: the searcher's saved state is its study, with the TPE sampler.
    (state,) = glob.glob(str(out / "tune" / "searcher-state-*.pkl"))
    assert b"TPESampler" in Path(state).read_bytes()
    best = yaml.safe_load((out / "best.yaml").read_text())
    best_row = max(rows, key=lambda r: float(r[f"best_{METRIC}"]))
    assert best["optim"]["lr"] == float(best_row["optim.lr"])
    assert best["model"]["layers"] == json.loads(best_row["model.layers"])

    argv = ["-m", "pipeline.cli", "train", "--config", str(out / "best.yaml")]
    proc = run_python([*argv, "--set", "train.max_epochs=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = tmp_path / "runs" / "s_best"
    assert [m["epoch"] for m in read_metrics(trained)] == ["0"]
    ran = yaml.safe_load((trained / "config.yaml").read_text())
    assert (ran["model"], ran["optim"]) == (best["model"], best["optim"])
