"""`bihm train --launcher ray`: the unchanged Lightning module and data module on Ray Train.

The driver (the `bihm train` process) does every start-up check before a worker exists: the
run folder is free (or holds a checkpoint for `--resume`), the data is prepared, the resources
are there. Then it writes the run folder (config.yaml, the wandb run id), connects to Ray (an
embedded local cluster, `$RAY_ADDRESS`, or `--address`) and starts a `TorchTrainer`. Each Ray
Train worker builds the same Trainer as the local launcher (`pipeline.train.build_trainer`),
with Ray's `RayDDPStrategy` and `RayLightningEnvironment`, and `RayTrainReportCallback`
reports the epoch's metrics and a checkpoint to Ray. When a worker fails, Ray restarts the
worker group (at most `max_failures` times) and the workers continue from the last reported
checkpoint. Rank 0 writes the run folder exactly as in local mode and is the only wandb logger.

Paths are resolved in the driver: Ray workers do not run in the driver's working directory.
On a cluster of several machines the run folder and the data must be on a file system that
the driver and every node share (as Ray's own storage path must be).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only

from bihm.lightning import BiHMModule
from pipeline import quiet
from pipeline.config import Config, config_from_dict
from pipeline.train import (
    TrainingError,
    TrainingInterrupted,
    build_trainer,
    check_run_dir,
    ensure_shards,
    fit,
    make_datamodule,
    monitor_metric,
    start_run_dir,
)

# Rank 0 alone draws the sample pictures (minutes on a CPU) while the others wait in a
# collective: the process group must not time out meanwhile.
PROCESS_GROUP_TIMEOUT_S = 3 * 3600
RAY_STORAGE = "ray"
"""Ray Train's storage inside the run folder: reported checkpoints and its run state."""


class StopRequested(Exception):
    """Raised by a worker callback on every rank at the same step (a decision all-reduced
    over the ranks) to end the run early; `train_worker` then returns normally, so Ray
    Train ends the run as finished, releases its workers and is not restarted. A Tune
    trial stopped by its scheduler ends so (pipeline/tune.py)."""


def run_ray_training(
    cfg: Config,
    *,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
    address: str | None = None,
    max_failures: int = 2,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    extra_callbacks: list[Callback] | tuple = (),
) -> dict[str, Any]:
    """Train `cfg` with `workers` Ray Train workers; returns what `run_training` returns.

    workers: default train.devices x train.num_nodes. gpus_per_worker: default 1 when the
    config's accelerator is gpu, or auto and the Ray cluster has GPUs, else 0.
    address: None starts an embedded local Ray (unless $RAY_ADDRESS names a cluster),
    "auto" joins the cluster started on this machine with `ray start`, HOST:PORT a remote one.
    extra_callbacks are pickled and shipped to every worker (tests inject failures so).
    """
    if run_dir is not None:
        cfg.run_dir = str(run_dir)
    workers = workers if workers is not None else cfg.train.devices * cfg.train.num_nodes
    check_options(cfg, workers, cpus_per_worker, gpus_per_worker, max_failures)
    check_run_dir(cfg, resume)  # a resume continues from last.ckpt (see train_worker)
    shard_dir = Path(cfg.data.shard_dir).resolve()
    ensure_shards(shard_dir, cfg.data.dataset)
    run_dir = start_run_dir(cfg).resolve()

    import ray

    started = not ray.is_initialized()
    if started:
        connect(address, workers, cpus_per_worker, gpus_per_worker)
    # SIGTERM (scancel, a time limit, a preemption) to the driver: Ray's C++ handler would
    # abort the process (status 134). Raise instead, so that Ray shuts down below and the
    # command reports "interrupted ... --resume" with status 143; the workers' last.ckpt is
    # the end of the last finished epoch.
    sigterm = _SigtermStop(run_dir)
    # Only the main thread may set a handler (a caller in another thread keeps Ray's).
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, sigterm.handle) if in_main else None
    try:
        gpus = resolve_gpus(cfg, gpus_per_worker)
        check_resources(workers, cpus_per_worker, gpus)
        fit_on_ray(
            cfg,
            run_dir=run_dir,
            shard_dir=shard_dir,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus,
            max_failures=max_failures,
            extra_callbacks=list(extra_callbacks),
        )
    except BaseException as err:
        # Ray may wrap the handler's exception (a SystemError out of ray.get's signal check).
        if sigterm.received:
            raise TrainingInterrupted(run_dir, global_rank=0) from err
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        if started:
            ray.shutdown()
    return summarize(run_dir, monitor_metric(cfg))


