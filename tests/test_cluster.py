"""`bihm submit`: the rendered sbatch scripts and the argument checks (fast; no scheduler).

`sbatch` is replaced on PATH by a stand-in that records what it is given, so the tests
see exactly whether (and what) would have been submitted. The real SLURM and Ray
end-to-end tests are in tests/test_cluster_e2e.py.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
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
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
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
    cmd = next(line for line in script.splitlines() if line.startswith('"$PYTHON" -m pipeline'))
    assert cmd.startswith('"$PYTHON" -m pipeline.cli train --config ' + str(config))
    assert '--launcher ray --address "$address"' in cmd
    assert "--workers 6 --gpus-per-worker 1 --cpus-per-worker 4" in cmd
    assert "--set train.accelerator=gpu" in cmd
    # Ray is stopped on exit, on scancel, on a requeue and at the time limit.
    assert "trap cleanup EXIT" in script and "trap 'exit 143' TERM" in script
    # Requeueable; SIGUSR1 to the script (not srun's tasks) 90 s before the time limit.
    assert re.search(r"^#SBATCH --requeue$", script, flags=re.M)
    assert opts["signal"] == "B:USR1@90" and opts["open-mode"] == "append"


def test_ray_template_runs_a_sweep_with_tune(config, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: lr_sweep\nbase: tiny.yaml\nrun_dir: sweeps/lr\n")
    script = render(capsys, "--tune", str(sweep), "--cpus-per-task", "2", "--set", "train.K=3")
    bash_n(script, tmp_path)
    cmd = next(line for line in script.splitlines() if line.startswith('"$PYTHON" -m pipeline'))
    assert cmd == (
        f'"$PYTHON" -m pipeline.cli tune --config {sweep} --set train.K=3 --address "$address" '
        '${resume[@]+"${resume[@]}"} &'
    )
    # A requeued sweep continues (bihm tune --resume) once it has its state.
    assert f"RESUME_FROM={tmp_path}/sweeps/lr/sweep.json" in script
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
    assert line.endswith('--devices 4 --num-nodes 2 ${resume[@]+"${resume[@]}"} &')
    assert re.search(r"^#SBATCH --requeue$", script, flags=re.M)
    assert opts["signal"] == "B:USR1@90" and opts["open-mode"] == "append"
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
    # A sweep of multi-worker trials: bihm tune's own flags, checked by bihm tune against
    # the cluster's resources.
    (tmp_path / "sweep.yaml").write_text("base: tiny.yaml\n")
    sweep = dict(vars(args), tune=tmp_path / "sweep.yaml", workers=None, workers_per_trial=2)
    assert submit.ray_entrypoint(argparse.Namespace(**sweep), tmp_path) == (
        "python -m pipeline.cli tune --config sweep.yaml --set train.K=3 --address auto "
        "--workers-per-trial 2 --cpus-per-worker 1"
    )
    for change, flag in (
        ({"workers": 2}, "--workers: "),
        ({"workers_per_trial": None}, "--cpus-per-worker: "),  # per-worker, without workers
        ({"workers_per_trial": 0}, "--workers-per-trial: must be >= 1"),
        ({"tune": None}, "--workers-per-trial: only with --tune"),
    ):
        with pytest.raises(submit.SubmitError, match=flag):
            submit.ray_entrypoint(argparse.Namespace(**{**sweep, **change}), tmp_path)
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


# --------------------------------------------------------------------------- CPUs, log folder
@pytest.mark.parametrize("launcher", ["ray", "ddp"])
def test_cpus_per_task_counts_a_node_s_cpus_under_both_launchers(
    launcher, config, tmp_path, capsys
):
    script = render(
        capsys, "--config", str(config), "--launcher", launcher, "--gpus-per-node", "4",
        "--cpus-per-task", "32", "--set", "train.accelerator=gpu",
    )  # fmt: skip
    opts = sbatch_options(script)
    # 32 CPUs per node either way: 1 task of 32 (Ray), or 4 tasks of 8 (one per GPU).
    tasks = int(opts["ntasks-per-node"])
    assert tasks * int(opts["cpus-per-task"]) == 32
    assert tasks == (1 if launcher == "ray" else 4)
    if launcher == "ray":
        assert "--workers 4 --gpus-per-worker 1 --cpus-per-worker 8" in script
    assert "CPUs per node, under both launchers" in " ".join(help_of("--cpus-per-task").split())


def help_of(flag: str) -> str:
    from pipeline.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    submit_sub = next(
        a for a in sub.choices["submit"]._actions if isinstance(a, argparse._SubParsersAction)
    )
    return next(a.help for a in submit_sub.choices["slurm"]._actions if flag in a.option_strings)


def test_cpus_per_task_must_cover_the_node_s_processes(config, capsys):
    argv = ["submit", "slurm", "--config", str(config), "--set", "train.accelerator=gpu"]
    assert main([*argv, "--gpus-per-node", "4", "--cpus-per-task", "2", "--dry-run"]) == 2
    assert "--cpus-per-task 2: a node's CPUs, fewer than its 4" in capsys.readouterr().err
    assert main([*argv, "--gpus-per-node", "4", "--cpus-per-task", "30", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "warning: --cpus-per-task 30 (a node's CPUs) over 4 processes: 7 each" in err


def test_dry_run_creates_the_log_folder_so_its_script_can_be_given_to_sbatch(config, capsys):
    log_dir = config.parent / "logs" / "slurm"
    assert main(["submit", "slurm", "--config", str(config), "--log-dir", str(log_dir),
                 "--dry-run"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert log_dir.is_dir()
    assert f"#SBATCH --output={log_dir}/bihm-tiny-%j.out" in captured.out
    assert captured.err.strip() == f"bihm submit slurm: created the log folder {log_dir}"
    # A folder that cannot be made is an error naming --log-dir, before any script.
    (config.parent / "file").write_text("")
    argv = ["--log-dir", str(config.parent / "file" / "logs"), "--dry-run"]
    assert main(["submit", "slurm", "--config", str(config), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("bihm submit slurm: error: --log-dir: cannot create")
    assert captured.out == ""


# --------------------------------------------------------------------------- the scripts run
# The rendered scripts run under bash with stand-ins for SLURM's commands, `ray` and the
# job's Python, so that their shell logic (traps, requeue, resume, the token step) runs
# in seconds. tests/test_cluster_e2e.py runs them under a real SLURM.
FAKE_BIN = {
    # srun OPTIONS... COMMAND: run COMMAND here.
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    # scontrol: `show hostnames` names this node; anything else is recorded.
    "scontrol": '#!/bin/bash\nif [[ "$1" == show ]]; then echo localhost; exit 0; fi\n'
    'echo "$@" >> "$FAKE_LOG/scontrol"\n',
    "scancel": '#!/bin/bash\necho "$@" >> "$FAKE_LOG/scancel"\n',
    # The job's Python: records its arguments, may write a checkpoint into the run folder,
    # then runs until SIGTERM (exit 143, as bihm train does); `-m cluster.ports` is real.
    "python": textwrap.dedent(
        """\
        #!/bin/bash
        if [[ "$2" == cluster.ports ]]; then exec "$REAL_PYTHON" "$@"; fi
        echo "$@" >> "$FAKE_LOG/python"
        if [[ -n "${FAKE_CHECKPOINT:-}" ]]; then
            mkdir -p "$(dirname "$FAKE_CHECKPOINT")" && touch "$FAKE_CHECKPOINT"
        fi
        trap 'exit 143' TERM
        touch "$FAKE_LOG/started"
        while :; do sleep 0.1; done
        """
    ),
    # ray: the token step fails with a message; nothing else is reached in these tests.
    "ray": '#!/bin/bash\necho "cannot write /home/u/.ray/auth_token: Read-only file system"'
    " >&2\nexit 1\n",
}


@pytest.fixture
def fake_job(tmp_path):
    """A folder of stand-ins; yields a function that starts a rendered script with them (in
    a process group of its own, killed at the end, stand-ins and all)."""
    bin_dir, log = tmp_path / "fakebin", tmp_path / "fakelog"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in FAKE_BIN.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "REAL_PYTHON": sys.executable,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1",
    }
    started: list[subprocess.Popen] = []

    def start(script: str, **extra: str) -> subprocess.Popen:
        path = tmp_path / "job.sbatch"
        path.write_text(script)
        proc = subprocess.Popen(
            ["bash", str(path)], env={**env, **extra}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        started.append(proc)
        return proc

    start.bin, start.log = bin_dir, log
    yield start
    for proc in started:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the script's process group (the stand-ins outlive a script killed first)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[str, str]:
    """The script's output once it ends; after `timeout`, what it wrote until killed."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        return out, err + f"\n(killed after {timeout} s)"


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = finish(proc, timeout=1)
            pytest.fail(f"{path.name} did not appear (exit {proc.returncode}): {out}{err}")
        time.sleep(0.05)


