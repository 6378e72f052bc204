"""`bihm train`: build the data module, callbacks, loggers and the Trainer; run fit.

All launcher concerns live here (accelerator, devices, nodes, DDP strategy, loggers,
callbacks, the run folder), so `bihm.lightning.BiHMModule` and the data module stay
unchanged under Ray Train, Ray Tune or SLURM: those only need a different `build_trainer`.

Run folder `runs/<name>/`:
    config.yaml             the resolved config
    metrics.csv             one row per epoch (rewritten atomically)
    curves.png              learning curves, rewritten each epoch
    checkpoints/last.ckpt   resume point (optimizer, epoch counter, callbacks)
    checkpoints/best-*.ckpt the best by validation log p~*
    samples/epoch_NNNN.png  p (top-down) and p* (Gibbs) samples, every samples.every_n_epochs
    wandb_run_id, wandb/    with logging.wandb on: the run's id (kept across resumes), its files
    ray/                    with --launcher ray: the checkpoints reported to Ray Train
"""

from __future__ import annotations

import csv
import io
import math
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    Timer,
    TQDMProgressBar,
)
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from bihm import compiled
from bihm.atomic import atomic_path, atomic_write_text
from bihm.errors import UserError
from bihm.evaluation import sample_pictures
from bihm.lightning import BiHMModule
from data_shards import BinarizedMNISTDataModule
from pipeline.config import Config, config_from_dict, save_config
from pipeline.cpu_threads import CPUThreadGovernor


def monitor_metric(cfg: Config) -> str:
    """What checkpoint selection and early stopping watch: the validation estimate of the
    distribution the objective trains, log p~*(x) for a BiHM and log p(x) for RWS."""
    return "val/log_p" if cfg.train.objective == "rws" else "val/log_ptilde_star"


class TrainingError(UserError, RuntimeError):
    """A run cannot start or continue (e.g. nothing to resume, run folder already used)."""


EXIT_INTERRUPTED = 128 + signal.SIGTERM
"""143, the status a shell reports for a process that SIGTERM ended: `bihm train`'s exit
status when SIGTERM (scancel, a time limit, a preemption) stopped it before its last epoch."""


class TrainingInterrupted(Exception):
    """SIGTERM stopped the run after the current batch; `--resume` continues it from
    checkpoints/last.ckpt, the end of its last finished epoch (see Preemption)."""

    def __init__(self, run_dir: str | os.PathLike, global_rank: int) -> None:
        super().__init__(f"interrupted; continue with --resume ({run_dir})")
        self.run_dir = Path(run_dir)
        self.global_rank = global_rank


def is_rank_zero() -> bool:
    """Global rank 0 of the job, known before the Trainer exists (env RANK/SLURM_PROCID/...)."""
    return rank_zero_only.rank == 0


