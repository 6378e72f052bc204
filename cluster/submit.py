"""`bihm submit slurm|ray`: send a training run or a sweep to a cluster.

`bihm submit slurm` renders an sbatch script from a template in this folder and hands it
to `sbatch`:

- `slurm-ray.sbatch` (default, `--launcher ray`): a Ray head on the first node of the
  allocation (dashboard on the head's 127.0.0.1 only), Ray workers on the others, then
  `bihm train --launcher ray` (or `bihm tune`) against the head; Ray is stopped at the end,
  also on failure, `scancel` or the time limit. Each job's Ray takes a block of ports of
  its own (`cluster/ports.py`), so jobs can share a node;
- `slurm-ddp.sbatch` (`--launcher ddp`, for clusters that forbid Ray): `srun` starts one
  `bihm train` process per GPU and Lightning's SLURM environment wires them into DDP.

Both jobs are requeueable (`slurm-requeue.sh`, put into both): a preemption or `scontrol
requeue` stops the run (`bihm train` exits 143 and keeps its last.ckpt), and the job, when
it starts again, continues it with `--resume`; 90 s before the time limit the job requeues
itself if it wrote a checkpoint. `--cpus-per-task` counts a node's CPUs under both launchers.

`bihm submit ray` submits to a running Ray cluster through Ray's Jobs API
(`JobSubmissionClient`), with a runtime_env that carries the working directory and this
project's packages, follows the job's logs and exits with its status.

Every argument is checked before anything is submitted: a bad one is a one-line error
naming the flag (exit status 2).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TEMPLATE_DIR = Path(__file__).resolve().parent
TEMPLATES = {"ray": TEMPLATE_DIR / "slurm-ray.sbatch", "ddp": TEMPLATE_DIR / "slurm-ddp.sbatch"}
# Requeue (preemption, time limit) and resume, the same in both templates.
REQUEUE_FRAGMENT = TEMPLATE_DIR / "slurm-requeue.sh"
# File systems whose paths every node of a cluster sees, and ones that no other node does.
SHARED_FS = {
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "cephfs", "glusterfs",
    "fuse.glusterfs", "fuse.sshfs", "fuse.cephfs", "fuse.juicefs", "fuse.s3fs", "fuse.gcsfuse",
    "fuse.weka", "wekafs", "pvfs2", "orangefs", "panfs", "afs", "9p", "virtiofs",
}  # fmt: skip
NODE_LOCAL_FS = {"tmpfs", "ramfs", "devtmpfs", "overlay", "squashfs"}
NODE_LOCAL_DIRS = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path("/run"))
TIME_RE = re.compile(r"^(?:(\d+)-)?(\d{1,3}):(\d{2}):(\d{2})$")
# Exit statuses of `bihm submit ray` by the job's final status.
RAY_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}


class SubmitError(ValueError):
    """A bad argument, found before anything is submitted; the message names the flag."""


# --------------------------------------------------------------------------- checks
def check_time(text: str) -> str:
    """SLURM's --time as [D-]HH:MM:SS, with minutes and seconds below 60."""
    m = TIME_RE.match(text)
    if not m or int(m.group(3)) >= 60 or int(m.group(4)) >= 60:
        raise SubmitError(f"--time: expected HH:MM:SS or D-HH:MM:SS, got {text!r}")
    if not any(int(g or 0) for g in m.groups()):
        raise SubmitError(f"--time: must be longer than 0, got {text!r}")
    return text


def mount_of(path: Path) -> tuple[str, str]:
    """(mount point, file system type) of the mount holding `path`, from /proc/mounts."""
    best, fstype = "/", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best, fstype
    text = str(path)
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mnt = fields[1].replace("\\040", " ")
        inside = text == mnt or text.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, fstype = mnt, fields[2]
    return best, fstype


