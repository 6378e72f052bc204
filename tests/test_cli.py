"""The `bihm` command line: sub-commands, clear errors, DDP training with 2 gloo processes,
and (slow) configs/smoke.yaml end to end on the real data."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from tests.conftest import make_shards, run_python, tiny_config
from tests.rounding import assert_same_up_to_rounding, validation_tolerances

ROOT = Path(__file__).resolve().parent.parent


def test_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 1e-3, "momentum": 0.9}}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'optim.momentum'" in err and "unknown key" in err
    # Without --config the paper config is used, and --set errors name the key too.
    assert main(["train", "--set", "train.K=zero"]) == 2
    err = capsys.readouterr().err
    assert "bmnist_paper.yaml" in err and "'train.K'" in err


def test_resume_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "config.yaml not found" in capsys.readouterr().err


def test_ddp_training_with_two_gloo_processes(tmp_path):
    """`bihm train --devices 2` on CPU; its validation numbers equal a 1-process validation."""
    shards = make_shards(tmp_path / "shards")
    cfg = tiny_config(shards, tmp_path / "run", train={"max_epochs": 2})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_python(
        ["-m", "pipeline.cli", "train", "--config", str(tmp_path / "c.yaml"), "--devices", "2"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("bihm train: done after 2 epochs") == 1  # printed by rank 0 only
    # Quiet by default: the deprecation inside Lightning's all_gather is hidden on every rank.
    assert "all_gather is deprecated" not in proc.stderr, proc.stderr[-4000:]
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert float(rows[-1]["val/n"]) == 200  # both ranks' shares, each example once
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert (
        main(
            [
                "validate",
                "--checkpoint",
                str(ckpt),
                "--json",
                str(tmp_path / "v.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    one = json.loads((tmp_path / "v.json").read_text())
    # 2 processes against 1: the same samples, float32 rounding may differ (tests/rounding.py).
    keys = ("val/log_p", "val/log_ptilde_star", "val/two_log_z", "val/gibbs_error")
    tol = validation_tolerances(one, z_samples=cfg["validation"]["z_samples"])
    trained = {k: float(rows[-1][k]) for k in keys}
    assert_same_up_to_rounding(trained, {k: one[k] for k in keys}, tol)


@pytest.mark.slow
def test_smoke_config_trains_on_real_data_and_improves(tmp_path):
    source = os.environ.get("BIHM_DATA_SOURCE")
    assert source and Path(source).is_dir(), "set BIHM_DATA_SOURCE to the binarized MNIST folder"
    start = time.time()
    config = str(ROOT / "configs" / "smoke.yaml")
    proc = run_python(
        [
            "-m",
            "pipeline.cli",
            "train",
            "--config",
            config,
            "--run-dir",
            str(tmp_path / "run"),
            "--set",
            f"data.shard_dir={tmp_path / 'shards'}",
        ],
        tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "has no shard manifest; preparing" in proc.stderr
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    first, last = (float(r["val/log_ptilde_star"]) for r in (rows[0], rows[-1]))
    print(f"smoke: val log p~* {first:.2f} -> {last:.2f} in {time.time() - start:.0f} s")
    assert last > first + 10
    assert (tmp_path / "run" / "samples").is_dir() and (tmp_path / "run" / "curves.png").is_file()


def test_train_without_data_or_network_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """No manifest, no BIHM_DATA_SOURCE and a download that fails: exit 2, no traceback."""
    import data_shards.sources

    def no_network(url, *args, **kwargs):
        raise OSError(f"{url}: download failed (no network)")

    monkeypatch.delenv("BIHM_DATA_SOURCE", raising=False)
    monkeypatch.setattr(data_shards.sources, "fetch", no_network)
    argv = ["train", "--config", str(ROOT / "configs" / "smoke.yaml")]
    argv += ["--set", f"data.shard_dir={tmp_path / 'shards'}", "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "could not prepare the data" in err and "BIHM_DATA_SOURCE" in err


# Known noise of `bihm train` (local launcher, one process) that is hidden by default.
NOISE = (
    "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
    "`isinstance(treespec, LeafSpec)` is deprecated",
    "Your `IterableDataset` has `__len__` defined",
)


def test_train_is_quiet_by_default_and_verbose_shows_everything(tmp_path):
    """The known noise of Lightning and torch is hidden; the rest of the output is not
    (the model summary, early stopping's lines, the done line). --verbose shows it all."""
    shards = make_shards(tmp_path / "shards", n_train=200, n_valid=100, n_test=100)
    cfg = tiny_config(shards, tmp_path / "run", train={"max_epochs": 1})
    cfg["validation"]["gibbs"]["every_n_epochs"] = 0
    cfg["samples"]["every_n_epochs"] = 0
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    for flags in ([], ["--verbose"]):
        run_dir = tmp_path / f"run{len(flags)}"
        argv = ["-m", "pipeline.cli", *flags, "train", "--config", str(tmp_path / "c.yaml")]
        proc = run_python([*argv, "--run-dir", str(run_dir)], tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        output = proc.stdout + proc.stderr
        assert "bihm train: done after 1 epochs" in output
        assert "Total params" in output and "Metric val/log_ptilde_star improved" in output
        for line in NOISE:
            assert (line in output) == bool(flags), (flags, line, output[-4000:])


def test_quiet_filters_name_the_known_lines_only(monkeypatch):
    """The Ray lines that are not forwarded: the regexes match the lines Ray 2.60 prints,
    and not our own lines. `--verbose` takes ours out of what a parent process set, and
    keeps the user's own."""
    import re

    from pipeline import quiet

    skip = re.compile(quiet._RAY_SKIP)
    known = [
        "Failed to query Ray Train Controller actor state. State API may be temporarily "
        "unavailable. Continuing to monitor.",
        "[2026-12-02 07:10:17,902 E 5092 5123] core_worker.cc:2465: Actor with class name: "
        "'PreemptionWatcher' and ID: '4edb5effd8716d617d2c925601000000' has constructor "
        "arguments in the object store and max_restarts > 0. If the arguments in the object "
        "store go out of scope or are lost, the actor restart will fail.",
    ]
    assert all(skip.search(line) for line in known)
    ours = [
        "bihm: Ray Train worker rank 0/2 on node 0a1b",
        "[rank: 0] Metric val/log_ptilde_star improved. New best score: -442.206",
        "core_worker.cc:1: Actor with class name: 'RayTrainWorker' and ID: '01' has "
        "constructor arguments in the object store and max_restarts > 0",
    ]
    assert not any(skip.search(line) for line in ours)

    monkeypatch.setenv(quiet.RAY_SKIP_ENV, "mine")
    try:
        quiet.install()
        quiet.install()
        assert os.environ[quiet.RAY_SKIP_ENV] == f"mine|{quiet._RAY_SKIP}"
        quiet.install(verbose=True)
        assert os.environ[quiet.RAY_SKIP_ENV] == "mine"
        monkeypatch.setenv(quiet.RAY_SKIP_ENV, quiet._RAY_SKIP)  # set by a quiet parent
        quiet.install(verbose=True)
        assert quiet.RAY_SKIP_ENV not in os.environ
    finally:
        quiet.install(verbose=True)
