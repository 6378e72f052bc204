"""`bihm submit`: the rendered sbatch scripts and the argument checks (fast; no scheduler).

`sbatch` is replaced on PATH by a stand-in that records what it is given, so the tests
see exactly whether (and what) would have been submitted. The real SLURM and Ray
end-to-end tests are in tests/test_cluster_e2e.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster import submit
from pipeline.cli import main
from tests.conftest import tiny_config

FAKE_SBATCH = """#!/bin/bash
echo "$@" > "$(dirname "$0")/args"
cat > "$(dirname "$0")/script"
echo "4242;bihm-local"
"""


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """A stand-in `sbatch` on PATH; returns its folder (args and script land there)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    return bin_dir


@pytest.fixture
def config(tmp_path, monkeypatch) -> Path:
    """A valid tiny config in a job folder (the current directory of the submission)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(Path("shards"), Path("runs/tiny"))))
    return path


@pytest.fixture
def shared_fs(monkeypatch) -> None:
    """Pretend every path is on a network file system except /dev/shm (node-local), so
    that multi-node submissions from this test's /tmp folder are accepted."""
    monkeypatch.setattr(submit, "mount_of", lambda path: ("/", "nfs4"))
    monkeypatch.setattr(submit, "NODE_LOCAL_DIRS", (Path("/dev/shm"),))


def render(capsys, *args: str) -> str:
    assert main(["submit", "slurm", *args, "--dry-run"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, flags=re.M))