def check_shared_path(flag: str, path: Path, nodes: int) -> str | None:
    """Refuse a folder that other nodes cannot see; return a warning when it is unknowable.

    Only a job on several nodes needs the path to be shared. A network file system is
    shared; a node-local folder (/tmp, /dev/shm, tmpfs) is not; any other local disk may
    or may not be mounted at the same path on the other nodes: that is a warning.
    """
    if nodes <= 1:
        return None
    path = path.resolve()
    mnt, fstype = mount_of(path)
    local = next((d for d in NODE_LOCAL_DIRS if path.is_relative_to(d)), None)
    if local is None and (fstype in SHARED_FS or fstype.startswith("fuse.")):
        return None
    if fstype in NODE_LOCAL_FS or local is not None:
        where = f"in {local}" if local is not None else f"on {fstype} at {mnt}"
        raise SubmitError(
            f"{flag}: {path} is {where}, which each node has its own copy of; "
            f"the other {nodes - 1} node(s) cannot see it: use a shared path"
        )
    return (
        f"{flag}: cannot tell whether {path} ({fstype or 'unknown'} at {mnt}) is visible on "
        f"all {nodes} nodes; it must be on storage that every node mounts at the same path"
    )


def load_run_config(path: Path | None, overrides: list[str]):
    """The validated config (`--config` is required), as `bihm train` will load it."""
    from pipeline.config import ConfigError, load_config

    if path is None:
        raise SubmitError("--config: required (or --tune SWEEP.yaml)")
    if not path.is_file():
        raise SubmitError(f"--config: {path} does not exist")
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        raise SubmitError(f"--config: {err}") from None


@dataclass
class JobConfig:
    """What a job trains: the training config (for a sweep, its base config), the folder
    its results go to (relative to the job's folder) and a short name."""

    cfg: Any
    results: Path
    name: str


def load_job_config(config: Path | None, tune: Path | None, overrides: list[str]) -> JobConfig:
    """`--config FILE` for `bihm train`, or `--tune SWEEP.yaml` for `bihm tune`: the sweep
    file names its base config (`base:`, relative to the sweep file) and its folder
    (`run_dir:`, default runs/<name>); the sweep itself is checked by `bihm tune`."""
    import yaml

    from pipeline.config import ConfigError, load_config

    if tune is None:
        cfg = load_run_config(config, overrides)
        return JobConfig(cfg, cfg.resolved_run_dir(), cfg.name)
    if config is not None:
        raise SubmitError("--config: not with --tune (the sweep file names its base config)")
    if not tune.is_file():
        raise SubmitError(f"--tune: {tune} does not exist")
    try:
        sweep = yaml.safe_load(tune.read_text())
    except yaml.YAMLError as err:
        raise SubmitError(f"--tune: {tune} is not valid YAML: {err}") from None
    if not isinstance(sweep, dict):
        raise SubmitError(f"--tune: {tune} is not a YAML mapping")
    name = str(sweep.get("name") or tune.stem)
    base = tune.parent / sweep["base"] if sweep.get("base") else None
    try:
        cfg = load_config(base, overrides)
    except ConfigError as err:
        raise SubmitError(f"--tune: base config: {err}") from None
    return JobConfig(cfg, Path(sweep.get("run_dir") or Path("runs") / name), name)