# --------------------------------------------------------------------------- data
class PreparingDataModule(BinarizedMNISTDataModule):
    """The contract's data module; global rank 0 prepares the shards if they are missing.

    A top-level class (not one defined inside a function) so that it pickles: Ray ships
    the data module's class to its workers by reference.
    """

    def __init__(self, *args: Any, dataset: str = "binarized_mnist", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dataset = dataset
        # One preparation per job (global rank 0), then Lightning's barrier.
        self.prepare_data_per_node = False

    def prepare_data(self) -> None:
        ensure_shards(self.shard_dir, self.dataset)
        if self.train_shard_dir is not None:  # data.binarization: dynamic
            ensure_shards(self.train_shard_dir, "binarized_mnist_grey")


def make_datamodule(cfg: Config, **overrides: Any) -> PreparingDataModule:
    """The contract's BinarizedMNISTDataModule, preparing the shards on rank 0 if needed."""
    d = cfg.data
    kwargs = dict(
        shard_dir=d.shard_dir,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        num_workers=d.num_workers,
        shuffle=d.shuffle,
        shuffle_buffer=d.shuffle_buffer,
        seed=cfg.seed,
        train_limit=d.train_limit,
        valid_limit=d.valid_limit,
        test_limit=d.test_limit,
        with_labels=cfg.model.labels > 0,
        train_eval=cfg.validation.train_examples,
        train_shard_dir=grey_shard_dir(cfg),
    )
    kwargs.update(overrides)
    return PreparingDataModule(dataset=d.dataset, **kwargs)


def grey_shard_dir(cfg: Config) -> str | None:
    """Where the grey training images of `data.binarization: dynamic` live (None: fixed)."""
    d = cfg.data
    if d.binarization != "dynamic":
        return None
    return d.grey_shard_dir or f"{d.shard_dir.rstrip('/')}_grey"


def ensure_shards(
    shard_dir: str | os.PathLike, dataset: str = "binarized_mnist", key: str | None = None
) -> None:
    """Write the shards with `data_shards.prepare` when `shard_dir` has no manifest.
    `key` is the config key that named `shard_dir`, for the messages (default: the one
    that names a folder of `dataset`, data.grey_shard_dir or data.shard_dir).

    Says so on stderr, with the absolute folder, and whether that folder is new (a mistyped
    data.shard_dir would otherwise become a second copy of the data unnoticed). A folder of
    raw data is refused (shards are never written into a data source), and a folder that
    cannot be written is an error before the source is read; advice about
    $BIHM_DATA_SOURCE comes only with a failure to get the source data.
    """
    from bihm.atomic import check_writable
    from data_shards import load_manifest, prepare
    from data_shards.sources import SourceError

    if key is None:
        key = "data.grey_shard_dir" if dataset == "binarized_mnist_grey" else "data.shard_dir"

    try:
        load_manifest(shard_dir)  # a raw-data folder is a DataError here, not prepared
        return
    except FileNotFoundError:
        pass
    folder = Path(shard_dir)
    existed = folder.is_dir()
    check_writable(folder, key, folder=True)
    source = os.environ.get("BIHM_DATA_SOURCE")
    where = f"$BIHM_DATA_SOURCE={source}" if source else "a download (set $BIHM_DATA_SOURCE)"
    if existed:
        into = f"into it ({folder.resolve()})"
    else:
        into = f"into {folder.resolve()}, a new folder: {key} did not exist"
        others = _prepared_siblings(folder)
        if others:
            into += f" (prepared shards beside it: {', '.join(others)}; a typo?)"
    print(
        f"bihm: {key} {shard_dir} has no shard manifest; preparing {dataset} "
        f"from {where} {into} ...",
        file=sys.stderr,
        flush=True,
    )
    try:
        prepare(shard_dir, dataset=dataset, out_name=key)
    except SourceError as err:  # no network, a missing or unreadable source folder
        raise TrainingError(
            f"could not prepare the data in {shard_dir}: {err}. Without internet, set "
            f"BIHM_DATA_SOURCE to a folder holding binarized_mnist_{{train,valid,test}}.amat[.gz]"
        ) from err
    except OSError as err:  # the source was read; writing the shards failed (disk full, ...)
        raise TrainingError(f"could not write the shards in {shard_dir}: {err}") from err


def _prepared_siblings(folder: Path, limit: int = 3) -> list[str]:
    """Folders beside `folder` that hold prepared shards (what a mistyped name meant)."""
    parent = folder.parent
    try:
        found = sorted(d for d in parent.iterdir() if (d / "manifest.json").is_file())
    except OSError:
        return []
    return [str(d) for d in found[:limit]]


# --------------------------------------------------------------------------- callbacks
def first_epoch_to_run(trainer: pl.Trainer) -> int:
    """The first epoch a (resumed) fit trains: the current epoch, or the one after it where
    the checkpoint was written after the epoch's last batch but before the epoch closed.
    A checkpoint written at a validation's end is one: runs that validated every n-th epoch
    saved last.ckpt there (Lightning's default) until it was saved at the train epoch's end.
    Resumed from it, that epoch neither trains nor validates again."""
    epochs, batches = (
        trainer.fit_loop.epoch_progress.current,
        trainer.fit_loop.epoch_loop.batch_progress,
    )
    trained = epochs.ready > epochs.completed and batches.is_last_batch
    return trainer.current_epoch + int(trained)


class MetricsCSV(Callback):
    """metrics.csv with one row per validated epoch from `BiHMModule.epoch_metrics`, and
    curves.png.

    Each row also says where the time went: `train_time_s` (the training batches),
    `val_time_s` (validation with 2 log Z and Gibbs inpainting, and the sample pictures
    when the callbacks before this one draw them) and `time` (Unix time at the end).
    Rank 0 rewrites both files atomically after each validation. On resume, rows of the
    epochs that are run again are dropped first.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.curves = Path(run_dir) / "curves.png"
        self.rows: list[dict[str, float]] = []
        self._train_start = self._val_start = time.time()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Also the first epoch's start after a resume, where Lightning may skip
        # on_train_epoch_start.
        self._train_start = time.time()
        self.rows = []
        if self.path.is_file():
            first = first_epoch_to_run(trainer)
            with open(self.path, newline="") as f:
                for row in csv.DictReader(f):
                    values = {k: float(v) if v != "" else math.nan for k, v in row.items()}
                    if values["epoch"] < first:
                        self.rows.append(values)
        if trainer.is_global_zero:
            self._write()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = time.time()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.time()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        row = dict(getattr(pl_module, "epoch_metrics", {}))
        if not row:
            return
        now = time.time()
        row["train_time_s"] = self._val_start - self._train_start
        row["val_time_s"] = now - self._val_start
        row["time"] = now
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        self._write()
        from pipeline.plots import save_curves

        save_curves(self.curves, self.rows)

    def _write(self) -> None:
        keys: list[str] = ["epoch"]
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        front = [k for k in keys if k.startswith("train/")]
        rest = [k for k in keys if k != "epoch" and k not in front]
        header = ["epoch", *front, *rest]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=header, restval="", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            out = {k: (int(v) if k == "epoch" else repr(float(v))) for k, v in row.items()}
            writer.writerow({k: ("" if v == "nan" else v) for k, v in out.items()})
        atomic_write_text(self.path, buf.getvalue())


class ConfiguredEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping, counting `patience_epochs` in epochs when validation runs
    every `every_n_epochs`-th epoch (ceil(patience_epochs / every_n_epochs) validations),
    with the config's patience and cadence on --resume.

    Lightning restores the patience saved in the checkpoint, so `--resume --set
    train.early_stopping_patience=20` would keep the old one without a word. The wait count
    and the best score still come from the checkpoint, under Lightning's own state key, so
    that checkpoints written by plain EarlyStopping resume with them. The wait count is in
    validations, so it is saved with its cadence and carried over in epochs where --resume
    changes `validation.every_n_epochs` (rounded down to whole validations: 4 epochs waited
    at cadence 1 are 2 validations at cadence 2, not 4). A checkpoint without the cadence
    counts as being of the current one.
    """

    def __init__(self, *, patience_epochs: int, every_n_epochs: int, **kwargs: Any) -> None:
        super().__init__(patience=math.ceil(patience_epochs / every_n_epochs), **kwargs)
        self.every_n_epochs = every_n_epochs

    @property
    def state_key(self) -> str:
        return f"EarlyStopping{dict(monitor=self.monitor, mode=self.mode)!r}"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "every_n_epochs": self.every_n_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience
        saved_every = state_dict.get("every_n_epochs", self.every_n_epochs)
        self.wait_count = self.wait_count * saved_every // self.every_n_epochs


class SamplesCallback(Callback):
    """Every N epochs rank 0 saves plain p samples next to p* Gibbs samples."""

    def __init__(self, run_dir: str | os.PathLike, cfg: Config) -> None:
        self.dir = Path(run_dir) / "samples"
        self.cfg = cfg.samples
        self.seed = cfg.seed

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.cfg.every_n_epochs
        if (
            every <= 0
            or trainer.sanity_checking
            or trainer.state.fn != "fit"
            or not trainer.is_global_zero
            or (trainer.current_epoch + 1) % every != 0
        ):
            return
        path = self.dir / f"epoch_{trainer.current_epoch:04d}.png"
        save_sample_picture(
            pl_module.model,
            path,
            n=self.cfg.n,
            steps=self.cfg.gibbs_steps,
            proposals=self.cfg.proposals,
            inner=self.cfg.inner,
            seed=self.seed,
            title=f"epoch {trainer.current_epoch}",
        )


def save_sample_picture(
    model,
    path,
    *,
    n: int,
    steps: int,
    proposals: int,
    inner: int,
    seed: int,
    title: str = "",
    progress: bool = False,
    group: int = 8,
) -> None:
    """PNG: n plain top-down p samples | n p* samples after `steps` Gibbs sweeps.

    Chains run in groups of `group` (memory: each sweep scores proposals x inner
    configurations per chain); chain j has its own seeded stream, so the picture does
    not depend on `group`.
    """
    from pipeline.plots import save_panels, tile

    was_training = model.training
    model.eval()
    x_p, x_star = sample_pictures(
        model,
        n,
        steps=steps,
        proposals=proposals,
        inner=inner,
        seed=seed,
        progress=progress,
        group=group,
    )
    model.train(was_training)
    save_panels(
        path,
        [
            ("p(x): top-down samples", tile(x_p)),
            (f"p*(x): {steps} Gibbs sweeps, {proposals} proposals", tile(x_star)),
        ],
        title=title,
    )


# --------------------------------------------------------------------------- trainer
class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written through bihm.atomic (temporary file, fsync, rename): a kill
    mid-save leaves the previous last.ckpt intact instead of a truncated one. Read onto
    the CPU, so that a run trained on a GPU resumes on a machine without one (Lightning
    then moves the weights and the optimizer state to the run's device)."""

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return super().load_checkpoint(path, map_location="cpu", weights_only=weights_only)

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class Compile(Callback):
    """`train.compile` in every process of the run (each DDP rank, each Ray worker), once
    its device is known: compiled mode compiles the random streams' draw at setup and the
    training step and the estimators at their first call; rank 0 reports each one's cost."""

    def __init__(self, setting: bool | str, cuda_graphs: bool = True) -> None:
        self.setting, self.cuda_graphs = setting, cuda_graphs
        self._seen: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        seconds = compiled.enable(self.setting, pl_module.device, self.cuda_graphs)
        # compiled.seconds() counts the whole process: a Trainer before this one (bench,
        # a Tune trial's retry) may have compiled already, and that is not this run's cost.
        self._seen = compiled.seconds()
        if seconds is not None:
            report_compile({"the random streams": seconds}, trainer.is_global_zero)

    def _report_new(self, trainer: pl.Trainer) -> None:
        now = compiled.seconds()
        new = {k: v - self._seen.get(k, 0.0) for k, v in now.items() if v != self._seen.get(k)}
        self._seen = now
        report_compile(new, trainer.is_global_zero)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self._report_new(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._report_new(trainer)


def report_compile(seconds: dict[str, float], rank_zero: bool = True) -> None:
    """One stderr line per compiled function: its first call's seconds (compilation)."""
    for name, s in seconds.items():
        if rank_zero:
            print(f"bihm: compiled {name} in {s:.1f} s", file=sys.stderr, flush=True)


class Preemption(Callback):
    """SIGTERM (scancel, a time limit, a preemption) stops the run at a batch end, the same
    one on every rank, and leaves checkpoints/last.ckpt as its resume point.

    Lightning's signal connector catches SIGTERM, and its loops stop with SIGTERMException
    once `trainer.received_sigterm` is set. Its handler, though, broadcasts from inside
    the signal handler on every rank, which deadlocks DDP when another rank is inside a
    collective of its own (seen: rank 0 in that broadcast, rank 1 in validation's
    all_gather). This callback puts a handler in its place that only notes the signal;
    after each training batch the ranks agree (a max over the ranks) whether any of them
    was signalled, and then all set `received_sigterm` at the same batch: Lightning stops
    them there. At an epoch's last batch they first validate and write the epoch's
    checkpoint, then stop.

    The resume point is last.ckpt, written at every epoch end: checkpoints are epoch ends
    only (the data stream cannot restart mid-epoch, and the module's epoch metrics and
    optimizer reset assume so; a mid-epoch state such as Lightning's `hpc_ckpt` would
    train the epoch's first batches again). The interrupted epoch is trained again.

    A new run has no last.ckpt before its first epoch ends: this callback keeps the
    starting state in memory and writes it as last.ckpt when SIGTERM stops the run before
    that, so that `--resume` always has a checkpoint.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / "checkpoints" / "last.ckpt"
        self.signalled = False  # this process received SIGTERM
        self._stop_after_validation = False
        self._start: dict[str, Any] | None = None
        self._dumping = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before Lightning registers its handlers (at the start of the fit loop), which
        # take the notifier from this attribute; they are restored when fit ends.
        trainer._signal_connector._sigterm_notifier_fn = self._notice

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        vars(trainer._signal_connector).pop("_sigterm_notifier_fn", None)

    def _notice(self, signum: int, frame: Any) -> None:
        # A signal handler: no collective, and no printing (a write to stderr that it
        # interrupts would be re-entered).
        self.signalled = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx):
        stop = self.signalled
        if trainer.world_size > 1:  # (one process: no tensor, no device sync per batch)
            flag = torch.tensor(float(stop), device=trainer.strategy.root_device)
            stop = bool(trainer.strategy.reduce(flag, reduce_op="max").item())
        if not stop or self._stop_after_validation:
            return
        last = batch_idx + 1 >= trainer.num_training_batches
        if trainer.is_global_zero:
            after = "this epoch's validation and checkpoint" if last else "this batch"
            print(
                f"bihm train: SIGTERM received: stopping after {after} "
                f"(epoch {trainer.current_epoch}, global step {trainer.global_step})",
                file=sys.stderr,
                flush=True,
            )
        if last:
            # Lightning would skip the epoch's validation (and so its checkpoint).
            self._stop_after_validation = True
        else:
            trainer._signal_connector.received_sigterm = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Read by the fit loop when the epoch ends, after on_train_epoch_end, where the
        # checkpoint callbacks save this epoch.
        if self._stop_after_validation and not trainer.sanity_checking:
            trainer._signal_connector.received_sigterm = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None:  # a resume: last.ckpt exists
            return
        from lightning_utilities.core.apply_func import apply_to_collection

        self._dumping = True
        try:
            # What trainer.save_checkpoint would write now, kept in memory instead.
            start = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        finally:
            self._dumping = False
        # A copy: the state dict's tensors are the live parameters.
        self._start = apply_to_collection(
            start, torch.Tensor, lambda t: t.detach().to("cpu", copy=True)
        )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if not self._dumping:  # an epoch's checkpoint: the run has its own resume point now
            self._start = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and self._start is not None:
            # Written by global rank 0 only (the strategy's rule), atomically (our IO).
            trainer.strategy.save_checkpoint(self._start, str(self.path))
            self._start = None


def resume_epoch(checkpoint: str | os.PathLike) -> int:
    """The epoch that `--resume` from `checkpoint` starts with: the number of epochs it has
    trained (the fit loop's processed epochs, which the data module's shuffle reads too)."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return int(payload["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])


def resolve_accelerator(name: str) -> str:
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name == "gpu" and not torch.cuda.is_available():
        raise TrainingError("train.accelerator is 'gpu' but no CUDA device is available")
    return name


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX512-BF16 or AMX)."""
    mkldnn = torch.backends.mkldnn
    return bool(mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def set_cpu_threads(cfg: Config, accelerator: str, devices: int) -> int:
    """torch threads per process: train.cpu_threads, else the cores shared by the processes
    (training then adapts between this and 1, see pipeline/cpu_threads.py). Returns it."""
    if accelerator != "cpu":
        return torch.get_num_threads()
    threads = cfg.train.cpu_threads or max(1, (os.cpu_count() or 1) // max(1, devices))
    torch.set_num_threads(threads)
    return threads


def build_strategy(accelerator: str, devices: int, num_nodes: int):
    """DDP (gloo on CPU, nccl on GPU) for more than one process, else Lightning's default."""
    if devices * num_nodes <= 1:
        return "auto"
    return DDPStrategy(
        process_group_backend="nccl" if accelerator == "gpu" else "gloo",
        # Rank 0 alone draws the sample pictures (minutes on a CPU): don't time out meanwhile.
        timeout=timedelta(hours=3),
    )