def bash_n(script: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ray_template_has_the_resources_and_keeps_the_dashboard_on_loopback(
    config, shared_fs, tmp_path, capsys
):
    script = render(
        capsys,
        "--config", str(config), "--nodes", "3", "--gpus-per-node", "2",
        "--cpus-per-task", "8", "--time", "1-02:30:00", "--partition", "gpu",
        "--account", "proj42", "--set", "train.accelerator=gpu",
    )  # fmt: skip
    bash_n(script, tmp_path)
    opts = sbatch_options(script)
    assert opts["nodes"] == "3" and opts["gpus-per-node"] == "2"
    assert opts["cpus-per-task"] == "8" and opts["ntasks-per-node"] == "1"
    assert opts["time"] == "1-02:30:00" and opts["partition"] == "gpu"
    assert opts["account"] == "proj42" and opts["job-name"] == "bihm-tiny"
    assert opts["chdir"] == str(tmp_path)
    assert opts["output"] == str(tmp_path / "runs/slurm/bihm-tiny-%j.out")
    assert "{{" not in script
    # The dashboard (and so the Jobs API) binds to the head's loopback, never to all interfaces.
    assert "0.0.0.0" not in script
    assert "--dashboard-host=127.0.0.1" in script
    assert re.search(r"--dashboard-host(?!=127\.0\.0\.1)", script) is None
    # Head on the first node, workers on the others through srun, one Ray worker per GPU.
    assert 'ray" start --head' in script.replace("'", '"') or '"$RAY" start --head' in script
    assert '--exclude="$head_node"' in script
    cmd = script.strip().splitlines()[-3]
    assert cmd.startswith('"$PYTHON" -m pipeline.cli train --config ' + str(config))
    assert '--launcher ray --address "$address"' in cmd
    assert "--workers 6 --gpus-per-worker 1 --cpus-per-worker 4" in cmd
    assert "--set train.accelerator=gpu" in cmd
    # Ray is stopped on exit, on scancel and at the time limit.
    assert "trap cleanup EXIT" in script and "trap 'exit 143' TERM" in script
    assert "--signal=B:TERM@120" in script


def test_ray_template_runs_a_sweep_with_tune(config, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: lr_sweep\nbase: tiny.yaml\nrun_dir: sweeps/lr\n")
    script = render(capsys, "--tune", str(sweep), "--cpus-per-task", "2", "--set", "train.K=3")
    bash_n(script, tmp_path)
    cmd = script.strip().splitlines()[-3]
    assert cmd == (
        f'"$PYTHON" -m pipeline.cli tune --config {sweep} --set train.K=3 --address "$address" &'
    )
    assert sbatch_options(script)["job-name"] == "bihm-lr_sweep"
    assert "gpus-per-node" not in sbatch_options(script)
    # The sweep's base config is checked too, and the sweep folder printed up front.
    sweep.write_text("base: tiny.yaml\n")
    assert main(["submit", "slurm", "--tune", str(sweep), "--set", "optim.lr=-1"]) == 2
    assert "--tune: base config:" in capsys.readouterr().err


def test_submitting_a_sweep_prints_its_folder(config, tmp_path, fake_sbatch, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: tiny.yaml\n")
    assert main(["submit", "slurm", "--tune", str(sweep)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "submitted SLURM job 4242"
    assert out[1] == f"log: {tmp_path}/runs/slurm/bihm-sweep-4242.out"
    assert out[2] == f"sweep folder: {tmp_path}/runs/sweep"


def test_ddp_template_runs_one_srun_task_per_gpu(config, shared_fs, tmp_path, capsys):
    script = render(
        capsys, "--config", str(config), "--launcher", "ddp", "--nodes", "2",
        "--gpus-per-node", "4", "--time", "00:20:00", "--set", "train.accelerator=gpu",
        "--set", "data.shard_dir=/shared/shards", "--set", "run_dir=/shared/runs/x",
    )  # fmt: skip
    bash_n(script, tmp_path)
    opts = sbatch_options(script)
    assert opts["nodes"] == "2" and opts["gpus-per-node"] == "4"
    assert opts["ntasks-per-node"] == "4" and opts["time"] == "00:20:00"
    assert not any("ray" in line.lower() for line in script.splitlines() if line[:1] != "#")
    line = next(s for s in script.splitlines() if s.startswith("srun "))
    assert line.endswith("--devices 4 --num-nodes 2 &")
    assert "--set data.shard_dir=/shared/shards --set run_dir=/shared/runs/x" in line


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--nodes", "0"], "--nodes"),
        (["--nodes", "-2"], "--nodes"),
        (["--gpus-per-node", "-1"], "--gpus-per-node"),
        (["--cpus-per-task", "0"], "--cpus-per-task"),
        (["--time", "1:00"], "--time"),
        (["--time", "01:75:00"], "--time"),
        (["--time", "soon"], "--time"),
        (["--time", "00:00:00"], "--time"),
        (["--config", "missing.yaml"], "--config"),
        (["--set", "optim.lr=-1"], "optim.lr"),
        (["--gpus-per-node", "2"], "--gpus-per-node"),  # the config trains on the CPU
        (["--tune", "tiny.yaml"], "--config: not with --tune"),
        (["--launcher", "ddp", "--tune", "tiny.yaml"], "--tune"),
        (["--partition", "gpu; rm -rf ~"], "--partition"),
        # Two nodes cannot share shards in one node's /dev/shm.
        (["--nodes", "2", "--set", "data.shard_dir=/dev/shm/shards"], "data.shard_dir"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_submitted(
    args, flag, config, shared_fs, fake_sbatch, capsys
):
    if "--config" not in args:
        args = ["--config", str(config), *args]
    assert main(["submit", "slurm", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("bihm submit slurm: error: ") and flag in err, err
    assert "\n" not in err and "Traceback" not in err
    assert captured.out == ""
    assert not (fake_sbatch / "args").exists(), "sbatch was called"


def test_config_is_required(fake_sbatch, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "slurm", "--nodes", "1"]) == 2
    assert "--config: required (or --tune SWEEP.yaml)" in capsys.readouterr().err
    assert main(["submit", "slurm", "--tune", "no-such-sweep.yaml"]) == 2
    assert "--tune: no-such-sweep.yaml does not exist" in capsys.readouterr().err
    assert not (fake_sbatch / "args").exists()


def test_submission_prints_job_id_log_and_run_folder_up_front(config, fake_sbatch, capsys):
    assert main(["submit", "slurm", "--config", str(config), "--launcher", "ddp"]) == 0
    out = capsys.readouterr().out.splitlines()
    job_dir = config.parent
    assert out == [
        "submitted SLURM job 4242",
        f"log: {job_dir}/runs/slurm/bihm-tiny-4242.out",
        f"run folder: {job_dir}/runs/tiny",
    ]
    assert (fake_sbatch / "args").read_text().split() == ["--parsable"]
    script = (fake_sbatch / "script").read_text()
    assert "#SBATCH --nodes=1" in script and "--devices 1 --num-nodes 1" in script
    # The log folder exists before the job starts (SLURM opens the log first).
    assert (job_dir / "runs" / "slurm").is_dir()


def test_a_multi_node_job_refuses_this_node_s_tmp(config, capsys):
    assert main(["submit", "slurm", "--config", str(config), "--nodes", "2", "--dry-run"]) == 2
    assert f"--config: {config} is in /tmp" in capsys.readouterr().err


def test_shared_path_check(monkeypatch, tmp_path):
    monkeypatch.setattr(submit, "mount_of", lambda path: ("/shared", "nfs4"))
    assert submit.check_shared_path("--x", Path("/shared/a"), nodes=4) is None
    monkeypatch.setattr(submit, "mount_of", lambda path: ("/", "ext4"))
    warning = submit.check_shared_path("--x", Path("/data/a"), nodes=4)
    assert warning and "--x" in warning and "cannot tell" in warning
    assert submit.check_shared_path("--x", Path("/data/a"), nodes=1) is None
    monkeypatch.setattr(submit, "mount_of", lambda path: ("/scratch", "tmpfs"))
    with pytest.raises(submit.SubmitError, match="its own copy"):
        submit.check_shared_path("--x", Path("/scratch/a"), nodes=2)


def test_multi_node_warning_names_the_path_that_may_not_be_shared(config, monkeypatch, capsys):
    monkeypatch.setattr(submit, "NODE_LOCAL_DIRS", ())
    monkeypatch.setattr(submit, "mount_of", lambda path: ("/", "ext4"))
    argv = ["--config", str(config), "--nodes", "2", "--set", "data.shard_dir=/data/s"]
    assert main(["submit", "slurm", *argv, "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "warning: data.shard_dir" in err and "/data/s" in err


@pytest.mark.parametrize(
    "address, warns",
    [
        ("http://127.0.0.1:8265", False),
        ("http://localhost:8265", False),
        ("http://[::1]:8265", False),
        ("127.0.0.1:8265", False),
        ("https://ray.example.org:443", False),
        ("http://10.1.2.3:8265", True),
        ("http://head-node:8265", True),
    ],
)
def test_ray_address_warns_on_plain_http_beyond_loopback(address, warns):
    url, warning = submit.check_ray_address(address)
    assert url.startswith(("http://", "https://"))
    assert (warning is not None) == warns
    if warns:
        assert "SSH tunnel" in warning


def test_submit_ray_refuses_bad_arguments_before_connecting(config, tmp_path, capsys):
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    # Port 9 (discard) on loopback: nothing listens, so a connection attempt would fail
    # with a different error; these must fail earlier, on the argument itself.
    base = ["submit", "ray", "--address", "http://127.0.0.1:9"]
    cases = [
        ([*base, "--config", str(config), "--working-dir", str(elsewhere)], "--config"),
        ([*base, "--config", "missing.yaml"], "--config"),
        (["submit", "ray", "--address", "ftp://x", "--config", str(config)], "--address"),
        ([*base, "--config", str(config), "--workers", "0"], "--workers"),
    ]
    for argv, flag in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("bihm submit ray: error: ") and flag in err[-1], err


def test_submit_ray_entrypoint_and_runtime_env(config, tmp_path):
    import argparse

    args = argparse.Namespace(
        config=config, set=["train.K=3"], tune=None, workers=2, gpus_per_worker=None,
        cpus_per_worker=1.0,
    )  # fmt: skip
    cmd = submit.ray_entrypoint(args, tmp_path)
    assert cmd == (
        "python -m pipeline.cli train --config tiny.yaml --set train.K=3 "
        "--launcher ray --address auto --workers 2 --cpus-per-worker 1"
    )
    env = submit.ray_runtime_env(tmp_path)
    assert env["working_dir"] == str(tmp_path) and "runs" in env["excludes"]
    assert {Path(m).name for m in env["py_modules"]} >= {"bihm", "pipeline", "data_shards"}
    assert all((Path(m) / "__init__.py").is_file() for m in env["py_modules"])


def test_ray_cluster_launcher_example_is_valid_and_keeps_the_dashboard_on_loopback():
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = Path(submit.__file__).parent / "ray-cluster.yaml"
    cfg = yaml.safe_load(path.read_text())
    validate_config(prepare_config(cfg))  # Ray's own schema and defaults, as `ray up` does
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in path.read_text()
    assert all("RAY_AUTH_MODE=token" in c for c in (head, cfg["worker_start_ray_commands"][1]))
