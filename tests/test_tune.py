"""`bihm tune`: sweep files checked before any trial, the sweep folder's outputs, and (slow)
real Ray Tune sweeps on small generated shards: ASHA, a failing trial, and resume."""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, config_from_dict
from pipeline.tune import (
    TrialRecord,
    TrialSettings,
    check_resources,
    load_sweep,
    run_sweep,
    trial_config,
    write_outputs,
)
from tests.conftest import ROOT, make_shards, run_python, tiny_config

CONFIGS = ROOT / "configs"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_sweep(tmp_path: Path, shard_dir: Path | str = "shards", **sweep) -> Path:
    """A tiny base config next to a sweep file over it; returns the sweep file."""
    base = tiny_config(Path(shard_dir), tmp_path)
    base.pop("run_dir")
    base["samples"]["every_n_epochs"] = 0
    base["validation"]["gibbs"]["every_n_epochs"] = 0
    write_yaml(tmp_path / "tiny.yaml", base)
    data = {"name": "s", "base": "tiny.yaml", "max_epochs": 2, **sweep}
    data.setdefault("search", {"optim.lr": {"loguniform": [1e-3, 1e-2]}})
    return write_yaml(tmp_path / "sweep.yaml", data)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def dig(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


# --------------------------------------------------------------------------- sweep files
def test_shipped_sweeps_load_and_fit_their_purpose():
    smoke = load_sweep(CONFIGS / "sweep_smoke.yaml")
    assert smoke.name == "sweep_smoke" and smoke.spec.scheduler.type == "asha"
    assert smoke.num_trials(smoke.spec.num_samples) >= 4 and 2 <= smoke.max_epochs <= 3
    cfg = config_from_dict(smoke.base)
    assert sum(cfg.model.layers[1:]) <= 100 and cfg.data.train_limit <= 1000
    assert {"model.layers", "optim.lr"} <= {p.key for p in smoke.params}

    bmnist = load_sweep(CONFIGS / "sweep_bmnist.yaml")
    keys = {p.key for p in bmnist.params}
    assert {"optim.lr", "train.K", "data.batch_size", "train.objective", "model.layers"} <= keys
    layers = next(p for p in bmnist.params if p.key == "model.layers")
    assert [784, 300, 200, 100, 75, 50, 35, 30, 25, 20, 15, 10, 10] in layers.values
    assert config_from_dict(bmnist.base).data.train_limit is None  # the full data set

    study = load_sweep(CONFIGS / "sweep_generalization.yaml")
    assert study.spec.scheduler.type == "none" and study.max_epochs >= 100
    assert study.spec.metric == "val/log_pstar" and study.spec.resources.cpu == 1
    (recipes,) = study.params
    assert recipes.key == "set" and recipes.kind == "grid"
    assert {} in recipes.values and {"data.binarization": "dynamic"} in recipes.values
    assert any("optim.l1" in r for r in recipes.values)
    assert len([r for r in recipes.values if "optim.l2" in r and len(r) == 1]) >= 2


@pytest.mark.parametrize(
    "search, message",
    [
        ({"optim.lrr": {"choice": [1e-3]}}, "search key 'optim.lrr' value 0.001: config key "),
        ({"nope.lr": {"choice": [1]}}, "'nope': unknown key"),
        ({"train.K": {"choice": []}}, "search key 'train.K': choice needs a non-empty list"),
        ({"train.K": {"grid": 5}}, "search key 'train.K': grid needs a non-empty list"),
        ({"optim.lr": {"loguniform": [-1e-3, 1e-2]}}, "loguniform bounds must be > 0"),
        ({"optim.lr": {"uniform": [-0.5, 1e-2]}}, "'optim.lr': must be > 0, got -0.5"),
        ({"optim.lr": {"uniform": [1e-2, 1e-3]}}, "needs finite bounds low < high"),
        ({"train.K": {"randint": [-3, 10]}}, "'train.K': must be > 0, got -3"),
        ({"train.K": {"randint": [1.5, 10]}}, "randint bounds must be integers"),
        ({"optim.lr": {"normal": [0, 1]}}, "must be one of {choice|grid|uniform|"),
        ({"optim.lr": 0.01}, "search key 'optim.lr': must be one of"),
        ({"model.layers": {"choice": [[784, 16], [784, -4]]}}, "'model.layers[1]': must be > 0"),
        ({"train.objective": {"choice": ["bihm", "vae"]}}, "must be one of bihm, rws"),
        ({"run_dir": {"choice": ["a"]}}, "set by the sweep for each trial"),
        ({"optim.betas": {"choice": [[0.9, 1.5]]}}, "'optim.betas': must be two numbers"),
        ({"set": {"grid": [{}, 5]}}, "search key 'set': each value must map dotted config keys"),
        ({"set": {"uniform": [0, 1]}}, "bundles of settings are searched with choice or grid"),
        ({"set": {"grid": [{"optim.l2": -1}]}}, "'optim.l2': must be >= 0"),
    ],
)
def test_bad_search_space_is_a_clear_error_naming_the_key(tmp_path, search, message):
    path = make_sweep(tmp_path, search=search)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    text = str(err.value)
    assert message in text and "\n" not in text, text
    assert text.startswith(str(path)), text


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"schedular": {"type": "asha"}}, "sweep key 'schedular': unknown key"),
        ({"scheduler": {"type": "hyperband"}}, "'scheduler.type': must be one of asha, none"),
        ({"scheduler": {"reduction_factor": 1}}, "reduction_factor > 1"),
        ({"scheduler": {"grace_period": 5}}, "'scheduler.grace_period': 5 is more than"),
        ({"num_samples": 0}, "'num_samples': must be > 0"),
        ({"metric": "val/accuracy"}, "sweep key 'metric': must be one of"),
        ({"mode": "maximize"}, "'mode': must be one of max, min"),
        ({"resources": {"cpu": 0}}, "needs cpu > 0"),
        ({"base": "missing.yaml"}, "'missing.yaml' is neither a file"),
        ({"set": {"optim.lr": -1}}, "'optim.lr': must be > 0"),
        ({"set": {"optim.lr": 1e-3}, "search": {"optim.lr": {"choice": [1e-3]}}}, "also in 'set'"),
    ],
)
def test_bad_sweep_settings_are_clear_errors(tmp_path, sweep, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(make_sweep(tmp_path, **sweep))
    assert message in str(err.value), str(err.value)


def test_cli_rejects_a_bad_sweep_before_ray_or_any_trial(tmp_path, monkeypatch, capsys):
    import ray

    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    path = make_sweep(tmp_path, search={"optim.lr": {"choice": []}})
    assert main(["tune", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("bihm tune: error: ") and "'optim.lr'" in err, err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit) as exit_:  # refused by argparse, one line
        main(["tune", "--config", str(path), "--num-samples", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-samples: must be >= 1" in err, err
    assert main(["tune", "--config", str(path), "--address", "auto", "--num-cpus", "2"]) == 2
    assert "--num-cpus: only for a local Ray" in capsys.readouterr().err


def test_values_are_applied_with_their_types_and_a_grid_multiplies_the_trials(tmp_path):
    path = make_sweep(
        tmp_path,
        search={
            "optim.lr": {"loguniform": ["1e-4", "1e-2"]},  # YAML 1.1 reads these as strings
            "model.layers": {"grid": [[784, 8], [784, 16, 8]]},
            "train.objective": {"grid": ["bihm", "rws"]},
            "logging.wandb": {"choice": ["off"]},
        },
        num_samples=3,
    )
    sweep = load_sweep(path, ["data.batch_size=50"])
    assert sweep.num_trials(3) == 12
    assert sweep.base["data"]["batch_size"] == 50
    settings = TrialSettings(
        sweep_name="s",
        base=sweep.base,
        sweep_dir="/sweeps/s",
        cwd="/somewhere/cwd",
        max_epochs=2,
        cpu_threads=1,
    )
    params = {"optim.lr": 3e-3, "model.layers": [784, 16, 8], "train.objective": "rws"}
    cfg = config_from_dict(trial_config(settings, params, "abc_00001"))
    assert cfg.optim.lr == 3e-3 and cfg.model.layers == [784, 16, 8]
    assert cfg.train.objective == "rws" and cfg.train.max_epochs == 2
    assert cfg.run_dir == "/sweeps/s/trials/abc_00001" and cfg.name == "s-abc_00001"
    assert cfg.data.shard_dir == "/somewhere/cwd/shards"  # trials run in other directories
    assert cfg.logging.progress_bar is False


def test_a_bundle_of_settings_is_one_searched_value(tmp_path):
    """The search key `set`: each grid value is a recipe of several keys, applied together."""
    path = make_sweep(
        tmp_path,
        search={"set": {"grid": [{}, {"optim.l2": 1e-4, "data.binarization": "dynamic"}]}},
    )
    sweep = load_sweep(path)
    assert sweep.num_trials(1) == 2
    settings = TrialSettings(
        sweep_name="s", base=sweep.base, sweep_dir="/s", cwd="/cwd", max_epochs=2, cpu_threads=1
    )
    plain = config_from_dict(trial_config(settings, {"set": {}}, "t0"))
    recipe = trial_config(
        settings, {"set": {"optim.l2": 1e-4, "data.binarization": "dynamic"}}, "t1"
    )
    cfg = config_from_dict(recipe)
    assert (plain.optim.l2, plain.data.binarization) == (0.0, "fixed")
    assert (cfg.optim.l2, cfg.data.binarization) == (1e-4, "dynamic")
    assert cfg.data.shard_dir == "/cwd/shards"


def test_resources_the_cluster_cannot_meet_are_an_error(tmp_path):
    sweep = load_sweep(make_sweep(tmp_path, resources={"cpu": 2, "gpu": 0.5}))
    check_resources(sweep, {"CPU": 16.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match="'resources.gpu': a trial needs 0.5 but the Ray clu"):
        check_resources(sweep, {"CPU": 16.0})
    with pytest.raises(ConfigError, match="'resources.cpu': a trial needs 2 but the Ray cluster"):
        check_resources(sweep, {"CPU": 1.0, "GPU": 1.0})


# --------------------------------------------------------------------------- outputs
def test_outputs_pick_the_best_epoch_of_any_trial_and_record_failures(tmp_path):
    path = make_sweep(
        tmp_path,
        search={"optim.lr": {"choice": [1e-2, 1e-3]}, "model.layers": {"choice": [[784, 8]]}},
        run_dir=str(tmp_path / "out"),
    )
    sweep = load_sweep(path)
    records = [
        TrialRecord("t_0", "completed", {"optim.lr": 1e-2, "model.layers": [784, 8]},
                    [0, 1, 2], [-300.0, -250.0, -260.0]),
        TrialRecord("t_1", "stopped", {"optim.lr": 1e-3, "model.layers": [784, 8]},
                    [0], [-400.0]),
        TrialRecord("t_2", "failed", {"optim.lr": 1e-3, "model.layers": [784, 8]},
                    [0, 1], [-200.0, math.nan], "NonFiniteLossError: boom"),
    ]  # fmt: skip
    best = write_outputs(sweep, records)
    assert best is records[0]  # not the failed trial, though its epoch 0 was better
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert [r["status"] for r in rows] == ["completed", "stopped", "failed"]
    assert rows[0]["best_val/log_ptilde_star"] == "-250.0" and rows[0]["best_epoch"] == "1"
    assert rows[0]["final_val/log_ptilde_star"] == "-260.0" and rows[0]["epochs"] == "3"
    assert json.loads(rows[0]["model.layers"]) == [784, 8]
    assert rows[2]["error"] == "NonFiniteLossError: boom"
    best_cfg = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    assert best_cfg["optim"]["lr"] == 1e-2 and best_cfg["name"] == "s_best"
    assert best_cfg["run_dir"] is None and best_cfg["train"]["max_epochs"] == 3  # the base's
    assert (tmp_path / "out" / "trials.png").stat().st_size > 0

    sweep.spec.mode = "min"
    assert write_outputs(sweep, records) is records[1]
    (tmp_path / "out" / "best.yaml").unlink()
    failed = [TrialRecord("t_9", "failed", {}, [], [], "boom")]
    assert write_outputs(sweep, failed) is None
    assert not (tmp_path / "out" / "best.yaml").exists()


def test_collect_summarises_a_sweep_from_its_trial_folders(tmp_path, capsys):
    """`bihm tune --collect DIR` writes results.csv and trials.png from DIR/trials/*: each
    trial's recipe read back from its config.yaml (the empty recipe told apart from those
    that add keys), all its epochs (a continuation past the sweep's counts, a redone epoch
    once, its later value), completed once it has trained the sweep's epochs (by its last
    epoch, whatever the validation cadence)."""
    from pipeline.cli import main
    from pipeline.tune import apply_params

    grid = [{}, {"optim.l2": 1e-4}, {"optim.l2": 1e-4, "data.binarization": "dynamic"}]
    path = make_sweep(tmp_path, search={"set": {"grid": grid}}, metric="val/log_pstar")
    sweep = load_sweep(path)
    out = tmp_path / "study"
    rows = {  # folder: (recipe, [(epoch, value)])
        "plain": ({}, [(0, -200.0), (1, -150.0), (2, -140.0)]),
        "l2": ({"optim.l2": 1e-4}, [(0, -210.0), (1, -190.0), (1, -180.0)]),
        "both": ({"optim.l2": 1e-4, "data.binarization": "dynamic"}, [(0, -220.0)]),
        "every2": ({}, [(1, -160.0)]),  # validated every 2nd epoch: completed at epoch 1
    }
    for name, (recipe, metrics) in rows.items():
        run = out / "trials" / name
        run.mkdir(parents=True)
        cfg = config_from_dict(apply_params(sweep.base, recipe)).to_dict()
        write_yaml(run / "config.yaml", cfg)
        lines = ["epoch,val/log_pstar"] + [f"{e},{v}" for e, v in metrics]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")

    assert main(["tune", "--config", str(path), "--collect", str(out)]) == 0
    assert "collected 4 trials" in capsys.readouterr().out
    got = {r["trial_id"]: r for r in read_csv(out / "results.csv")}
    assert json.loads(got["plain"]["set"]) == {}
    assert json.loads(got["l2"]["set"]) == {"optim.l2": 1e-4}
    assert json.loads(got["both"]["set"]) == grid[2]
    assert got["plain"]["status"] == "completed" and got["plain"]["epochs"] == "3"
    assert got["l2"]["epochs"] == "2" and got["l2"]["final_val/log_pstar"] == "-180.0"
    assert got["both"]["status"] == "unfinished" and got["every2"]["status"] == "completed"
    assert got["every2"]["epochs"] == "2"  # epochs trained, not validations
    assert got["plain"]["best_val/log_pstar"] == "-140.0"
    assert (out / "trials.png").stat().st_size > 0

    # A folder whose config is no trial of this sweep: a one-line error naming it.
    stray = out / "trials" / "stray"
    stray.mkdir()
    cfg = config_from_dict(apply_params(sweep.base, {"optim.l2": 3e-3})).to_dict()
    write_yaml(stray / "config.yaml", cfg)
    (stray / "metrics.csv").write_text("epoch,val/log_pstar\n0,-1.0\n")
    assert main(["tune", "--config", str(path), "--collect", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{stray / 'config.yaml'}: its config matches 0 of the values of search key 'set'" in err


# --------------------------------------------------------------------------- Ray Tune
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture
def local_ray():
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    yield
    ray.shutdown()


def test_reports_between_validations_are_told_apart(shards, tmp_path):
    """Ray Train reports trainer.callback_metrics at every epoch's end; with validation every
    2nd epoch, the reports of epochs 0 and 2 repeat older (or no) validation metrics, and
    a multi-worker trial keeps only those of the validated epochs 1 and 3 for Tune."""
    from pytorch_lightning.callbacks import Callback

    from pipeline.train import run_training
    from pipeline.tune import validated_this_epoch

    class LikeRayTrain(Callback):  # what RayTrainReportCallback sends
        def __init__(self) -> None:
            self.reports: list[dict] = []

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
            self.reports.append({**metrics, "epoch": trainer.current_epoch})

    raw = tiny_config(shards, tmp_path / "run", train={"max_epochs": 4})
    raw["validation"].update(every_n_epochs=2)
    raw["validation"]["gibbs"]["every_n_epochs"] = 0
    raw["samples"]["every_n_epochs"] = 0
    raw["data"].update(train_limit=300, valid_limit=64)
    ray = LikeRayTrain()
    run_training(config_from_dict(raw), extra_callbacks=[ray])
    kept = [r for r in ray.reports if validated_this_epoch(r)]
    assert [r["epoch"] for r in ray.reports] == [0, 1, 2, 3]
    assert [r["epoch"] for r in kept] == [1, 3]
    assert kept[0]["val/log_pstar"] != kept[1]["val/log_pstar"]
    assert ray.reports[2]["val/log_pstar"] == kept[0]["val/log_pstar"]  # epoch 1's again


@pytest.mark.slow
def test_smoke_sweep_with_asha_writes_outputs_and_best_yaml_trains(shards, tmp_path):
    """configs/sweep_smoke.yaml on generated shards: 4 trials under ASHA, 2 at a time."""
    proc = run_python(
        ["-m", "pipeline.cli", "tune", "--config", str(CONFIGS / "sweep_smoke.yaml"),
         "--set", f"data.shard_dir={shards}", "--num-cpus", "2"],
        tmp_path,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "sweep_smoke"
    rows = read_csv(out / "results.csv")
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    assert {r["status"] for r in rows} <= {"completed", "stopped"}, rows
    assert any(r["status"] == "completed" and r["epochs"] == "3" for r in rows), rows
    assert (out / "trials.png").stat().st_size > 0

    # The best trial by its own run folder's metrics.csv (written by Lightning, not Tune).
    def best_of(trial_id):
        with open(out / "trials" / trial_id / "metrics.csv", newline="") as f:
            return max(float(r["val/log_ptilde_star"]) for r in csv.DictReader(f))

    best_id = max((r["trial_id"] for r in rows), key=best_of)
    best_row = next(r for r in rows if r["trial_id"] == best_id)
    assert float(best_row["best_val/log_ptilde_star"]) == pytest.approx(best_of(best_id))
    best = yaml.safe_load((out / "best.yaml").read_text())
    ran = yaml.safe_load((out / "trials" / best_id / "config.yaml").read_text())
    sweep = load_sweep(CONFIGS / "sweep_smoke.yaml")
    for p in sweep.params:
        assert dig(best, p.key) == dig(ran, p.key), p.key
    # Everything else is the trial's config too, but for what the sweep sets per trial.
    for data in (best, ran):
        del data["name"], data["run_dir"], data["train"]["max_epochs"]
        del data["logging"]["progress_bar"]
    assert best == ran

    proc = run_python(["-m", "pipeline.cli", "train", "--config", str(out / "best.yaml")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_csv(tmp_path / "runs" / "sweep_smoke_best" / "metrics.csv")) == 5


@pytest.mark.slow
def test_failed_trial_is_recorded_and_asha_stops_a_bad_trial(shards, tmp_path, local_ray):
    """One trial at a time over a grid: lr 1e-2 learns; lr 1e-20 does not and ASHA stops it
    after its first epoch; lr 1e39 overflows the weights: NonFiniteLossError at step 1."""
    path = make_sweep(
        tmp_path,
        shard_dir=shards,
        search={"optim.lr": {"grid": [1e-2, 1e-20, 1e39]}},
        max_concurrent_trials=1,
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        run_dir=str(tmp_path / "out"),
    )
    outcome = run_sweep(load_sweep(path))
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert [(r["optim.lr"], r["status"], r["epochs"]) for r in rows] == [
        ("0.01", "completed", "2"),
        ("1e-20", "stopped", "1"),
        ("1e+39", "failed", "0"),
    ]
    assert rows[2]["error"].startswith("bihm.lightning.NonFiniteLossError: non-finite loss")
    assert outcome["best"].trial_id == rows[0]["trial_id"]
    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    assert best["optim"]["lr"] == 0.01


def _trial_dirs(experiment: Path) -> list[str]:
    return sorted(glob.glob(str(experiment / "*_0000*")))


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(shards, tmp_path):
    """Ctrl+C during the third of 4 sequential trials; --resume finishes the sweep."""
    path = make_sweep(
        tmp_path,
        shard_dir=shards,
        num_samples=4,
        max_epochs=4,
        max_concurrent_trials=1,
        scheduler={"type": "none"},
    )
    cmd = [sys.executable, "-m", "pipeline.cli", "tune", "--config", str(path), "--num-cpus", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    experiment = tmp_path / "runs" / "s" / "tune"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=log)
        try:
            deadline = time.time() + 600
            while time.time() < deadline and proc.poll() is None:
                dirs = _trial_dirs(experiment)
                # The third trial's second epoch is in Tune's results (result.json, one line
                # an epoch): the driver processes a trial's results and checkpoint saves in
                # order, so the first epoch's checkpoint is registered by then. (The trial's
                # folder holds a checkpoint as soon as the trial persisted it, before the
                # driver registered it; a Ctrl+C in between restores the trial without one,
                # and it rightly starts afresh.) Two of its 4 epochs are left to interrupt.
                result = Path(dirs[2]) / "result.json" if len(dirs) >= 3 else None
                if result and result.is_file() and len(result.read_text().splitlines()) >= 2:
                    break
                time.sleep(0.2)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGINT)  # Ctrl+C: the driver only, not its trials
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    log_text = (tmp_path / "first.log").read_text()
    assert rc == 130 and "continue it with --resume" in log_text, log_text[-3000:]
    out = tmp_path / "runs" / "s"
    first = read_csv(out / "results.csv")
    done = [r["trial_id"] for r in first if r["status"] == "completed"]
    # Interrupted with work left: a trial not finished, or not yet started.
    assert len(done) >= 2, first
    assert len(first) < 4 or "unfinished" in {r["status"] for r in first}, first

    def snapshot(trial_id):
        metrics = out / "trials" / trial_id / "metrics.csv"
        result = experiment / trial_id / "result.json"
        return metrics.stat().st_mtime_ns, metrics.read_text(), result.read_text()

    before = {t: snapshot(t) for t in done}
    interrupted = [r["trial_id"] for r in first if r["status"] == "unfinished"]
    first_rows = {t: read_csv(out / "trials" / t / "metrics.csv")[0] for t in interrupted}

    proc = subprocess.run(
        [*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(out / "results.csv")
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}, rows
    assert all(r["epochs"] == "4" for r in rows)
    for t in done:  # finished trials were not run again
        assert snapshot(t) == before[t], t
    for t, row in first_rows.items():  # the interrupted one went on from its checkpoint
        assert read_csv(out / "trials" / t / "metrics.csv")[0] == row, t
    assert (out / "best.yaml").is_file()