def test_ray_script_names_a_failed_token_step_and_cleans_up(config, fake_job, capsys):
    script = render(capsys, "--config", str(config), "--python", str(fake_job.bin / "python"))
    proc = fake_job(script)
    out, err = finish(proc)
    assert proc.returncode == 1, (out, err)
    assert (
        "bihm submit: error: could not make Ray's auth token (ray get-auth-token --generate): "
        "cannot write /home/u/.ray/auth_token: Read-only file system"
    ) in err
    # Inside the cleanup trap: it ran, and said how the job ended.
    assert out.rstrip().endswith("bihm submit: job finished with exit status 1"), out


def ddp_script(capsys, config: Path, fake_job) -> str:
    return render(
        capsys, "--config", str(config), "--launcher", "ddp",
        "--python", str(fake_job.bin / "python"),
    )  # fmt: skip


@pytest.mark.parametrize("wrote_checkpoint", [True, False])
def test_sigusr1_before_the_time_limit_requeues_a_job_that_wrote_a_checkpoint(
    wrote_checkpoint, config, fake_job, capsys
):
    script = ddp_script(capsys, config, fake_job)
    ckpt = config.parent / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    extra = {"FAKE_CHECKPOINT": str(ckpt)} if wrote_checkpoint else {}
    proc = fake_job(script, **extra)
    wait_for_file(fake_job.log / "started", proc)
    proc.send_signal(signal.SIGUSR1)  # what #SBATCH --signal=B:USR1@90 sends
    if wrote_checkpoint:
        wait_for_file(fake_job.log / "scontrol", proc)
        assert (fake_job.log / "scontrol").read_text() == "requeue 4242\n"
        proc.send_signal(signal.SIGTERM)  # what the requeue then sends
        out, err = finish(proc)
        assert "the time limit is near: requeueing job 4242" in out
        assert proc.returncode == 143
    else:
        time.sleep(1)
        assert proc.poll() is None, finish(proc, timeout=1)  # the job goes on
        proc.send_signal(signal.SIGTERM)
        out, err = finish(proc)
        assert "this job wrote no checkpoint" in err and "not requeueing" in err
        assert not (fake_job.log / "scontrol").exists()
    # The first start of a job never resumes.
    assert "--resume" not in (fake_job.log / "python").read_text()