def absolute(path: str | os.PathLike, base: Path) -> Path:
    """`path` made absolute against `base` (the folder the job runs in), without resolving
    symbolic links (the shared mount may have a different name on each node)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path


def tool_path(name: str) -> str:
    """An executable next to this Python (the same environment), else the one on PATH."""
    sibling = Path(sys.executable).parent / name
    return str(sibling) if sibling.exists() else (shutil.which(name) or name)


def has_ray_client() -> bool:
    import importlib.util

    return importlib.util.find_spec("grpc") is not None


# --------------------------------------------------------------------------- slurm
@dataclass
class SlurmJob:
    """Everything the sbatch templates need, checked."""

    launcher: str
    config: Path | None
    overrides: list[str]
    nodes: int
    gpus_per_node: int
    cpus_per_node: int  # `--cpus-per-task`: a node's CPUs, under both launchers
    workdir: Path
    log_path: Path
    run_dir: Path
    job_name: str
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    tune: Path | None = None
    python: str = sys.executable
    trial_args: tuple[str, ...] = ()
    """`bihm tune`'s --workers-per-trial/--cpus-per-worker/--gpus-per-worker, as given."""

    def bihm_command(self) -> list[str]:
        """The command line the job runs (with "$PYTHON" for the environment's Python, and
        "$resume" for the --resume that a requeued job adds)."""
        sets = [a for o in self.overrides for a in ("--set", o)]
        if self.tune is not None:
            cmd = ["tune", "--config", str(self.tune), *sets, "--address", "$address"]
            return [*cmd, *self.trial_args, "$resume"]
        cmd = ["train", "--config", str(self.config), *sets]
        if self.launcher == "ddp":
            return [
                *cmd, "--devices", str(self.tasks_per_node), "--num-nodes", str(self.nodes),
                "$resume",
            ]  # fmt: skip
        return [
            *cmd,
            "--launcher", "ray",
            "--address", "$address",
            "--workers", str(self.nodes * self.tasks_per_node),
            "--gpus-per-worker", "1" if self.gpus_per_node else "0",
            "--cpus-per-worker", str(self.cpus_per_process),
            "$resume",
        ]  # fmt: skip

    @property
    def tasks_per_node(self) -> int:
        """Training processes per node: one per GPU, or one on a CPU node (a `bihm train`
        under DDP, a Ray Train worker under Ray)."""
        return max(self.gpus_per_node, 1)

    @property
    def cpus_per_process(self) -> int:
        """Each training process's share of its node's CPUs."""
        return max(1, self.cpus_per_node // self.tasks_per_node)

    @property
    def resume_from(self) -> Path:
        """What a requeued job continues from: the run's last.ckpt, or the sweep's state."""
        if self.tune is not None:
            return self.run_dir / "sweep.json"
        return self.run_dir / "checkpoints" / "last.ckpt"

    def render(self) -> str:
        """The sbatch script: the template with every {{placeholder}} filled in."""
        options = []
        if self.gpus_per_node:
            options.append(f"--gpus-per-node={self.gpus_per_node}")
        for flag, value in (("partition", self.partition), ("time", self.time)):
            if value:
                options.append(f"--{flag}={value}")
        if self.account:
            options.append(f"--account={self.account}")
        # "$address" and the --resume of a requeued job are the only shell expansions the
        # command needs; everything else is quoted.
        expand = {"$address": '"$address"', "$resume": '${resume[@]+"${resume[@]}"}'}
        words = [expand.get(w) or shlex.quote(w) for w in self.bihm_command()]
        paths = {"results": self.run_dir, "resume_from": self.resume_from}
        paths = {k: shlex.quote(str(v)) for k, v in paths.items()}
        requeue = fill(REQUEUE_FRAGMENT.read_text(), paths)
        values = {
            "job_name": self.job_name,
            "nodes": str(self.nodes),
            "cpus_per_node": str(self.cpus_per_node),
            "cpus_per_process": str(self.cpus_per_process),
            "gpus_per_node": str(self.gpus_per_node),
            "tasks_per_node": str(self.tasks_per_node),
            "sbatch_options": "\n".join(f"#SBATCH {o}" for o in options) or "#",
            "log_path": str(self.log_path),
            "workdir": str(self.workdir),
            "python": shlex.quote(self.python),
            "ray": shlex.quote(self.ray()),
            # `ray start` opens the Ray Client port only where ray[client] (grpc) is
            # installed, and refuses the flag elsewhere; the nodes run this environment.
            "ray_client": "HEAD_PORTS=("
            + ('--ray-client-server-port="$CLIENT_SERVER_PORT"' if has_ray_client() else "")
            + ")",
            "command": " ".join(['"$PYTHON"', "-m", "pipeline.cli", *words]),
            "requeue": requeue.rstrip("\n"),
        }
        return fill(TEMPLATES[self.launcher].read_text(), values)

    def ray(self) -> str:
        """The `ray` executable beside the job's Python (its environment), else this one's."""
        sibling = Path(self.python).parent / "ray"
        return str(sibling) if sibling.is_absolute() and sibling.exists() else tool_path("ray")


def fill(template: str, values: dict[str, str]) -> str:
    """The template with every {{placeholder}} replaced by its value."""
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


SBATCH_SAFE = re.compile(r"^[A-Za-z0-9_.,:+=@/-]+$")


def slurm_job(args: argparse.Namespace, cwd: Path) -> tuple[SlurmJob, list[str]]:
    """Check the arguments of `bihm submit slurm`; return the job and any warnings."""
    warnings: list[str] = []
    if args.nodes < 1:
        raise SubmitError(f"--nodes: must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node: must be >= 0, got {args.gpus_per_node}")
    if args.cpus_per_task < 1:
        raise SubmitError(f"--cpus-per-task: must be >= 1, got {args.cpus_per_task}")
    processes = max(args.gpus_per_node, 1)  # SlurmJob.tasks_per_node
    if args.cpus_per_task < processes:
        raise SubmitError(
            f"--cpus-per-task {args.cpus_per_task}: a node's CPUs, fewer than its "
            f"{processes} training processes (one per GPU)"
        )
    if args.cpus_per_task % processes:
        warnings.append(
            f"--cpus-per-task {args.cpus_per_task} (a node's CPUs) over {processes} "
            f"processes: {args.cpus_per_task // processes} each, "
            f"{args.cpus_per_task // processes * processes} used"
        )
    if args.time is not None:
        check_time(args.time)
    for flag in ("partition", "account", "job_name"):
        value = getattr(args, flag)
        if value is not None and not SBATCH_SAFE.match(value):
            raise SubmitError(f"--{flag.replace('_', '-')}: unexpected characters in {value!r}")
    if args.tune is not None and args.launcher == "ddp":
        raise SubmitError("--tune: sweeps run on Ray; use --launcher ray")
    trial_args = multi_worker_trial_args(args)
    job_cfg = load_job_config(args.config, args.tune, args.set)
    accelerator = job_cfg.cfg.train.accelerator
    if args.tune is None and args.gpus_per_node and accelerator == "cpu":
        raise SubmitError(
            f"--gpus-per-node {args.gpus_per_node}: the config trains on the CPU "
            "(train.accelerator: cpu); add --set train.accelerator=gpu"
        )
    if args.tune is None and not args.gpus_per_node and accelerator == "gpu":
        raise SubmitError("--gpus-per-node 0: the config trains on GPUs (train.accelerator: gpu)")
    tune = absolute(args.tune, cwd) if args.tune is not None else None
    config = absolute(args.config, cwd) if args.config is not None else None
    # The job runs in this folder on the first node; every node must see the config, the
    # shards and the run folder under the same paths.
    run_dir = absolute(job_cfg.results, cwd)
    source = "--tune" if tune else "--config"
    for flag, path in (
        (source, tune or config),
        (f"data.shard_dir ({source})", absolute(job_cfg.cfg.data.shard_dir, cwd)),
        (f"run_dir ({source})", run_dir),
    ):
        warning = check_shared_path(flag, path, args.nodes)
        if warning:
            warnings.append(warning)
    name = args.job_name or re.sub(r"[^A-Za-z0-9_.-]", "_", f"bihm-{job_cfg.name}")
    log_dir = absolute(args.log_dir, cwd)
    for flag, path in (("--log-dir", log_dir), ("the current folder", cwd)):
        if re.search(r"\s", str(path)):
            raise SubmitError(
                f"{flag}: {path} contains white space, which #SBATCH lines cannot hold"
            )
    job = SlurmJob(
        launcher=args.launcher,
        config=config,
        overrides=list(args.set),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_node=args.cpus_per_task,
        workdir=cwd,
        log_path=log_dir / f"{name}-%j.out",
        run_dir=run_dir,
        job_name=name,
        partition=args.partition,
        time=args.time,
        account=args.account,
        tune=tune,
        python=args.python or sys.executable,
        trial_args=trial_args,
    )
    return job, warnings


def multi_worker_trial_args(args: argparse.Namespace) -> tuple[str, ...]:
    """`--workers-per-trial N [--gpus-per-worker G] [--cpus-per-worker C]` for `bihm tune`
    (each trial a Ray Train run of N workers), checked against the allocation."""
    workers = getattr(args, "workers_per_trial", None)
    gpus = getattr(args, "gpus_per_worker", None)
    cpus = getattr(args, "cpus_per_worker", None)
    if workers is None:
        for flag, value in (("--gpus-per-worker", gpus), ("--cpus-per-worker", cpus)):
            if value is not None:
                raise SubmitError(f"{flag}: only with --tune and --workers-per-trial")
        return ()
    if args.tune is None:
        raise SubmitError("--workers-per-trial: only with --tune (the workers of each trial)")
    if workers < 1:
        raise SubmitError(f"--workers-per-trial: must be >= 1, got {workers}")
    out = ["--workers-per-trial", str(workers)]
    for flag, value, least, total, per in (
        ("--gpus-per-worker", gpus, 0, args.nodes * args.gpus_per_node, "--gpus-per-node"),
        ("--cpus-per-worker", cpus, 1e-9, args.nodes * args.cpus_per_task, "--cpus-per-task"),
    ):
        if value is None:  # bihm tune's default: the sweep's resources
            continue
        if value < least:
            raise SubmitError(f"{flag}: must be {'>= 0' if least == 0 else '> 0'}, got {value:g}")
        if workers * value > total:
            raise SubmitError(
                f"{flag} {value:g}: a trial of {workers} workers needs {workers * value:g}, "
                f"the allocation has {total} (--nodes x {per})"
            )
        out += [flag, f"{value:g}"]
    return tuple(out)


def submit_slurm(args: argparse.Namespace) -> int:
    cwd = Path.cwd()
    try:
        job, warnings = slurm_job(args, cwd)
        for warning in warnings:
            print(f"bihm submit slurm: warning: {warning}", file=sys.stderr)
        script = job.render()
        if not args.dry_run and shutil.which("sbatch") is None:
            raise SubmitError("sbatch not found on PATH: run on a SLURM login node (or --dry-run)")
        # SLURM opens the log before the script runs: its folder must exist, also for a
        # script printed by --dry-run and then given to sbatch.
        log_dir = job.log_path.parent
        if not log_dir.is_dir():
            try:
                log_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise SubmitError(f"--log-dir: cannot create {log_dir}: {err}") from None
            if args.dry_run:
                print(f"bihm submit slurm: created the log folder {log_dir}", file=sys.stderr)
        if args.dry_run:
            print(script, end="")
            return 0
    except SubmitError as err:
        print(f"bihm submit slurm: error: {err}", file=sys.stderr)
        return 2
    sbatch = shutil.which("sbatch")
    proc = subprocess.run(
        [sbatch, "--parsable"], input=script, capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        print(f"bihm submit slurm: sbatch failed: {proc.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted SLURM job {job_id}")
    print(f"log: {str(job.log_path).replace('%j', job_id)}")
    print(f"{'sweep' if job.tune else 'run'} folder: {job.run_dir}")
    return 0


# --------------------------------------------------------------------------- ray jobs
def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_ray_address(address: str) -> tuple[str, str | None]:
    """The Jobs API URL, and a warning when it is plain http to a non-loopback host."""
    if "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubmitError(
            f"--address: expected http://HOST:PORT or https://HOST:PORT, got {address!r}"
        )
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        return address, (
            f"--address {address}: the Ray Jobs API has no authentication and plain http is "
            "readable on the network; reach the head through an SSH tunnel "
            "(ssh -N -L 8265:127.0.0.1:8265 HEAD) and use --address http://127.0.0.1:8265"
        )
    return address, None


def ray_entrypoint(args: argparse.Namespace, working_dir: Path) -> str:
    """The job's shell command, with paths relative to the uploaded working directory."""

    def inside(flag: str, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(working_dir))
        except ValueError:
            raise SubmitError(
                f"{flag}: {path} is not inside --working-dir {working_dir}; the job only "
                "sees the working directory it carries"
            ) from None

    sets = [a for o in args.set for a in ("--set", o)]
    trial_workers = getattr(args, "workers_per_trial", None)
    if trial_workers is not None and args.tune is None:
        raise SubmitError("--workers-per-trial: only with --tune (the workers of each trial)")
    if args.tune is not None:
        if args.workers is not None:
            raise SubmitError("--workers: for a training job; a sweep's is --workers-per-trial")
        cmd = ["tune", "--config", inside("--tune", args.tune), *sets, "--address", "auto"]
        if trial_workers is None:
            for flag, value in (
                ("--gpus-per-worker", args.gpus_per_worker),
                ("--cpus-per-worker", args.cpus_per_worker),
            ):
                if value is not None:
                    raise SubmitError(f"{flag}: with --tune, only with --workers-per-trial")
        else:
            if trial_workers < 1:
                raise SubmitError(f"--workers-per-trial: must be >= 1, got {trial_workers}")
            # bihm tune checks them against the Ray cluster's resources before any trial.
            cmd += ["--workers-per-trial", str(trial_workers)]
            if args.gpus_per_worker is not None:
                cmd += ["--gpus-per-worker", f"{args.gpus_per_worker:g}"]
            if args.cpus_per_worker is not None:
                cmd += ["--cpus-per-worker", f"{args.cpus_per_worker:g}"]
    else:
        cmd = ["train", "--config", inside("--config", args.config), *sets]
        if args.workers is not None:
            if args.workers < 1:
                raise SubmitError(f"--workers: must be >= 1, got {args.workers}")
            cmd += ["--launcher", "ray", "--address", "auto", "--workers", str(args.workers)]
            if args.gpus_per_worker is not None:
                cmd += ["--gpus-per-worker", f"{args.gpus_per_worker:g}"]
            if args.cpus_per_worker is not None:
                cmd += ["--cpus-per-worker", f"{args.cpus_per_worker:g}"]
    return shlex.join(["python", "-m", "pipeline.cli", *cmd])


def ray_runtime_env(working_dir: Path) -> dict[str, Any]:
    """The working directory (configs, any local files) plus this project's packages, so
    the cluster needs only the dependencies installed and runs exactly this code."""
    import benchmarks
    import bihm
    import cluster
    import data_shards
    import pipeline

    return {
        "working_dir": str(working_dir),
        # Ray also honours the folder's .gitignore; these keep data and runs out even
        # without one (the upload limit is a few hundred MiB).
        "excludes": [".git", ".venv", "runs", "data", "wandb", "*.ckpt", "__pycache__"],
        # Package folders (the Jobs client uploads local paths, not module objects).
        "py_modules": [
            str(Path(m.__file__).parent) for m in (bihm, data_shards, pipeline, benchmarks, cluster)
        ],
    }


def relative_path_warnings(job_cfg: JobConfig) -> list[str]:
    """Relative data and run paths resolve inside the job's unpacked copy of the working
    directory on the cluster (data/ and runs/ are not uploaded, and the copy is temporary)."""
    out = []
    for key, value in (
        ("data.shard_dir", job_cfg.cfg.data.shard_dir),
        ("run_dir", job_cfg.results),
    ):
        if not Path(value).is_absolute():
            out.append(
                f"{key} {str(value)!r} is relative: on the cluster it resolves inside the "
                f"job's temporary copy of the working directory; use a shared path "
                f"(--set {key}=/shared/...)"
            )
    return out


def follow_ray_job(client, job_id: str) -> str:
    """Print the job's logs as they come until it ends; return its final status."""
    import asyncio
    import time

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as err:  # the log stream broke (network): keep polling the status
        print(f"bihm submit ray: warning: log stream ended ({err}); polling", file=sys.stderr)
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in RAY_EXIT:
            return status
        time.sleep(2)


def submit_ray(args: argparse.Namespace) -> int:
    try:
        address, warning = check_ray_address(args.address)
        if warning:
            print(f"bihm submit ray: warning: {warning}", file=sys.stderr)
        job_cfg = load_job_config(args.config, args.tune, args.set)
        working_dir = Path(args.working_dir).resolve()
        if not working_dir.is_dir():
            raise SubmitError(f"--working-dir: {args.working_dir} is not a folder")
        entrypoint = ray_entrypoint(args, working_dir)
        for w in relative_path_warnings(job_cfg):
            print(f"bihm submit ray: warning: {w}", file=sys.stderr)
    except SubmitError as err:
        print(f"bihm submit ray: error: {err}", file=sys.stderr)
        return 2

    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=ray_runtime_env(working_dir),
            # A plain `bihm train` trains inside the entrypoint: give it a CPU of its own.
            # With Ray workers (or a sweep) the driver only coordinates.
            entrypoint_num_cpus=1 if args.workers is None and args.tune is None else 0,
        )
    except (ConnectionError, RuntimeError, ValueError) as err:
        print(f"bihm submit ray: error: --address {address}: {err}", file=sys.stderr)
        return 1
    print(f"submitted Ray job {job_id} to {address}: {entrypoint}")
    print(f"{'sweep' if args.tune else 'run'} folder: {job_cfg.results}")
    if args.no_wait:
        print(f"follow it with: ray job logs --address {address} --follow {job_id}")
        return 0
    try:
        status = follow_ray_job(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\nbihm submit ray: stopped following; the job goes on "
            f"(ray job stop --address {address} {job_id} stops it)",
            file=sys.stderr,
        )
        return 130
    print(f"bihm submit ray: job {job_id} {status}")
    return RAY_EXIT[status]