def build_callbacks(cfg: Config, run_dir: Path) -> list[Callback]:
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best-epoch{epoch:04d}",
            auto_insert_metric_name=False,
            monitor=monitor_metric(cfg),
            mode="max",
            save_top_k=1,
        ),
        # last.ckpt, every epoch: --resume continues from the newest epoch. Not save_last on
        # the callback above: Lightning 2.6 writes that one only in epochs that improve the
        # monitored metric. Second, so that trainer.checkpoint_callback is the best one.
        # At the train epoch's end (after its validation, if any), also when validation
        # runs every n-th epoch: Lightning would then save at validation ends only, and a
        # stopped run would redo up to n epochs.
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="last",
            save_top_k=1,
            enable_version_counter=False,
            save_on_train_epoch_end=True,
        ),
        # Before MetricsCSV, so that an epoch's val_time_s includes its sample pictures.
        SamplesCallback(run_dir, cfg),
        MetricsCSV(run_dir),
    ]
    if cfg.train.early_stopping_patience is not None:
        callbacks.append(
            ConfiguredEarlyStopping(
                patience_epochs=cfg.train.early_stopping_patience,
                every_n_epochs=cfg.validation.every_n_epochs,
                monitor=monitor_metric(cfg),
                mode="max",
                check_on_train_epoch_end=False,
                verbose=True,
            )
        )
    if cfg.train.max_time_s is not None:
        # interval="epoch": stop only after an epoch's validation and checkpoint, never
        # mid-epoch (a partial epoch would put a half-trained row in metrics.csv).
        callbacks.append(Timer(timedelta(seconds=cfg.train.max_time_s), interval="epoch"))
    if cfg.logging.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    return callbacks


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(run_dir: Path, create: bool = False) -> str | None:
    """The wandb run id kept in the run folder, so that every resume (and every Ray restart)
    continues the same wandb run instead of starting a new one. `create` (rank 0 or the
    Ray driver, before any worker starts) makes one when the folder has none yet."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip() or None
    if not create:
        return None
    import secrets
    import string

    # wandb's own id format: 8 lowercase letters and digits.
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    atomic_write_text(path, run_id + "\n")
    return run_id


def build_logger(cfg: Config, run_dir: Path):
    mode = cfg.logging.wandb
    if mode == "off":
        return False
    from pytorch_lightning.loggers import WandbLogger

    # Only rank 0 creates the wandb run (Lightning's rank_zero_experiment), and it logs the
    # module's epoch metrics, which are already reduced over all ranks. No API key is passed
    # here: wandb reads WANDB_API_KEY or ~/.netrc itself, and never writes it to the run.
    return WandbLogger(
        project=cfg.logging.wandb_project,
        group=cfg.logging.wandb_group,
        name=cfg.name,
        id=wandb_run_id(run_dir),
        resume="allow",
        save_dir=str(run_dir),
        offline=(mode == "offline"),
        config=cfg.to_dict(),
        log_model=False,
    )


class WandbMedia(Callback):
    """Rank 0 adds the run folder's pictures to the wandb run: each sample picture when it
    is drawn, curves.png at the same epochs and when fit ends."""

    def __init__(self, run_dir: str | os.PathLike, cfg: Config) -> None:
        self.run_dir = Path(run_dir)
        self.every = cfg.samples.every_n_epochs

    def _log(self, trainer: pl.Trainer, key: str, path: Path) -> None:
        if path.is_file():
            trainer.logger.log_image(key, [str(path)], step=trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (
            self.every <= 0
            or trainer.sanity_checking
            or trainer.state.fn != "fit"
            or not trainer.is_global_zero
            or (epoch + 1) % self.every != 0
        ):
            return
        self._log(trainer, "samples", self.run_dir / "samples" / f"epoch_{epoch:04d}.png")
        self._log(trainer, "curves", self.run_dir / "curves.png")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._log(trainer, "curves", self.run_dir / "curves.png")


def build_trainer(
    cfg: Config,
    run_dir: Path,
    *,
    devices: int | None = None,
    num_nodes: int | None = None,
    extra_callbacks: list[Callback] | tuple = (),
    max_epochs: int | None = None,
    logger: Any = None,
    accelerator: str | None = None,
    strategy: Any = None,
    plugins: list | tuple = (),
) -> pl.Trainer:
    """The Trainer of `bihm train`. A launcher that places the processes itself (Ray Train)
    passes its `strategy` and cluster-environment `plugins`; each process then has one device
    and sets its own torch threads."""
    accelerator = accelerator or resolve_accelerator(cfg.train.accelerator)
    threads = 1
    if strategy is None:
        devices = devices or cfg.train.devices
        num_nodes = num_nodes or cfg.train.num_nodes
        threads = set_cpu_threads(cfg, accelerator, devices)
        strategy = build_strategy(accelerator, devices, num_nodes)
    else:
        devices, num_nodes = "auto", 1
    callbacks = build_callbacks(cfg, run_dir) + [
        Preemption(run_dir),
        Compile(cfg.train.compile, cfg.train.cuda_graphs),
    ]
    callbacks += list(extra_callbacks)
    if accelerator == "cpu" and cfg.train.cpu_threads is None and threads > 1:
        callbacks.append(CPUThreadGovernor(threads))
    logger = build_logger(cfg, run_dir) if logger is None else logger
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        if hasattr(logger, "log_image"):
            callbacks.append(WandbMedia(run_dir, cfg))
    if cfg.train.precision == "bf16-mixed" and accelerator == "cpu" and not cpu_has_bf16():
        rank_zero_warn(
            "train.precision bf16-mixed: this CPU has no native bf16 matmuls (AVX512-BF16 "
            "or AMX); they are emulated and run many times slower than fp32"
        )
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=cfg.train.precision,
        max_epochs=max_epochs or cfg.train.max_epochs,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(run_dir),
        enable_progress_bar=cfg.logging.progress_bar,
        enable_model_summary=is_rank_zero(),
        num_sanity_val_steps=0,
        check_val_every_n_epoch=cfg.validation.every_n_epochs,
        log_every_n_steps=cfg.train.log_every_n_steps,
        # The data module shards every split itself (exactly-once validation).
        use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO(), *plugins],
    )


def fit(trainer: pl.Trainer, module: pl.LightningModule, datamodule, ckpt_path: str | None):
    """trainer.fit, then close rank 0's wandb run (not at process exit: a Ray worker outlives
    its training function, and a second run in the same process would reuse the first run).

    Raises TrainingInterrupted when SIGTERM stopped the run (Lightning ends it with
    SIGTERMException, a SystemExit whose status would be 0, as if the run had finished).
    """
    try:
        # The checkpoint holds tensors and plain types only: load it with weights_only=True.
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException as err:
        finish_wandb(EXIT_INTERRUPTED, preempted=True)
        raise TrainingInterrupted(trainer.default_root_dir, trainer.global_rank) from err
    except BaseException:
        finish_wandb(1)
        raise
    finish_wandb(0)


def release_process_group(barrier: bool = True) -> None:
    """Close the DDP process group that Lightning's launcher opened, once its work is done.

    Lightning leaves the group open. At interpreter exit, gloo's threads are then destroyed
    while still joinable and C++ aborts ("terminate called without an active exception"),
    at random, after all the results were written. A barrier first, so no rank closes the
    group while another still reduces over it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def finish_wandb(exit_code: int, preempted: bool = False) -> None:
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        if preempted:  # shown as "preempted" in wandb, not "crashed"
            wandb.mark_preempting()
        wandb.finish(exit_code=exit_code)