class _SigtermStop:
    """The driver's SIGTERM handler: remembers the signal and raises, to leave Ray's wait."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.received = False

    def handle(self, signum, frame) -> None:
        self.received = True
        raise TrainingInterrupted(self.run_dir, global_rank=0)


def check_options(
    cfg: Config,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float | None,
    max_failures: int,
) -> None:
    """One-line errors naming the flag, before anything starts."""
    if workers < 1:
        raise TrainingError(f"--workers must be >= 1, got {workers}")
    if not cpus_per_worker > 0:
        raise TrainingError(f"--cpus-per-worker must be > 0, got {cpus_per_worker}")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise TrainingError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    if gpus_per_worker and cfg.train.accelerator == "cpu":
        raise TrainingError(
            f"--gpus-per-worker {gpus_per_worker} but train.accelerator is cpu; "
            "set --set train.accelerator=gpu (or auto)"
        )
    if cfg.train.accelerator == "gpu" and gpus_per_worker == 0:
        raise TrainingError("train.accelerator is gpu but --gpus-per-worker is 0")
    if max_failures < -1:
        raise TrainingError(f"--max-failures must be >= -1 (-1 = no limit), got {max_failures}")


def runtime_env() -> dict[str, Any]:
    """Ship this checkout's packages to the workers, so that a cluster needs only the
    dependencies installed (not the project), and runs exactly the driver's code."""
    import bihm
    import data_shards
    import pipeline

    return {"py_modules": [bihm, data_shards, pipeline]}


def connect(
    address: str | None, workers: int, cpus_per_worker: float, gpus_per_worker: float | None
) -> None:
    """ray.init: an embedded local cluster sized for the workers, or the given cluster."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        # Inside a Ray job (`bihm submit ray`) the job's own runtime_env already carries
        # the code; a second one would clash with it.
        kwargs["runtime_env"] = runtime_env()
    if address is None:
        # "local": never join a cluster that someone else started on this machine.
        kwargs.update(address="local", num_cpus=math.ceil(workers * cpus_per_worker))
        if gpus_per_worker is not None:
            kwargs["num_gpus"] = math.ceil(workers * gpus_per_worker)
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as err:
        if address is None:
            raise TrainingError(f"could not start a local Ray: {err}") from err
        hint = ""
        if "RAY_AUTH_MODE" not in os.environ:
            # Ray sends its token to an address given explicitly only when asked to.
            hint = (
                "; a cluster with token authentication (the default of `ray start`) needs "
                "RAY_AUTH_MODE=token and its token in ~/.ray/auth_token or $RAY_AUTH_TOKEN"
            )
        raise TrainingError(
            f"--address: could not join the Ray cluster at {address}: {err}{hint}"
        ) from err


def resolve_gpus(cfg: Config, gpus_per_worker: float | None) -> float:
    """GPUs per worker: as given, else 1 for accelerator gpu, or auto on a cluster with GPUs."""
    import ray

    if gpus_per_worker is not None:
        return gpus_per_worker
    if cfg.train.accelerator == "cpu":
        return 0.0
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    if cfg.train.accelerator == "gpu" and not has_gpus:
        raise TrainingError("train.accelerator is gpu but the Ray cluster has no GPU")
    return 1.0 if has_gpus else 0.0


def check_resources(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """Warn when the cluster cannot place the workers now (an autoscaler may add nodes;
    otherwise Ray Train waits for them)."""
    import ray

    have = ray.cluster_resources()
    for name, each in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker)):
        need = workers * each
        if need > have.get(name, 0):
            print(
                f"bihm train: warning: {workers} workers need {need:g} {name}s but the Ray "
                f"cluster has {have.get(name, 0):g}; Ray Train waits until it has them",
                file=sys.stderr,
                flush=True,
            )


def fit_on_ray(
    cfg: Config,
    *,
    run_dir: Path,
    shard_dir: Path,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    max_failures: int,
    extra_callbacks: list[Callback],
    run_callbacks: list | tuple = (),
):
    """Run the TorchTrainer; a failed run (after its retries) is a TrainingError.

    extra_callbacks: Lightning callbacks for every worker (before Ray's report callback,
    so that what they log at an epoch's end is in that epoch's report). run_callbacks:
    Ray Train callbacks of the run (`ray.train.UserCallback`, e.g. Tune's reporting).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    try:
        from ray.train import TrainingFailedError
    except ImportError:  # Ray Train v1 (RAY_TRAIN_V2_ENABLED=0)
        from ray.train.base_trainer import TrainingFailedError

    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "run_dir": str(run_dir),
            "shard_dir": str(shard_dir),
            "accelerator": "gpu" if use_gpu else "cpu",
            "cpus_per_worker": cpus_per_worker,
            "callbacks": extra_callbacks,
            "verbose": quiet.is_verbose(),
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(
            backend="nccl" if use_gpu else "gloo", timeout_s=PROCESS_GROUP_TIMEOUT_S
        ),
        run_config=RunConfig(
            name=RAY_STORAGE,
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(run_callbacks),
        ),
    )
    try:
        return trainer.fit()
    except TrainingFailedError as err:
        raise TrainingError(f"Ray training failed: {first_error(err)}") from err


