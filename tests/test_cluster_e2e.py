"""`bihm submit` end to end against a real SLURM and a real Ray head on this machine (slow).

- SLURM: `cluster/local-slurm.sh` runs munged, slurmctld and slurmd for one node
  `localhost` on 127.0.0.1 (`.ci/run` installs the packages and starts it; the fixture starts
  it when it is not running and then stops it). If the daemons cannot be started, the tests
  fail with the reason: they never skip.
- Ray: `ray start --head --block` on 127.0.0.1 with free ports and 2 CPUs, started and
  stopped (SIGTERM, which stops its raylet and workers) by the fixture.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pipeline.train import resume_epoch
from tests.conftest import make_shards, read_metrics, tiny_config

ROOT = Path(__file__).resolve().parent.parent

LOCAL_SLURM = ROOT / "cluster" / "local-slurm.sh"
pytestmark = pytest.mark.slow


def sh(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment for SLURM clients of a running local SLURM (started if needed)."""
    env = {**os.environ, "SLURM_CONF": slurm_conf(), "PYTHONPATH": str(ROOT)}
    started = False
    if sh("bash", str(LOCAL_SLURM), "status").returncode != 0:
        proc = sh("bash", str(LOCAL_SLURM), "start", timeout=180)
        if proc.returncode != 0:
            pytest.fail(f"could not start the local SLURM: {proc.stdout}{proc.stderr}")
        started = True
    yield env
    if started:
        sh("bash", str(LOCAL_SLURM), "stop", timeout=120)


SUBMITTED: list[str] = []


@pytest.fixture(autouse=True)
def cancel_leftover_jobs():
    """A test that fails while its job runs must not leave the job holding the node."""
    yield
    while SUBMITTED:
        job_id = SUBMITTED.pop()
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60,
                       env={**os.environ, "SLURM_CONF": slurm_conf()})  # fmt: skip


def slurm_conf() -> str:
    out = sh("bash", str(LOCAL_SLURM), "env").stdout.strip()
    return out.removeprefix("export SLURM_CONF=")


def submit(args: list[str], cwd: Path, env: dict) -> tuple[str, Path, str]:
    """`bihm submit slurm ARGS` in cwd; returns the job id, the log path and stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "submit", "slurm", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"^submitted SLURM job (\d+)$", proc.stdout, re.M).group(1)
    SUBMITTED.append(job_id)
    log = Path(re.search(r"^log: (.+)$", proc.stdout, re.M).group(1))
    return job_id, log, proc.stdout


def job_state(job_id: str, env: dict) -> dict[str, str]:
    out = sh("scontrol", "show", "job", "-o", job_id, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_job(job_id: str, env: dict, log: Path, timeout: float = 420) -> dict[str, str]:
    """Poll scontrol until the job has ended (bounded); return its final record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id, env)
        if state.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return state
        time.sleep(2)
    sh("scancel", job_id, env=env)
    pytest.fail(f"job {job_id} did not end in {timeout} s: {state}\n{tail(log)}")


def tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text().splitlines()[-n:]) if log.exists() else f"({log} missing)"


def write_tiny_config(job_dir: Path, **sections) -> tuple[Path, Path]:
    shards = make_shards(job_dir / "shards")
    run_dir = job_dir / "runs" / "tiny"
    cfg = tiny_config(shards, run_dir, **sections)
    cfg["train"]["max_epochs"] = 2
    path = job_dir / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, run_dir


def check_run_folder(run_dir: Path, epochs: int = 2) -> None:
    assert [int(r["epoch"]) for r in read_metrics(run_dir)] == list(range(epochs))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()