def run_training(
    cfg: Config,
    *,
    devices: int | None = None,
    num_nodes: int | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    extra_callbacks: list[Callback] | tuple = (),
) -> dict[str, Any]:
    """Train `cfg` into its run folder; returns {"run_dir", "best", "best_path", "monitor",
    "epochs", "global_rank"} ("best" is the best value of the monitored metric)."""
    if run_dir is not None:
        cfg.run_dir = str(run_dir)
    run_dir = cfg.resolved_run_dir()
    # Every rank checks (cheap, read-only), so a used folder stops all of them at once.
    ckpt_path = check_run_dir(cfg, resume)
    if is_rank_zero():
        start_run_dir(cfg)

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = BiHMModule(cfg.to_dict())
    datamodule = make_datamodule(cfg)
    trainer = build_trainer(
        cfg, run_dir, devices=devices, num_nodes=num_nodes, extra_callbacks=extra_callbacks
    )
    try:
        fit(trainer, module, datamodule, ckpt_path)
    except TrainingInterrupted:
        # No barrier: a stopping run waits for nothing (the ranks stopped at one batch).
        release_process_group(barrier=False)
        raise
    release_process_group()
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_score if ckpt_cb is not None else None
    return {
        "run_dir": str(run_dir),
        "best": float(best) if best is not None else None,
        "best_path": ckpt_cb.best_model_path if ckpt_cb is not None else None,
        "monitor": monitor_metric(cfg),
        "epochs": trainer.current_epoch,
        "global_rank": trainer.global_rank,
    }