# --------------------------------------------------------------------------- cli
def register(subparsers) -> None:
    """Add `bihm submit slurm` and `bihm submit ray` to the `bihm` command line."""
    from pipeline.config import add_override_argument

    p = subparsers.add_parser("submit", help="submit a run or a sweep to SLURM or to Ray")
    sub = p.add_subparsers(dest="target", required=True)

    s = sub.add_parser("slurm", help="render an sbatch script (Ray or DDP) and sbatch it")
    s.add_argument("--config", type=Path, default=None, help="YAML config file (or --tune)")
    add_override_argument(s, "override a config value (repeatable), passed on to the job")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0)
    s.add_argument(
        "--cpus-per-task",
        type=int,
        default=4,
        help="CPUs per node, under both launchers: ray gives them to the node's Ray workers, "
        "ddp shares them equally among the node's processes (one per GPU) (default 4)",
    )
    s.add_argument("--partition", default=None)
    s.add_argument("--time", default=None, help="time limit, HH:MM:SS or D-HH:MM:SS")
    s.add_argument("--account", default=None)
    s.add_argument("--job-name", default=None, help="default bihm-<config name>")
    s.add_argument(
        "--launcher",
        choices=sorted(TEMPLATES),
        default="ray",
        help="ray: a Ray cluster in the allocation (default); ddp: srun + Lightning DDP",
    )
    s.add_argument("--tune", type=Path, default=None, help="run `bihm tune` on this sweep file")
    s.add_argument("--workers-per-trial", type=int, default=None, help="--tune: Ray Train workers")
    s.add_argument("--gpus-per-worker", type=float, default=None, help="--tune, per trial worker")
    s.add_argument("--cpus-per-worker", type=float, default=None, help="--tune, per trial worker")
    s.add_argument("--log-dir", type=Path, default=Path("runs/slurm"), help="SLURM log folder")
    s.add_argument("--python", default=None, help="Python on the nodes (default: this one)")
    s.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    s.set_defaults(func=submit_slurm)

    r = sub.add_parser("ray", help="submit to a running Ray cluster through its Jobs API")
    r.add_argument("--address", required=True, help="Jobs API, e.g. http://127.0.0.1:8265")
    r.add_argument("--config", type=Path, default=None, help="YAML config file (or --tune)")
    add_override_argument(r, "override a config value (repeatable), passed on to the job")
    r.add_argument("--working-dir", type=Path, default=Path("."), help="uploaded with the job")
    r.add_argument("--tune", type=Path, default=None, help="run `bihm tune` on this sweep file")
    r.add_argument("--workers", type=int, default=None, help="train on N Ray Train workers")
    r.add_argument(
        "--workers-per-trial",
        type=int,
        default=None,
        help="--tune: each trial a Ray Train run of N workers (DDP processes)",
    )
    r.add_argument("--gpus-per-worker", type=float, default=None, help="of --workers, or per trial")
    r.add_argument("--cpus-per-worker", type=float, default=None, help="of --workers, or per trial")
    r.add_argument("--no-wait", action="store_true", help="submit and return at once")
    r.set_defaults(func=submit_ray)