def ray_processes_of(marker: str) -> list[str]:
    """Command lines of running processes that mention `marker` (a job's Ray temp dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not a process
            continue
        if marker in args:
            found.append(f"{proc.name} {args[:200]}")
    return found


# --------------------------------------------------------------------------- SLURM
def test_slurm_ddp_job_trains_and_writes_the_run_folder(slurm_env, tmp_path):
    config, run_dir = write_tiny_config(tmp_path)
    job_id, log, out = submit(
        ["--config", str(config), "--launcher", "ddp", "--nodes", "1", "--gpus-per-node", "0",
         "--cpus-per-task", "1", "--time", "00:15:00", "--log-dir", str(tmp_path / "logs")],
        tmp_path, slurm_env,
    )  # fmt: skip
    assert f"run folder: {run_dir}" in out  # printed up front, before the job runs
    state = wait_for_job(job_id, slurm_env, log)
    text = tail(log)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, text)
    assert "bihm train: done after 2 epochs" in text
    assert "exit status 0" in text
    check_run_folder(run_dir)


def occupy(run_dir: Path) -> None:
    """Make run_dir look like a finished run: `bihm train` (in the job) then refuses it."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")


def test_slurm_ddp_job_failure_is_the_job_s_exit_status(slurm_env, tmp_path):
    config, run_dir = write_tiny_config(tmp_path)
    occupy(run_dir)
    job_id, log, _ = submit(
        ["--config", str(config), "--launcher", "ddp", "--cpus-per-task", "1",
         "--log-dir", str(tmp_path / "logs")],
        tmp_path, slurm_env,
    )  # fmt: skip
    state = wait_for_job(job_id, slurm_env, log)
    assert state["JobState"] == "FAILED" and state["ExitCode"] != "0:0", (state, tail(log))
    assert "bihm train: error:" in tail(log) and "--resume" in tail(log)


# A stand-in for `python` in the Ray template: the driver command becomes a script that
# connects to the job's Ray head at --address, runs a task there and then sleeps for
# $FAKE_DRIVER_SLEEP seconds. It checks the template's Ray lifecycle (head, address,
# shutdown on exit and on scancel) independently of `bihm train --launcher ray`.
FAKE_DRIVER = textwrap.dedent(
    """
    import os, sys, time
    import ray

    address = sys.argv[sys.argv.index("--address") + 1]
    ray.init(address=address, log_to_driver=False)
    print("fake driver: cluster CPUs", ray.cluster_resources().get("CPU"), flush=True)
    print("fake driver: task says", ray.get(ray.remote(lambda: "hello").remote()), flush=True)
    print("fake driver: args", " ".join(sys.argv[1:]), flush=True)
    time.sleep(float(os.environ.get("FAKE_DRIVER_SLEEP", "0")))
    """
)


def fake_python(tmp_path: Path) -> Path:
    (tmp_path / "fake_driver.py").write_text(FAKE_DRIVER)
    wrapper = tmp_path / "fake-python"
    # Only the bihm command is replaced; the script's other Python (python -m cluster.ports)
    # is the real one.
    wrapper.write_text(
        f'#!/bin/bash\nif [[ "$1 $2" != "-m pipeline.cli" ]]; then exec {sys.executable} "$@"; fi\n'
        f'shift 2\nexec {sys.executable} {tmp_path / "fake_driver.py"} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def ray_job(tmp_path: Path, env: dict, sleep: float, cpus: int = 2) -> tuple[str, Path]:
    config, _ = write_tiny_config(tmp_path)
    return submit(
        ["--config", str(config), "--nodes", "1", "--cpus-per-task", str(cpus),
         "--python", str(fake_python(tmp_path)), "--log-dir", str(tmp_path / "logs")],
        tmp_path, {**env, "FAKE_DRIVER_SLEEP": str(sleep)},
    )[:2]  # fmt: skip


def test_slurm_ray_template_starts_ray_and_stops_it_at_the_end(slurm_env, tmp_path):
    job_id, log = ray_job(tmp_path, slurm_env, sleep=0)
    state = wait_for_job(job_id, slurm_env, log)
    text = tail(log, 200)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, text)
    assert "fake driver: cluster CPUs 2.0" in text and "task says hello" in text
    assert re.search(r"--launcher ray --address 127\.0\.0\.1:\d+ --workers 1", text)
    assert "stopping Ray on 1 node(s)" in text
    assert ray_processes_of(f"/tmp/ray-{job_id}") == []
    assert not Path(f"/tmp/ray-{job_id}").exists()  # a successful job's Ray logs are removed


