"""`bihm train --launcher ray` on CPU: Ray Train workers running the unchanged Lightning module.

Each Ray job runs in a subprocess (Ray and its workers stay out of the pytest process) with
at most 2 CPUs. The slow tests compare every run with one Lightning DDP run of 2 processes:
the same data shards, the same seeds and the same gloo all-reduce give the same metrics.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.config import config_from_dict
from tests.conftest import make_shards, read_metrics, run_python, tiny_config

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 2
STEPS_PER_EPOCH = 2  # train_limit 400 over 2 workers, batches of 100
SECRET = "bihm-test-not-a-real-key-0123456789abcdef"


@pytest.fixture(autouse=True)
def ray_env(monkeypatch):
    """Environment of the Ray subprocesses: undeduplicated worker logs, no usage reports,
    and a (fake) API key that must not reach any file of a run folder."""
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


def ray_config(shards: Path, run_dir: Path, epochs: int = EPOCHS, wandb: str = "offline") -> dict:
    cfg = tiny_config(shards, run_dir, train={"max_epochs": epochs})
    cfg["data"].update(train_limit=400, valid_limit=200)
    cfg["logging"]["wandb"] = wandb
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def ray_train(args: list[str], cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    proc = run_python(["-m", "pipeline.cli", "train", "--launcher", "ray", *args], cwd, timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


# --------------------------------------------------------------------------- wandb files
def read_wandb_records(path: Path):
    """The protobuf records of a `.wandb` file (LevelDB log format, 32 KiB blocks, after a
    7-byte `:W&B` header), so that a test can read an offline run without the cloud."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if len(data) < 7:  # not even the header yet: the writer was killed at once
        return
    assert data[:4] == b":W&B", path
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if pos + 7 + length > len(data):  # a chunk cut short: the writer was killed
            return
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(run_dir: Path) -> dict[str, dict]:
    """{run id: {"dirs": offline run folders, "logged": those whose `.wandb` file holds the
    run record, "keys": logged history keys}} of a run folder.

    wandb names each offline folder `offline-run-<time>-<run id>` when the run starts, so
    "dirs" counts the starts. wandb-core writes the `.wandb` file in whole 32 KiB blocks, and
    a start that was SIGKILLed (a Ray restart may kill the surviving workers) loses its last
    partial block: a short run's folder then holds the file's 7-byte header and nothing more."""
    runs: dict[str, dict] = {}
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        run_id = folder.name.rsplit("-", 1)[-1]
        run = runs.setdefault(run_id, {"dirs": set(), "logged": set(), "keys": set()})
        run["dirs"].add(folder.name)
        for path in folder.glob("run-*.wandb"):
            for record in read_wandb_records(path):
                kind = record.WhichOneof("record_type")
                if kind == "run":
                    assert record.run.run_id == run_id, (path, record.run.run_id)
                    run["logged"].add(folder.name)
                elif kind == "history":
                    keys = {item.key or "/".join(item.nested_key) for item in record.history.item}
                    run["keys"] |= keys
    return runs


def assert_one_wandb_run(run_dir: Path, resumes: int = 0, killed: int = 0) -> dict:
    """One wandb run with one offline folder per start of rank 0 (each resume or Ray restart
    adds one, with the same id: `wandb sync` uploads them into one run), none from rank 1.
    Every start's records are in its folder, except perhaps those of the `killed` starts."""
    runs = wandb_runs(run_dir)
    assert len(runs) == 1, runs
    ((run_id, run),) = runs.items()
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    assert len(run["dirs"]) == 1 + resumes, run["dirs"]
    assert len(run["logged"]) >= len(run["dirs"]) - killed, (run["dirs"], run["logged"])
    for key in ("val/log_ptilde_star", "val/two_log_z", "train/loss"):
        assert key in run["keys"], (key, sorted(run["keys"]))
    for image in ("samples", "curves"):  # logged as {image}/filenames, ...
        assert f"{image}/filenames" in run["keys"], (image, sorted(run["keys"]))
    return run