def check_run_dir(cfg: Config, resume: bool) -> str | None:
    """Start-up check of the run folder: the checkpoint to resume from, None for a new run.

    Raises TrainingError when there is nothing to resume or the folder already holds a run,
    and a UserError when the folder cannot be written (a probe file, created and removed:
    see `bihm.atomic.check_writable`), before any data or model is touched.
    """
    from bihm.atomic import check_writable

    run_dir = cfg.resolved_run_dir()
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume:
        if not last.is_file():
            raise TrainingError(f"--resume: no checkpoint to resume from at {last}")
    elif last.is_file():
        raise TrainingError(
            f"{run_dir} already holds a run ({last}); {resume_hint()} to continue it, "
            f"or choose another --run-dir / name"
        )
    check_writable(run_dir, "run folder", folder=True, source="--run-dir, or run_dir in the config")
    return str(last) if resume else None


def resume_hint() -> str:
    """'pass --resume'; for `bihm train` run by `make train` (make sets MAKELEVEL in its
    recipes' environment) the make form, with the run's other arguments kept:
    `make train ARGS='--config smoke --resume'`."""
    import shlex

    argv = sys.argv
    if os.environ.get("MAKELEVEL") and Path(argv[0]).name == "bihm" and argv[1:2] == ["train"]:
        args = [a for a in argv[2:] if a != "--resume"] + ["--resume"]
        return f"run `make train ARGS={shlex.quote(' '.join(args))}`"
    return "pass --resume"


def start_run_dir(cfg: Config) -> Path:
    """Create the run folder with config.yaml and, if wandb logs, the run's wandb id.

    Called once per job before training: by rank 0, or by the Ray driver.
    """
    run_dir = cfg.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if cfg.logging.wandb != "off":
        wandb_run_id(run_dir, create=True)
    return run_dir


def config_for_resume(run_dir: Path) -> Config:
    """The resolved config a run folder was started with."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise TrainingError(f"--resume: {path} not found (is {run_dir} a run folder?)")
    return config_from_dict(yaml.safe_load(path.read_text()))