def test_slurm_ray_template_stops_ray_when_the_job_is_cancelled(slurm_env, tmp_path):
    job_id, log = ray_job(tmp_path, slurm_env, sleep=600)
    deadline = time.monotonic() + 240
    while "task says hello" not in tail(log):
        assert time.monotonic() < deadline, tail(log)
        assert job_state(job_id, slurm_env).get("JobState") in ("PENDING", "RUNNING"), tail(log)
        time.sleep(2)
    assert ray_processes_of(f"/tmp/ray-{job_id}"), "no Ray processes while the job runs"
    assert sh("scancel", job_id, env=slurm_env).returncode == 0
    state = wait_for_job(job_id, slurm_env, log, timeout=120)
    assert state["JobState"] == "CANCELLED", (state, tail(log))
    deadline = time.monotonic() + 60
    while ray_processes_of(f"/tmp/ray-{job_id}"):
        assert time.monotonic() < deadline, ray_processes_of(f"/tmp/ray-{job_id}")
        time.sleep(2)
    shutil.rmtree(f"/tmp/ray-{job_id}", ignore_errors=True)  # a failed job's Ray logs stay


def train_has_ray_launcher() -> bool:
    from pipeline.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return any("--launcher" in a.option_strings for a in sub.choices["train"]._actions)


needs_ray_launcher = pytest.mark.skipif(
    not train_has_ray_launcher(),
    reason="needs `bihm train --launcher ray` (issue: Ray Train launcher), not merged yet",
)


@needs_ray_launcher
def test_slurm_ray_job_trains_with_the_ray_launcher(slurm_env, tmp_path):
    config, run_dir = write_tiny_config(tmp_path)
    job_id, log, _ = submit(
        ["--config", str(config), "--nodes", "1", "--cpus-per-task", "2",
         "--time", "00:15:00", "--log-dir", str(tmp_path / "logs")],
        tmp_path, slurm_env,
    )  # fmt: skip
    state = wait_for_job(job_id, slurm_env, log)
    text = tail(log, 200)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, text)
    check_run_folder(run_dir)
    assert ray_processes_of(f"/tmp/ray-{job_id}") == []


def test_two_ray_jobs_run_side_by_side_on_one_node(slurm_env, tmp_path):
    """Each job's Ray takes its own block of ports: two jobs on one node both run (with
    fixed ports the second job's head found the first one's GCS port taken)."""
    jobs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        jobs.append(ray_job(folder, slurm_env, sleep=20, cpus=1))
    addresses = []
    for job_id, log in jobs:
        state = wait_for_job(job_id, slurm_env, log)
        text = tail(log, 200)
        assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, text)
        assert "task says hello" in text
        addresses.append(re.search(r"--address (127\.0\.0\.1:\d+)", text).group(1))
    assert addresses[0] != addresses[1]
    # They ran at the same time: each started before the other ended.
    (a_start, a_end), (b_start, b_end) = (job_times(j, slurm_env) for j, _ in jobs)
    assert a_start < b_end and b_start < a_end, (a_start, a_end, b_start, b_end)


def job_times(job_id: str, env: dict) -> tuple[str, str]:
    state = job_state(job_id, env)
    return state["StartTime"], state["EndTime"]