def assert_no_secret(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------- reference
METRIC_PREFIXES = ("val/", "train/")


def assert_same_metrics(rows: list[dict], reference: list[dict]) -> None:
    assert len(rows) <= len(reference)
    for row, ref in zip(rows, reference, strict=False):
        assert row["epoch"] == ref["epoch"]
        keys = [k for k in ref if k.startswith(METRIC_PREFIXES)]
        assert keys and set(keys) <= set(row), (keys, list(row))
        for key in keys:
            if ref[key] == "":
                assert row[key] == "", key
            else:
                assert float(row[key]) == pytest.approx(float(ref[key]), rel=1e-6, abs=1e-6), (
                    row["epoch"],
                    key,
                )


@pytest.fixture(scope="module")
def ddp_reference(shards, tmp_path_factory) -> list[dict]:
    """metrics.csv of Lightning DDP with 2 gloo processes, 3 epochs, the Ray tests' config."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = ray_config(shards, tmp / "run", epochs=3, wandb="off")
    path = write_config(tmp / "c.yaml", cfg)
    proc = run_python(["-m", "pipeline.cli", "train", "--config", str(path), "--devices", "2"], tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_metrics(tmp / "run")


# --------------------------------------------------------------------------- tests
def test_ray_start_up_errors_stop_in_the_driver_before_ray_starts(shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    path = write_config(tmp_path / "c.yaml", ray_config(shards, run_dir))
    import ray

    assert main(["train", "--config", str(path), "--launcher", "ray", "--workers", "2"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert not ray.is_initialized()
    with pytest.raises(SystemExit) as exit_:  # refused by argparse, in one line
        main(["train", "--config", str(path), "--launcher", "ray", "--workers", "0"])
    assert exit_.value.code == 2
    assert "argument --workers: must be >= 1" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--workers", "2"]) == 2
    assert "--workers needs --launcher ray" in capsys.readouterr().err
    argv = ["train", "--config", str(path), "--launcher", "ray", "--gpus-per-worker", "1"]
    assert main(argv) == 2
    assert "train.accelerator is cpu" in capsys.readouterr().err
    assert not ray.is_initialized()


# Known noise of a Ray run, hidden from the console by default (pipeline/quiet.py).
RAY_NOISE = (
    "Failed to query Ray Train Controller actor state",  # Ray Train's PlacementGroupCleaner
    "has constructor arguments in the object store",  # a core_worker.cc error line
)
LIGHTNING_NOISE = (
    "💡 Tip: For seamless cloud logging",
    "`isinstance(treespec, LeafSpec)` is deprecated",
    "all_gather is deprecated",
    "Your `IterableDataset` has `__len__` defined",
)


@pytest.fixture
def ray_tmpdir(monkeypatch):
    """Ray's temporary folder (its sessions and log files) for this test alone; short,
    for Ray's socket paths."""
    folder = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", folder)
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def test_ray_two_workers_train_into_one_run_folder_and_one_wandb_run(
    shards, tmp_path, ray_tmpdir, monkeypatch
):
    """Embedded local Ray, 2 CPU workers: validation improves, the run folder has the local
    layout, rank 0 alone logs to one offline wandb run, and no API key is written. The last
    epoch is the best, and the "done" line names its checkpoint. Ray's known noise stays in
    its log files, off the console (with Ray's default log deduplication)."""
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "c.yaml", ray_config(shards, run_dir))
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")  # Ray's default (ray_env turns it off)
    proc = ray_train(["--config", str(path), "--workers", "2", "--max-failures", "0"], tmp_path)
    for line in RAY_NOISE + LIGHTNING_NOISE:
        assert line not in proc.stdout + proc.stderr, (line, proc.stderr[-5000:])
    # Whether Ray's PlacementGroupCleaner prints its lines at all depends on timing (the
    # helper's split-branch run and a clean copy of the start commit did not get them), so
    # their presence in Ray's log files is not asserted; the unit test of the filters
    # checks the patterns against the real lines.
    assert proc.stdout.count(f"bihm train: done after {EPOCHS} epochs") == 1, proc.stdout
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [str(e) for e in range(EPOCHS)]
    assert all(float(r["val/n"]) == 200 for r in rows)  # both workers' shares, each once
    first, last = (float(r["val/log_ptilde_star"]) for r in (rows[0], rows[-1]))
    assert last > first + 5, (first, last)
    # The last epoch is the best. Its best-*.ckpt is saved after the epoch's report to Ray,
    # and the summary must name it, not the previous best (which save_top_k=1 deleted).
    values = [float(r["val/log_ptilde_star"]) for r in rows]
    assert max(values) == values[-1], values
    done = re.search(r"best val/log_ptilde_star (\S+) at (\S+); run folder", proc.stdout)
    assert done, proc.stdout
    assert Path(done[2]) == run_dir / "checkpoints" / f"best-epoch{EPOCHS - 1:04d}.ckpt"
    assert Path(done[2]).is_file()
    # metrics.csv holds the float64 value, the checkpoint callback its float32 rounding.
    assert float(done[1]) == float(torch.tensor(values[-1], dtype=torch.float32))
    expected = config_from_dict(yaml.safe_load(path.read_text())).to_dict()
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == expected
    assert (run_dir / "curves.png").stat().st_size > 0
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["epoch_0001.png"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    last_ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last_ckpt["epoch"], last_ckpt["global_step"]) == (EPOCHS - 1, EPOCHS * STEPS_PER_EPOCH)
    # The checkpoints reported to Ray live in the run folder too.
    assert list((run_dir / "ray").glob("checkpoint_*/checkpoint.ckpt"))
    assert_one_wandb_run(run_dir)
    assert_no_secret(run_dir)
    ranks = set(re.findall(r"Ray Train worker rank (\d)/2", proc.stderr))
    assert ranks == {"0", "1"}, proc.stderr[-3000:]