def first_error(err: BaseException) -> str:
    """The first worker's error as one line (the full tracebacks are in the log above)."""
    failures = getattr(err, "worker_failures", None) or {}
    cause = next(iter(failures.values()), None) if failures else None
    text = str(cause if cause is not None else err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def summarize(run_dir: Path, monitor: str) -> dict[str, Any]:
    """run_training's summary, read from the run folder's last.ckpt.

    Not from the last checkpoint reported to Ray: RayTrainReportCallback reports in
    on_train_epoch_end, and Lightning runs the ModelCheckpoint callbacks after every other
    callback, so that checkpoint holds the best of the epoch before (a best-*.ckpt that
    save_top_k=1 has since deleted, when the last epoch is the best). last.ckpt is written
    by the second ModelCheckpoint, after the first one recorded this epoch's best: its state
    is what the local launcher reads from `trainer.checkpoint_callback`.
    """
    out: dict[str, Any] = {
        "run_dir": str(run_dir),
        "best": None,
        "best_path": None,
        "monitor": monitor,
        "epochs": 0,
        "global_rank": 0,
    }
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():  # not one epoch finished
        return out
    payload = torch.load(last, map_location="cpu", weights_only=True)
    out["epochs"] = int(payload["epoch"]) + 1
    for key, state in payload.get("callbacks", {}).items():
        # The ModelCheckpoint that watches `monitor` holds the best (the unmonitored one
        # writes last.ckpt).
        if key.startswith("ModelCheckpoint") and state.get("monitor") == monitor:
            best = state.get("best_model_score")
            out["best"] = float(best) if best is not None else None
            out["best_path"] = state.get("best_model_path") or None
    return out


# --------------------------------------------------------------------------- worker
def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the local launcher's Trainer with Ray's strategy and environment."""
    import ray.train
    from ray.train.lightning import (
        RayDDPStrategy,
        RayLightningEnvironment,
        RayTrainReportCallback,
        prepare_trainer,
    )

    quiet.install(verbose=config.get("verbose", True))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Known before the Trainer exists, for everything that runs on rank 0 only.
    rank_zero_only.rank = rank
    node = ray.get_runtime_context().get_node_id()
    print(f"bihm: Ray Train worker rank {rank}/{world} on node {node}", file=sys.stderr, flush=True)
    cfg = config_from_dict(config["config"])
    if config["accelerator"] == "cpu":
        torch.set_num_threads(cfg.train.cpu_threads or max(1, int(config["cpus_per_worker"])))

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = BiHMModule(cfg.to_dict())
    datamodule = make_datamodule(cfg, shard_dir=config["shard_dir"])
    trainer = build_trainer(
        cfg,
        Path(config["run_dir"]),
        accelerator=config["accelerator"],
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        extra_callbacks=[*config["callbacks"], RayTrainReportCallback()],
    )
    trainer = prepare_trainer(trainer)
    with contextlib.ExitStack() as stack:
        candidates = []
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:  # a restart after a failure: the last reported epoch
            folder = stack.enter_context(checkpoint.as_directory())
            candidates.append(str(Path(folder) / RayTrainReportCallback.CHECKPOINT_NAME))
        # Ray collects reports every few seconds, so a worker that dies right after a
        # report can lose it; the run folder's last.ckpt of that epoch is then newer. The
        # driver checked that a new run's folder held none, so any last.ckpt is this job's.
        last = Path(config["run_dir"]) / "checkpoints" / "last.ckpt"
        if last.is_file():
            candidates.append(str(last))
        ckpt_path = latest_checkpoint(candidates)
        if rank == 0 and ckpt_path:
            print(f"bihm: resuming from {ckpt_path}", file=sys.stderr, flush=True)
        try:
            fit(trainer, module, datamodule, ckpt_path)
        except StopRequested as stop:
            if rank == 0:
                print(f"bihm: stopped: {stop}", file=sys.stderr, flush=True)


def latest_checkpoint(paths: list[str]) -> str | None:
    """The checkpoint with the most optimizer steps (the first one of equals), or None."""
    best, best_step = None, -1
    for path in paths:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if payload["global_step"] > best_step:
            best, best_step = path, payload["global_step"]
    return best