def wait_for(what: str, ready, job_id: str, env: dict, log: Path, timeout: float = 300):
    """Poll `ready()` until it is true (bounded); fail with the job's state and log."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s: {job_state(job_id, env)}\n{tail(log)}")
        time.sleep(1)


def start_requeued_job_now(job_id: str, env: dict, log: Path) -> None:
    """A requeued job waits to be eligible again (SLURM holds it ~2 minutes); let it start
    now. It then runs again by itself, with SLURM_RESTART_COUNT=1."""
    wait_for(
        "the requeue",
        lambda: job_state(job_id, env).get("Restarts") == "1"
        and job_state(job_id, env).get("JobState") == "PENDING",
        job_id, env, log, timeout=120,
    )  # fmt: skip
    assert sh("scontrol", "update", f"jobid={job_id}", "starttime=now", env=env).returncode == 0


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    return read_metrics(run_dir) if (run_dir / "metrics.csv").is_file() else []


def long_config(job_dir: Path, epochs: int) -> tuple[Path, Path]:
    """The tiny config trained for `epochs` epochs, without pictures or Gibbs validation."""
    config, run_dir = write_tiny_config(job_dir)
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["max_epochs"] = epochs
    cfg["validation"]["gibbs"]["every_n_epochs"] = 0
    cfg["samples"]["every_n_epochs"] = 0
    config.write_text(yaml.safe_dump(cfg))
    return config, run_dir


def two_epochs_into(
    job_dir: Path, env: dict, epochs: int, args: list[str]
) -> tuple[str, Path, Path]:
    """Submit the tiny config for `epochs` epochs with ARGS; return (job id, log, run
    folder) once it has finished 2 epochs."""
    config, run_dir = long_config(job_dir, epochs)
    job_id, log, _ = submit(
        ["--config", str(config), *args, "--time", "00:30:00",
         "--log-dir", str(job_dir / "logs")],
        job_dir, env,
    )  # fmt: skip
    wait_for("2 epochs", lambda: len(metrics_rows(run_dir)) >= 2, job_id, env, log, 420)
    return job_id, log, run_dir


def test_slurm_job_requeued_before_its_time_limit_continues_from_its_checkpoint(
    slurm_env, tmp_path
):
    """SIGUSR1 to the batch script (what #SBATCH --signal=B:USR1@90 sends 90 s before the
    time limit): the script requeues the job, SLURM's SIGTERM stops `bihm train` with 143
    and `interrupted at epoch N`, and the job starts again by itself and continues the run
    from that epoch with --resume to its end."""
    epochs = 12
    job_id, log, run_dir = two_epochs_into(
        tmp_path, slurm_env, epochs, ["--launcher", "ddp", "--cpus-per-task", "1"]
    )
    assert sh("scancel", "--batch", "--signal=USR1", job_id, env=slurm_env).returncode == 0
    start_requeued_job_now(job_id, slurm_env, log)
    rows_before = metrics_rows(run_dir)
    state = wait_for_job(job_id, slurm_env, log)
    text = tail(log, 400)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, text)
    assert f"the time limit is near: requeueing job {job_id}" in text
    epoch = int(re.search(r"interrupted at epoch (\d+); continue with --resume", text).group(1))
    assert f"restart 1 of job {job_id}: continuing from {run_dir}/checkpoints/last.ckpt" in text
    assert f"bihm train: done after {epochs} epochs" in text
    # It went on from the interrupted epoch: the rows before it stayed as they were.
    assert 2 <= epoch < epochs and len(rows_before) == epoch
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))
    assert rows[:epoch] == rows_before


@needs_ray_launcher
def test_slurm_ray_job_requeued_by_scontrol_continues_from_its_checkpoint(slurm_env, tmp_path):
    """`scontrol requeue` (as an admin or a preemption would): the Ray job's driver and Ray
    are stopped, the job runs again by itself and `bihm train --launcher ray --resume`
    continues the run from its last.ckpt."""
    epochs = 8
    job_id, log, run_dir = two_epochs_into(
        tmp_path, slurm_env, epochs, ["--launcher", "ray", "--cpus-per-task", "2"]
    )
    assert sh("scontrol", "requeue", job_id, env=slurm_env).returncode == 0
    start_requeued_job_now(job_id, slurm_env, log)
    rows_before = metrics_rows(run_dir)
    epoch = resume_epoch(run_dir / "checkpoints" / "last.ckpt")
    state = wait_for_job(job_id, slurm_env, log, timeout=600)
    text = tail(log, 600)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, text)
    assert f"restart 1 of job {job_id}: continuing from {run_dir}/checkpoints/last.ckpt" in text
    # (Without --resume the restarted job would refuse the run folder it left.)
    assert "bihm: resuming from" in text
    assert f"bihm train: done after {epochs} epochs" in text
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))
    # It went on from its checkpoint's epoch: the rows before it stayed as they were. (The
    # killed run may have written the row of the next epoch, whose checkpoint comes after
    # the row: that epoch was trained again.)
    assert len(rows_before) in (epoch, epoch + 1) and epoch >= 1
    assert rows[:epoch] == rows_before[:epoch]
    assert ray_processes_of(f"/tmp/ray-{job_id}") == []


# --------------------------------------------------------------------------- Ray Jobs
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 (2 CPUs, its own temp dir and free ports); yields the Jobs
    API URL and stops the head at the end."""
    gcs, dashboard, client, agent_http, agent_grpc, rtenv, metrics = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="bihm-ray-")
    ray = str(Path(sys.executable).parent / "ray")
    # The job's entrypoint runs `python`: the one of this environment, as on a cluster
    # whose Ray was started from the project's environment.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("PYTHONPATH", None)  # the job gets the code from its runtime_env only
    # Ray's token authentication, with a token of this head's own: the Jobs API refuses
    # requests without it, and `bihm submit ray` finds it through the same variables.
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.update(auth)
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rtenv}",
         f"--metrics-export-port={metrics}", "--num-cpus=2", "--num-gpus=0",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            ok = sh(ray, "health-check", f"--address=127.0.0.1:{gcs}", env=env).returncode == 0
            if ok and api_up(url, token.read_text()):
                break
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start: {head.stdout.read()}")
            time.sleep(2)
        yield url, auth
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def api_up(url: str, token: str) -> bool:
    import urllib.request

    request = urllib.request.Request(
        f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def submit_ray(head, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    url, auth = head
    env = {**os.environ, **auth, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "submit", "ray", "--address", url, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_submit_ray_runs_the_tiny_config_to_success(ray_head, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    config, run_dir = write_tiny_config(tmp_path)
    (work / "tiny.yaml").write_text(config.read_text())
    proc = submit_ray(
        ray_head, ["--config", "tiny.yaml", "--working-dir", "."], cwd=work, timeout=500
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "warning" not in proc.stderr, proc.stderr  # loopback: no security warning
    assert re.search(r"^submitted Ray job \S+ to http://127\.0\.0\.1:\d+: python -m", out, re.M)
    assert f"run folder: {run_dir}" in out
    assert "bihm train: done after 2 epochs" in out  # the job's log, followed to its end
    assert out.rstrip().endswith("SUCCEEDED")
    check_run_folder(run_dir)


def test_submit_ray_exits_with_the_failed_job_s_status(ray_head, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    config, run_dir = write_tiny_config(tmp_path)
    occupy(run_dir)
    (work / "tiny.yaml").write_text(config.read_text())
    proc = submit_ray(ray_head, ["--config", "tiny.yaml"], cwd=work, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bihm train: error:" in proc.stdout and "--resume" in proc.stdout
    assert proc.stdout.rstrip().endswith("FAILED")


@needs_ray_launcher
def test_submit_ray_trains_on_ray_train_workers(ray_head, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    config, run_dir = write_tiny_config(tmp_path)
    (work / "tiny.yaml").write_text(config.read_text())
    proc = submit_ray(
        ray_head, ["--config", "tiny.yaml", "--workers", "1", "--cpus-per-worker", "1"],
        cwd=work, timeout=500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--launcher ray --address auto --workers 1" in proc.stdout
    assert "bihm train: done after 2 epochs" in proc.stdout
    check_run_folder(run_dir)