@pytest.mark.parametrize("has_checkpoint", [True, False])
def test_a_requeued_job_resumes_from_its_checkpoint(has_checkpoint, config, fake_job, capsys):
    script = ddp_script(capsys, config, fake_job)
    ckpt = config.parent / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    if has_checkpoint:
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
    proc = fake_job(script, SLURM_RESTART_COUNT="1")
    wait_for_file(fake_job.log / "started", proc)
    proc.terminate()
    out, _ = finish(proc)
    args = (fake_job.log / "python").read_text().split()
    if has_checkpoint:
        assert args[-1] == "--resume"
        assert f"bihm submit: restart 1 of job 4242: continuing from {ckpt}" in out
    else:  # stopped before it had any: a new start (a --resume would be refused)
        assert "--resume" not in args
        assert "bihm submit: restart 1 of job 4242: no " in out and "starting over" in out


# --------------------------------------------------------------------------- Ray's ports
def test_ray_ports_are_a_block_per_job_inside_the_range():
    from cluster import ports

    block = len(ports.SERVICES) + 10
    # 3 blocks in the range; job ids pick blocks by their remainder.
    lo, hi = 30000, 30000 + 3 * block - 1
    first = {job: ports.choose_ports(job, lo, hi, 10, free=lambda p: True) for job in range(4)}
    assert [first[j]["RAY_PORT"] for j in range(4)] == [30000, 30019, 30038, 30000]
    p = first[1]
    assert [p[name] for name in ports.SERVICES] == list(range(30019, 30028))
    assert (p["MIN_WORKER_PORT"], p["MAX_WORKER_PORT"]) == (30028, 30037)
    # A port in use anywhere in a job's block moves it on to the next free block.
    busy = {30020, 30045}
    taken = ports.choose_ports(1, lo, hi, 10, free=lambda port: port not in busy)
    assert taken["RAY_PORT"] == 30000
    with pytest.raises(ports.PortError, match="BIHM_RAY_PORT_RANGE: no block of 19 free ports"):
        ports.choose_ports(1, lo, hi, 10, free=lambda port: port not in {30001, 30020, 30045})
    with pytest.raises(ports.PortError, match="BIHM_RAY_PORT_RANGE: 30000-30010 holds fewer"):
        ports.choose_ports(1, 30000, 30010, 10)
    with pytest.raises(ports.PortError, match="BIHM_RAY_PORT_RANGE"):
        ports.parse_range("80-90")


def test_two_jobs_on_one_node_get_different_ray_ports(monkeypatch, capsys):
    """Job 8 finds the block of job 5 (the same remainder) in use, and takes another."""
    import socket

    from cluster import ports

    monkeypatch.setenv("BIHM_RAY_PORT_RANGE", "21000-21999")
    monkeypatch.setenv("BIHM_RAY_WORKER_PORTS", "16")

    def chosen(job: int) -> dict[str, str]:
        assert ports.main(["--job-id", str(job)]) == 0
        return dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())

    a = chosen(5)
    with socket.socket() as head:  # job 5's Ray head holds its GCS port
        head.bind(("127.0.0.1", int(a["RAY_PORT"])))
        head.listen()
        blocks = (999 + 1) // (len(ports.SERVICES) + 16)
        b = chosen(5 + blocks)
    assert b["RAY_PORT"] != a["RAY_PORT"]
    assert f"--min-worker-port={b['MIN_WORKER_PORT']}" in b["RAY_PORT_FLAGS"]
    monkeypatch.setenv("BIHM_RAY_WORKER_PORTS", "many")
    assert ports.main(["--job-id", "5"]) == 2
    assert "BIHM_RAY_WORKER_PORTS: expected a number" in capsys.readouterr().err