@pytest.mark.slow
def test_ray_and_lightning_ddp_give_the_same_metrics(shards, tmp_path, ddp_reference):
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "c.yaml", ray_config(shards, run_dir, epochs=3, wandb="off"))
    ray_train(["--config", str(path), "--workers", "2"], tmp_path)
    rows = read_metrics(run_dir)
    assert len(rows) == 3
    assert_same_metrics(rows, ddp_reference)


KILL_ONCE = textwrap.dedent(
    """
    import os, signal, sys, time
    import yaml
    from pytorch_lightning.callbacks import Callback
    from pipeline.config import config_from_dict
    from pipeline.ray_launcher import run_ray_training

    class KillRank1Once(Callback):
        '''SIGKILL the rank-1 worker process at a global step, the first time only. It waits
        first, so that Ray's controller (which polls the workers every 2 s) has collected
        the checkpoint reported at the end of the previous epoch.'''

        def __init__(self, marker, step):
            self.marker, self.step = marker, step

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if (
                trainer.global_rank == 1
                and trainer.global_step == self.step
                and not os.path.exists(self.marker)
            ):
                open(self.marker, "w").close()
                time.sleep(6)
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = config_from_dict(yaml.safe_load(open(sys.argv[1])))
    callback = KillRank1Once(sys.argv[2], int(sys.argv[3]))
    result = run_ray_training(cfg, workers=2, max_failures=1, extra_callbacks=[callback])
    print("epochs", result["epochs"])
    """
)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three Ray starts: ~2 min on a quiet 2-core machine, 6 on a busy one
def test_killed_worker_restarts_from_the_last_checkpoint_and_resume_keeps_one_run(
    shards, tmp_path, ddp_reference
):
    """Rank 1 is killed (SIGKILL) in epoch 1; Ray restarts both workers from the checkpoint
    of epoch 0 and the run ends as an uninterrupted one. A `--resume` for a third epoch then
    continues the same wandb run."""
    run_dir, marker = tmp_path / "run", tmp_path / "killed"
    path = write_config(tmp_path / "c.yaml", ray_config(shards, run_dir))
    (tmp_path / "kill.py").write_text(KILL_ONCE)
    kill_step = STEPS_PER_EPOCH + 1  # the middle of epoch 1
    proc = run_python(
        [str(tmp_path / "kill.py"), str(path), str(marker), str(kill_step)], tmp_path, 500
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert marker.exists() and f"epochs {EPOCHS}" in proc.stdout
    # The restarted rank 0 said where it continued from: Ray's checkpoint of epoch 0.
    # (Ray's log forwarding may print a worker's line twice.)
    resumed = set(re.findall(r"bihm: resuming from (\S+)", proc.stderr))
    assert len(resumed) == 1 and "/ray/checkpoint_" in resumed.pop(), proc.stderr[-5000:]
    assert [r["epoch"] for r in read_metrics(run_dir)] == ["0", "1"]
    assert_same_metrics(read_metrics(run_dir), ddp_reference)

    argv = ["--run-dir", str(run_dir), "--resume", "--set", "train.max_epochs=3"]
    proc = ray_train([*argv, "--workers", "2"], tmp_path)
    assert "bihm train: done after 3 epochs" in proc.stdout
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert_same_metrics(rows, ddp_reference)
    # The Ray restart and the --resume. The first start's rank 0 finishes its wandb run when
    # gloo reports rank 1's death first; when Ray SIGKILLs it first, its records are lost.
    assert_one_wandb_run(run_dir, resumes=2, killed=1)
    assert_no_secret(run_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    """`ray start --head` on 127.0.0.1 with 2 CPUs, stopped by the test: `--block` keeps the
    head in one process group that the fixture terminates (`ray stop` would stop every Ray
    on this machine, not only ours)."""
    # The head's token (~/.ray/auth_token) is sent to an explicit address only in token mode.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths
    ray_bin = Path(sys.executable).parent / "ray"
    log = open(tmp_path / "ray-head.log", "w")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
        + [f"--port={port}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false"]
        + ["--disable-usage-stats", f"--temp-dir={temp_dir}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert head.poll() is None, (tmp_path / "ray-head.log").read_text()[-3000:]
            if "Ray runtime started" in (tmp_path / "ray-head.log").read_text():
                break
            time.sleep(1)
        else:
            pytest.fail("ray start --head did not start in 120 s")
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        time.sleep(2)
        try:  # anything the head started in its process group
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_head_started_by_the_test_is_used_through_address(
    shards, tmp_path, ray_head, ddp_reference
):
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "c.yaml", ray_config(shards, run_dir))
    proc = ray_train(["--config", str(path), "--workers", "2", "--address", ray_head], tmp_path)
    # Ray replaces 127.0.0.1 by this machine's address; the port is our head's.
    port = ray_head.rsplit(":", 1)[1]
    assert re.search(rf"Connecting to existing Ray cluster at address: \S+:{port}\b", proc.stderr)
    assert "Started a local Ray instance" not in proc.stderr
    assert_same_metrics(read_metrics(run_dir), ddp_reference)
    assert_one_wandb_run(run_dir)


TWO_NODES = textwrap.dedent(
    """
    import sys
    import yaml
    from ray.cluster_utils import Cluster
    from pipeline.config import config_from_dict
    from pipeline.ray_launcher import run_ray_training

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1, num_gpus=0)
        cluster.wait_for_nodes()
        cfg = config_from_dict(yaml.safe_load(open(sys.argv[1])))
        result = run_ray_training(cfg, workers=2, address=cluster.address)
        print("epochs", result["epochs"])
    finally:
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_two_simulated_nodes_run_one_worker_each(shards, tmp_path, ddp_reference):
    """Ray's `Cluster`: a head and a second node with 1 CPU each, so each runs one worker of
    the job. Same metrics as one node, one run folder, one wandb run."""
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "c.yaml", ray_config(shards, run_dir))
    (tmp_path / "two_nodes.py").write_text(TWO_NODES)
    proc = run_python([str(tmp_path / "two_nodes.py"), str(path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"epochs {EPOCHS}" in proc.stdout
    nodes = dict(re.findall(r"Ray Train worker rank (\d)/2 on node (\w+)", proc.stderr))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], proc.stderr[-3000:]
    assert_same_metrics(read_metrics(run_dir), ddp_reference)
    assert_one_wandb_run(run_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "run", "two_nodes.py"]


@pytest.mark.slow
def test_local_launcher_resume_continues_the_same_wandb_run(shards, tmp_path):
    """The wandb run id lives in the run folder for the local launcher too; --wandb flags
    go into config.yaml, so `--resume` logs the same way."""
    run_dir = tmp_path / "run"
    cfg = ray_config(shards, run_dir, epochs=1, wandb="off")
    cfg["samples"]["every_n_epochs"] = 1
    path = write_config(tmp_path / "c.yaml", cfg)
    argv = ["-m", "pipeline.cli", "train", "--config", str(path), "--wandb", "offline"]
    argv += ["--wandb-project", "bihm-tests", "--wandb-group", "resume"]
    proc = run_python(argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logging = yaml.safe_load((run_dir / "config.yaml").read_text())["logging"]
    assert logging | {"progress_bar": False} == {
        "wandb": "offline",
        "wandb_project": "bihm-tests",
        "wandb_group": "resume",
        "progress_bar": False,
    }
    argv = ["-m", "pipeline.cli", "train", "--run-dir", str(run_dir), "--resume"]
    proc = run_python([*argv, "--set", "train.max_epochs=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(run_dir)] == ["0", "1"]
    assert_one_wandb_run(run_dir, resumes=1)
    assert_no_secret(run_dir)


def test_summary_is_read_from_the_run_folder_not_from_the_last_report_to_ray(tmp_path):
    """The summary comes from the run folder's last.ckpt, from the ModelCheckpoint state that
    watches the metric (whatever the callbacks' order), and not from the checkpoint last
    reported to Ray, which was saved before that epoch's best was recorded."""
    from pipeline.ray_launcher import summarize

    def payload(best_epoch: int, score: float) -> dict:
        last = {"monitor": None, "best_model_score": None, "best_model_path": "c/last.ckpt"}
        best = {"monitor": "val/log_p", "best_model_score": torch.tensor(score)}
        best["best_model_path"] = f"c/best-epoch{best_epoch:04d}.ckpt"
        return {
            "epoch": 4,
            "callbacks": {
                "ModelCheckpoint{'monitor': None, 'mode': 'min'}": last,
                "ModelCheckpoint{'monitor': 'val/log_p', 'mode': 'max'}": best,
            },
        }

    # What Ray holds: the report of epoch 4, made before epoch 4's best was recorded.
    (tmp_path / "ray" / "checkpoint_0004").mkdir(parents=True)
    torch.save(payload(3, -92.25), tmp_path / "ray" / "checkpoint_0004" / "checkpoint.ckpt")
    assert summarize(tmp_path, "val/log_p")["best"] is None  # no last.ckpt: no epoch done
    (tmp_path / "checkpoints").mkdir()
    torch.save(payload(4, -90.5), tmp_path / "checkpoints" / "last.ckpt")
    out = summarize(tmp_path, "val/log_p")
    assert (out["best"], out["best_path"], out["epochs"]) == (-90.5, "c/best-epoch0004.ckpt", 5)


def test_a_restarted_worker_resumes_from_the_checkpoint_with_the_most_steps(tmp_path):
    """Of Ray's checkpoint and the run folder's last.ckpt, the one with more optimizer steps
    wins; of equals, the first listed (Ray's: the restarts' tests name it)."""
    from pipeline.ray_launcher import latest_checkpoint

    paths = {}
    for name, step in [("ray", 500), ("last", 500), ("old", 400), ("new", 600)]:
        paths[name] = str(tmp_path / f"{name}.ckpt")
        torch.save({"global_step": step}, paths[name])
    assert latest_checkpoint([]) is None
    assert latest_checkpoint([paths["ray"], paths["last"]]) == paths["ray"]
    assert latest_checkpoint([paths["new"], paths["last"]]) == paths["new"]
    assert latest_checkpoint([paths["ray"], paths["old"]]) == paths["ray"]
