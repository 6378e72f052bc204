"""`bihm tune`: Ray Tune sweeps over the hyper-parameters of `bihm train`.

A sweep file (YAML) names a base training config and a search space over its dotted keys:

    name: sweep_smoke            # default: the file's stem; outputs go to runs/<name>/
    base: smoke.yaml             # relative to the sweep file, or a config in configs/
    set: {data.train_limit: 1000}          # fixed overrides for every trial
    search:                                # Ray Tune domains over any config key
      optim.lr: {loguniform: [1.0e-3, 1.0e-2]}
      train.K: {choice: [5, 10]}
      model.layers: {choice: [[784, 32, 16], [784, 64, 16]]}
      set: {grid: [{}, {optim.l2: 1.0e-4, optim.lr: 3.0e-3}]}   # bundles ("recipes")
    search_alg: random           # grid and random sampling; or optuna (TPE, no grid)
    metric: val/log_ptilde_star  # reported every epoch; mode max
    num_samples: 4               # with optuna: the number of trials (the budget)
    max_epochs: 3
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or {type: none}
    resources: {cpu: 1, gpu: 0}            # per trial (per worker with --workers-per-trial)
    max_concurrent_trials: 2

The whole sweep is checked before Ray starts: every search value (each choice, both bounds)
is applied to the base config and validated by `pipeline.config`, so a bad key or value is a
one-line `ConfigError` naming it. By default each trial runs `pipeline.train.run_training`,
the code of `bihm train`, as a single worker in the trial's process, with a Lightning
callback that reports the epoch's metrics and `last.ckpt` to Tune after every validation (so
ASHA can stop it, and an interrupted sweep resumes from it). With `--workers-per-trial N`
each trial is instead a Ray Train run of N workers, the code of `bihm train --launcher ray`
(see `run_ray_trial`). A trial that raises is recorded as failed and the sweep goes on.

`search_alg: optuna` samples with Optuna's TPE (`ray.tune.search.optuna.OptunaSearch`, the
optional extra `pip install -e ".[tune]"`): each trial's values are chosen from the results
of the trials before it. Optuna's categories are plain values, so a choice of lists or of
bundles is searched as the choice of their JSON texts, decoded in the trial.

Sweep folder `runs/<name>/`:
    results.csv        one row per trial: status, searched values, epochs trained, final/best metric
    best.yaml          the best trial's full config, ready for `bihm train --config`
    trials.png         the metric against the epoch for every trial
    trials/<id>/       each trial's run folder (config.yaml, metrics.csv, checkpoints/, ...)
    tune/              Ray Tune's experiment state (what `--resume` restores)
    sweep.json         what `--resume` needs besides: trial count, --set, workers per trial

`bihm tune --config SWEEP --collect DIR` runs nothing: it rewrites DIR's results.csv,
trials.png and best.yaml from the run folders DIR/trials/* (`records_from_runs`), with the
epochs of trials continued after the sweep by `bihm train --resume`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pytorch_lightning.callbacks import Callback

from pipeline.config import (
    CONFIG_DIR,
    ConfigError,
    _from_dict,
    apply_overrides,
    atomic_write_text,
    config_from_dict,
)

EXPERIMENT_DIR = "tune"
TRIALS_DIR = "trials"
# The per-epoch metrics of `BiHMModule.epoch_metrics` that exist every epoch.
METRICS = (
    "val/log_ptilde_star",
    "val/log_p",
    "val/log_pstar",
    "val/two_log_z",
    "train/loss",
    "train/log_p",
    "train/log_ptilde_star",
    "train/ess",
)
DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")
# Keys each trial sets itself.
RESERVED_KEYS = ("name", "run_dir")
# The search key whose values are bundles of settings, searched as one: e.g. a grid over
# recipes that differ in several keys at once, which a product of per-key grids cannot say.
BUNDLE_KEY = "set"
# Reported with every epoch: the epochs a trial has trained, ASHA's time. Not Tune's
# training_iteration, which counts reports: when a worker of a multi-worker trial fails, Ray
# Train can restart the run past an epoch whose report it lost, or before one it has.
EPOCHS_DONE = "epochs_done"
OPTUNA_EXTRA = 'pip install -e ".[tune]"'
LAST_CKPT = "last.ckpt"
"""The file of a Tune checkpoint: the trial's checkpoint of the reported epoch."""


class SweepInterrupted(RuntimeError):
    """The sweep stopped before all trials ended (Ctrl+C); `--resume` continues it."""


# --------------------------------------------------------------------------- sweep file
@dataclass
class SchedulerSpec:
    type: Literal["asha", "none"] = "asha"
    grace_period: int = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA: a trial continues past a rung only if it is in the best 1/reduction_factor."""


@dataclass
class ResourcesSpec:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass
class SweepSpec:
    base: str = ""
    name: str | None = None
    run_dir: str | None = None
    search_alg: Literal["random", "optuna"] = "random"
    """random: Ray Tune's grid and random sampling; optuna: Optuna's TPE (extra `tune`)."""
    metric: str = "val/log_ptilde_star"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 1
    """Samples of the search space; a grid is repeated num_samples times (Ray Tune). With
    optuna: the number of trials."""
    max_epochs: int | None = None
    """Epochs per trial (ASHA's max_t); null = the base config's train.max_epochs."""
    max_concurrent_trials: int | None = None
    seed: int | None = 0
    """Seeds the random search: the same trials on every run of the sweep file."""
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)


def _is_plain(value: Any) -> bool:
    """A value Optuna takes as a category: None, bool, int, float or str."""
    return value is None or isinstance(value, bool | int | float | str)


@dataclass(frozen=True)
class Param:
    """One searched config key and its Ray Tune domain."""

    key: str
    kind: str
    values: tuple

    def as_json(self, search_alg: str) -> bool:
        """Whether Tune sees this choice as the JSON texts of its values: Optuna's
        categories are plain values, and a list or a bundle (dict) is none."""
        return (
            search_alg == "optuna"
            and self.kind == "choice"
            and not all(_is_plain(v) for v in self.values)
        )

    def domain(self, search_alg: str = "random") -> Any:
        from ray import tune

        if self.kind == "choice":
            if self.as_json(search_alg):
                return tune.choice([json.dumps(v) for v in self.values])
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        return getattr(tune, self.kind)(*self.values)

    def representatives(self) -> list[Any]:
        """The values that bound what the domain can give: each option, or both ends."""
        if self.kind == "randint":  # the upper bound is exclusive
            return [self.values[0], self.values[1] - 1]
        return list(self.values)


@dataclass
class Sweep:
    """A validated sweep: the spec, the search space and the base config (set applied)."""

    path: Path
    name: str
    spec: SweepSpec
    params: list[Param]
    base: dict[str, Any]
    """The base config with `set` (and the CLI's --set) applied, validated."""
    overrides: list[str] = field(default_factory=list)
    """The CLI's --set."""

    @property
    def sweep_dir(self) -> Path:
        return Path(self.spec.run_dir) if self.spec.run_dir else Path("runs") / self.name

    def num_trials(self, num_samples: int) -> int:
        """Trials of the sweep: each sample runs every point of the grid (Ray Tune)."""
        return num_samples * math.prod(len(p.values) for p in self.params if p.kind == "grid")

    @property
    def max_epochs(self) -> int:
        return self.spec.max_epochs or config_from_dict(self.base).train.max_epochs

    def param_space(self) -> dict[str, Any]:
        """Tune's search space: a domain per searched key."""
        return {p.key: p.domain(self.spec.search_alg) for p in self.params}

    @property
    def json_keys(self) -> tuple[str, ...]:
        """The searched keys whose values Tune holds as JSON text (see Param.as_json)."""
        return tuple(p.key for p in self.params if p.as_json(self.spec.search_alg))


def decode_params(params: dict[str, Any], json_keys: tuple[str, ...] | list[str]) -> dict:
    """A trial's searched values as config values: JSON texts decoded, numpy scalars as
    Python numbers."""
    return {
        k: json.loads(v) if k in json_keys and isinstance(v, str) else _plain(v)
        for k, v in params.items()
    }


def _override(key: str, value: Any) -> str:
    # JSON is YAML: `apply_overrides` reads the value back as it was (lists included).
    return f"{key}={json.dumps(_plain(value))}"


def _plain(value: Any) -> Any:
    """Numpy scalars (Tune's samples) as Python numbers."""
    return value.item() if hasattr(value, "item") else value


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base config dict with each `dotted.key: value` set; the search key `set` holds a
    whole bundle of them (a recipe: {optim.l2: 1.0e-4, data.binarization: dynamic})."""
    pairs: list[tuple[str, Any]] = []
    for key, value in params.items():
        pairs += list(value.items()) if key == BUNDLE_KEY else [(key, value)]
    return apply_overrides(base, [_override(k, v) for k, v in pairs])


def _resolve_base(sweep_path: Path, base: str) -> Path:
    if not base:
        raise ConfigError(f"{sweep_path}: sweep key 'base': name the base training config")
    candidates = [sweep_path.parent / base, CONFIG_DIR / base, CONFIG_DIR / f"{base}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(
        f"{sweep_path}: sweep key 'base': {base!r} is neither a file next to the sweep file "
        f"nor a config in configs/"
    )


def _parse_param(where: str, key: Any, spec: Any) -> Param:
    what = f"{where}: search key {key!r}"
    if not isinstance(key, str) or not key or not all(key.split(".")):
        raise ConfigError(f"{what}: must be a dotted config key like optim.lr")
    if key in RESERVED_KEYS:
        raise ConfigError(f"{what}: set by the sweep for each trial, cannot be searched")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ConfigError(
            f"{what}: must be one of {{{'|'.join(DOMAINS)}: ...}}, e.g. "
            f"{{choice: [5, 10]}} or {{loguniform: [1.0e-4, 1.0e-2]}}; got {spec!r}"
        )
    ((kind, values),) = spec.items()
    if kind in ("choice", "grid"):
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{what}: {kind} needs a non-empty list of values, got {values!r}")
        if key == BUNDLE_KEY and not all(
            isinstance(v, dict) and all(isinstance(k, str) and k for k in v) for v in values
        ):
            raise ConfigError(
                f"{what}: each value must map dotted config keys to values, e.g. "
                f"[{{}}, {{optim.l2: 1.0e-4}}]; got {values!r}"
            )
        return Param(key, kind, tuple(values))
    if key == BUNDLE_KEY:
        raise ConfigError(f"{what}: bundles of settings are searched with choice or grid")
    # YAML 1.1 reads 1e-3 (no dot) as a string: accept numbers written either way.
    try:
        if not isinstance(values, list) or len(values) != 2:
            raise ValueError
        low, high = (float(v) if isinstance(v, str) else v for v in values)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
            raise ValueError
    except ValueError:
        raise ConfigError(f"{what}: {kind} needs [low, high], got {values!r}") from None
    if kind == "randint":
        if not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{what}: randint bounds must be integers, got {values!r}")
        low, high = int(low), int(high)
    if not all(math.isfinite(v) for v in (low, high)) or not low < high:
        raise ConfigError(f"{what}: {kind} needs finite bounds low < high, got {values!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{what}: loguniform bounds must be > 0, got {values!r}")
    return Param(key, kind, (low, high))


def load_sweep(path: str | os.PathLike, overrides: list[str] = ()) -> Sweep:
    """Read and check a sweep file; every search value is validated against the base config.

    `overrides` are `key=value` strings applied to the base config (the CLI's --set).
    Raises ConfigError with a one-line message naming the file and key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path}: must be a mapping of keys to values")
    data = dict(data)
    fixed = data.pop("set", None) or {}
    search = data.pop("search", None) or {}
    try:
        # The training config's strict parser, on the sweep's own schema.
        spec: SweepSpec = _from_dict(SweepSpec, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {str(err).replace('config key', 'sweep key', 1)}") from None
    if spec.metric not in METRICS:
        raise ConfigError(
            f"{path}: sweep key 'metric': must be one of {', '.join(METRICS)}; got {spec.metric!r}"
        )
    for key in ("num_samples", "max_epochs", "max_concurrent_trials"):
        value = getattr(spec, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{path}: sweep key {key!r}: must be > 0, got {value!r}")
    s = spec.scheduler
    if s.grace_period <= 0 or s.reduction_factor <= 1:
        raise ConfigError(
            f"{path}: sweep key 'scheduler': needs grace_period > 0 and reduction_factor > 1"
        )
    if spec.resources.cpu <= 0 or spec.resources.gpu < 0:
        raise ConfigError(f"{path}: sweep key 'resources': needs cpu > 0 and gpu >= 0")
    name = spec.name or path.stem
    if not name or "/" in name:
        raise ConfigError(f"{path}: sweep key 'name': must be a name without '/', got {name!r}")
    if not isinstance(fixed, dict) or not isinstance(search, dict):
        raise ConfigError(f"{path}: 'set' and 'search' must map dotted config keys to values")

    base_path = _resolve_base(path, spec.base)
    try:
        base = yaml.safe_load(base_path.read_text()) or {}
        base = apply_overrides(base, [_override(k, v) for k, v in fixed.items()])
        base = config_from_dict(apply_overrides(base, list(overrides))).to_dict()
    except (ConfigError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: base config {base_path} with 'set': {err}") from None

    params = [_parse_param(str(path), key, value) for key, value in search.items()]
    for p in params:
        if p.key in fixed:
            raise ConfigError(f"{path}: search key {p.key!r} is also in 'set'")
        if p.key == "train.max_epochs" and spec.max_epochs is not None:
            raise ConfigError(f"{path}: search key 'train.max_epochs': the sweep sets max_epochs")
        for value in p.representatives():
            try:
                config_from_dict(apply_params(base, {p.key: value}))
            except ConfigError as err:
                raise ConfigError(f"{path}: search key {p.key!r} value {value!r}: {err}") from None
    if spec.search_alg == "optuna":
        check_optuna(path, params)
    sweep = Sweep(path, name, spec, params, base, list(overrides))
    if s.type == "asha" and s.grace_period > sweep.max_epochs:
        raise ConfigError(
            f"{path}: sweep key 'scheduler.grace_period': {s.grace_period} is more than "
            f"the {sweep.max_epochs} epochs of a trial"
        )
    return sweep


def check_optuna(path: Path, params: list[Param]) -> None:
    """`search_alg: optuna` needs the extra `tune` and a space without grids."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{path}: sweep key 'search_alg': optuna is not installed; install the extra "
            f"`tune` ({OPTUNA_EXTRA})"
        ) from None
    if not params:
        raise ConfigError(f"{path}: sweep key 'search_alg': optuna needs a 'search' space")
    for p in params:
        if p.kind == "grid":
            raise ConfigError(
                f"{path}: search key {p.key!r}: grid is for search_alg random; optuna "
                f"samples, use {{choice: [...]}}"
            )


# --------------------------------------------------------------------------- one trial
class TuneReportCallback(Callback):
    """Reports each epoch's metrics, with `last.ckpt` as a Tune checkpoint, to Ray Tune.

    Lightning writes last.ckpt in the checkpoint callbacks' `on_train_epoch_end`, which
    runs after every other callback's: the epoch is reported at the start of the next
    epoch (`final: False`) or at the end of training (`final: True`), once the checkpoint
    of that epoch is on disk. Tune may stop the trial (ASHA) inside `report`.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.last = Path(run_dir) / "checkpoints" / LAST_CKPT
        self.pending: dict[str, float] | None = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = dict(getattr(pl_module, "epoch_metrics", {}))
        if metrics.get("epoch") == trainer.current_epoch:
            self.pending = metrics

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._report(final=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._report(final=True)

    def _report(self, final: bool) -> None:
        if self.pending is None:
            return
        metrics, self.pending = {**self.pending, "final": final}, None
        metrics[EPOCHS_DONE] = int(metrics["epoch"]) + 1
        report_with_checkpoint(metrics, self.last, self.last.parent)


def report_with_checkpoint(
    metrics: dict[str, Any], ckpt: Path, tmp_parent: Path, missing_ok: bool = False
) -> None:
    """tune.report with the checkpoint file `ckpt` as the Tune checkpoint (its LAST_CKPT).

    A hard link (the checkpoints are replaced by rename, never rewritten in place), made in
    a temporary folder under `tmp_parent`, on the same file system; Tune copies it into
    the trial's folder before `report` returns. missing_ok: without the file (gone since),
    report the metrics alone.
    """
    from ray import tune

    tmp_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_parent) as tmp:
        try:
            try:
                os.link(ckpt, Path(tmp) / LAST_CKPT)
            except FileNotFoundError:
                raise
            except OSError:
                shutil.copy2(ckpt, Path(tmp) / LAST_CKPT)
        except FileNotFoundError:
            if not missing_ok:
                raise
            tune.report(metrics)
            return
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def restore_trial_dir(run_dir: Path, checkpoint: Any) -> bool:
    """A trial that Tune (re)starts: with a Tune checkpoint (`Tuner.restore`), its file
    becomes the run folder's last.ckpt and the trial resumes from it (returns True);
    without one, the trial starts in a fresh run folder (returns False)."""
    last = run_dir / "checkpoints" / LAST_CKPT
    if checkpoint is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        return False
    with checkpoint.as_directory() as src:
        last.parent.mkdir(parents=True, exist_ok=True)
        tmp = last.with_name(f".{last.name}.restore")
        shutil.copyfile(Path(src) / LAST_CKPT, tmp)
        os.replace(tmp, last)
    return True


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a sweep shares (pickled into the trial processes)."""

    sweep_name: str
    base: dict[str, Any]
    sweep_dir: str
    """Absolute: trials run in other processes and working directories."""
    cwd: str
    """The driver's working directory, against which relative data paths are resolved."""
    max_epochs: int
    cpu_threads: int
    verbose: bool = True
    """False: the trial hides the known noise of the libraries, as `bihm` does by default."""
    json_keys: tuple[str, ...] = ()
    """Searched keys whose values Tune holds as JSON text (Param.as_json)."""


def trial_config(settings: TrialSettings, params: dict[str, Any], trial_id: str) -> dict:
    """A trial's full config: base + sampled values + the trial's own run folder."""
    data = apply_params(settings.base, decode_params(params, settings.json_keys))
    data["name"] = f"{settings.sweep_name}-{trial_id}"
    data["run_dir"] = str(Path(settings.sweep_dir) / TRIALS_DIR / trial_id)
    data["data"]["shard_dir"] = str(Path(settings.cwd) / data["data"]["shard_dir"])
    if data["data"].get("grey_shard_dir"):
        data["data"]["grey_shard_dir"] = str(Path(settings.cwd) / data["data"]["grey_shard_dir"])
    data["train"]["max_epochs"] = settings.max_epochs
    if data["train"].get("cpu_threads") is None:
        data["train"]["cpu_threads"] = settings.cpu_threads
    data["logging"]["progress_bar"] = False
    return data


def run_trial(params: dict[str, Any], settings: TrialSettings) -> None:
    """One trial, single worker: `bihm train`'s `run_training` with Tune reporting.

    Restored by `Tuner.restore`, it continues from the Tune checkpoint (its last.ckpt);
    restarted without one, it starts its run folder afresh.
    """
    from ray import tune

    from pipeline import quiet
    from pipeline.train import run_training

    quiet.install(verbose=settings.verbose)
    trial_id = tune.get_context().get_trial_id()
    cfg = config_from_dict(trial_config(settings, params, trial_id))
    run_dir = cfg.resolved_run_dir()
    resume = restore_trial_dir(run_dir, tune.get_checkpoint())
    run_training(
        cfg,
        devices=1,
        num_nodes=1,
        resume=resume,
        extra_callbacks=[TuneReportCallback(run_dir)],
    )


# --------------------------------------------------------------------------- multi-worker
@dataclass(frozen=True)
class TrialScaling:
    """`--workers-per-trial`: each trial a Ray Train run of `workers` workers, each with
    `cpus_per_worker` CPUs and `gpus_per_worker` GPUs, restarted from its last checkpoint
    at most `max_failures` times when a worker fails."""

    workers: int
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "cpus_per_worker": self.cpus_per_worker,
            "gpus_per_worker": self.gpus_per_worker,
            "max_failures": self.max_failures,
        }


# What a trial's driver process (the Tune trial, which only starts the Ray Train run and
# waits for it) reserves: no CPU, so that the workers can have every CPU of the cluster,
# but Ray needs a resource to place it by, and its memory is that of a Python process that
# has imported torch and Ray.
TRIAL_DRIVER_MEMORY = 512 * 2**20
STOP_FILE = "stop-requested"
"""In a multi-worker trial's run folder while Tune stops the trial (see StopOnTuneStop)."""
STOP_CHECK_EVERY = 10
"""Training steps between the workers' checks for STOP_FILE (each one an all-reduce)."""
STOP_TIMEOUT_S = 540.0
"""How long a stopped trial waits for its workers to end, below Tune's forced cleanup
(TUNE_FORCE_TRIAL_CLEANUP_S, 600 s)."""


def trial_scaling(
    sweep: Sweep,
    workers: int | None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    max_failures: int | None = None,
) -> TrialScaling | None:
    """The trials' scaling from the CLI flags; per-worker resources default to the sweep's
    `resources`. None: one-worker trials. One-line errors name the flag."""
    if workers is None:
        given = [
            flag
            for flag, value in (
                ("--cpus-per-worker", cpus_per_worker),
                ("--gpus-per-worker", gpus_per_worker),
                ("--max-failures", max_failures),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(f"{given[0]} needs --workers-per-trial")
        return None
    scaling = TrialScaling(
        workers=workers,
        cpus_per_worker=sweep.spec.resources.cpu if cpus_per_worker is None else cpus_per_worker,
        gpus_per_worker=sweep.spec.resources.gpu if gpus_per_worker is None else gpus_per_worker,
        max_failures=2 if max_failures is None else max_failures,
    )
    if scaling.workers < 1:
        raise ConfigError(f"--workers-per-trial must be >= 1, got {scaling.workers}")
    if not scaling.cpus_per_worker > 0 or scaling.gpus_per_worker < 0:
        raise ConfigError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
    if scaling.max_failures < -1:
        raise ConfigError(f"--max-failures must be >= -1, got {scaling.max_failures}")
    accelerator = config_from_dict(sweep.base).train.accelerator
    if scaling.gpus_per_worker and accelerator == "cpu":
        raise ConfigError(
            f"--gpus-per-worker {scaling.gpus_per_worker:g} (or resources.gpu) but the base "
            f"config's train.accelerator is cpu; --set train.accelerator=gpu"
        )
    if not scaling.gpus_per_worker and accelerator == "gpu":
        raise ConfigError("train.accelerator is gpu: give each worker one (--gpus-per-worker)")
    return scaling


class TrialWorkerCallback(Callback):
    """On every worker of a multi-worker trial.

    At each epoch's end it logs `final` (1 when training ends after this epoch: its last
    epoch, early stopping or the time limit), which Ray's report callback, after it, sends
    with the epoch's metrics. Every STOP_CHECK_EVERY steps, and before validation, the ranks
    agree (all-reduce) whether STOP_FILE exists; if it does, all of them raise StopRequested
    at the same point and the Ray Train run ends (see StopOnTuneStop).
    """

    def __init__(self, stop_file: str | os.PathLike) -> None:
        self.stop_file = str(stop_file)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx % STOP_CHECK_EVERY == 0:
            self._check(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        # Validation (2 log Z, Gibbs inpainting) can take long; every rank starts it.
        if trainer.state.fn == "fit":
            self._check(trainer)

    def _check(self, trainer) -> None:
        stop = trainer.strategy.reduce_boolean_decision(os.path.exists(self.stop_file), all=False)
        if stop:
            from pipeline.ray_launcher import StopRequested

            raise StopRequested(f"Ray Tune stopped the trial (epoch {trainer.current_epoch})")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        final = trainer.should_stop or trainer.current_epoch + 1 >= trainer.max_epochs
        # Not for the loggers (wandb): for the report to Tune only. The same on every rank.
        pl_module.log("final", float(final), logger=False, sync_dist=True, reduce_fx="max")


def validated_this_epoch(metrics: dict[str, Any]) -> bool:
    """Whether a Ray Train report (one at every epoch's end, its "epoch" the epoch just
    trained) carries that epoch's validation: between validations (validation.every_n_epochs
    > 1) it repeats the last one's metrics, under "val/epoch" of that older epoch."""
    return "val/epoch" in metrics and metrics["val/epoch"] == metrics.get("epoch")


def tune_result(metrics: dict[str, Any]) -> dict[str, Any]:
    """What Tune gets from a Ray Train report of rank 0: every metric of METRICS (NaN when
    Lightning logged none, i.e. a non-finite value: Tune fails a trial whose result lacks
    the sweep's metric), the epochs done, and `final` as a bool."""
    out = {key: math.nan for key in METRICS}
    out.update(metrics)
    out[EPOCHS_DONE] = int(out["epoch"]) + 1
    out["final"] = bool(out.get("final", False))
    return out


def forward_reports_callback(reports: Any) -> Any:
    """A Ray Train callback that puts each report of the run, (rank 0's metrics, the
    checkpoint's folder), on the queue `reports`, which the Tune trial reads.

    It runs in the Ray Train controller, after the report was saved. Made here (not at the
    top of the module) so that importing this module does not import Ray.
    """
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        def __init__(self, reports: Any) -> None:
            self.reports = reports

        def after_report(self, run_context, metrics, checkpoint) -> None:
            self.reports.put((metrics[0], checkpoint.path if checkpoint else None))

    return ForwardReports(reports)


@dataclass
class _RunningTrial:
    stop_file: Path
    done: threading.Event
    """Set when the trial's Ray Train run ended."""
    stopping: bool = False
    """Tune stops the trial: it takes no more reports."""


# The multi-worker trials running in this process (one, in a Tune trial's actor).
_RUNNING: dict[str, _RunningTrial] = {}


class StopOnTuneStop:
    """Mixed into the Tune trainable of a multi-worker trial (`__mixins__`).

    Tune stops a trial (ASHA, the end of a sweep) by calling `stop()` and then ending the
    trial's actor, which would kill the Ray Train run it started with its workers: rank 0's
    wandb run unfinished, and the run's placement group kept (Ray's cleaner of it needs the
    dashboard), so the next trials wait for CPUs that nobody uses. Here `stop()` first asks
    the workers to stop (STOP_FILE, see TrialWorkerCallback) and waits for the run to end.
    """

    def cleanup(self) -> None:
        running = _RUNNING.get(self.trial_id)
        if running is not None and not running.done.is_set():
            from bihm.atomic import atomic_write_text

            running.stopping = True
            atomic_write_text(running.stop_file, "stopped by Ray Tune\n")
            running.done.wait(STOP_TIMEOUT_S)
        super().cleanup()


def run_ray_trial(
    params: dict[str, Any],
    settings: TrialSettings,
    scaling: TrialScaling,
    extra_callbacks: list[Callback] | tuple = (),
) -> None:
    """One multi-worker trial: a Ray Train run of `bihm train --launcher ray`'s workers,
    started from the Tune trial (Ray's pattern for tuning Ray Train runs).

    The run trains in a thread of this process; this one reports each epoch of rank 0 to
    Tune, in order, with the epoch's Ray checkpoint as the Tune checkpoint, so that a trial
    is checkpointed, resumed and stopped as a one-worker trial is: restored by
    `Tuner.restore`, it continues from the Tune checkpoint (a Ray Train run that got further
    before the sweep was interrupted is dropped: Tune has seen none of its later epochs);
    restarted without one, it starts afresh. A worker that fails is Ray Train's to restart
    (`scaling.max_failures`), within the same run.
    """
    from ray import tune
    from ray.train.lightning import RayTrainReportCallback
    from ray.util.queue import Empty, Queue

    from pipeline import quiet
    from pipeline.ray_launcher import RAY_STORAGE, fit_on_ray
    from pipeline.train import start_run_dir

    quiet.install(verbose=settings.verbose)
    trial_id = tune.get_context().get_trial_id()
    cfg = config_from_dict(trial_config(settings, params, trial_id))
    run_dir = cfg.resolved_run_dir()
    if restore_trial_dir(run_dir, tune.get_checkpoint()):
        shutil.rmtree(run_dir / RAY_STORAGE, ignore_errors=True)
        (run_dir / STOP_FILE).unlink(missing_ok=True)
    start_run_dir(cfg)  # config.yaml and the wandb run id (a resumed trial keeps its own)
    running = _RUNNING[trial_id] = _RunningTrial(run_dir / STOP_FILE, threading.Event())
    reports = Queue(actor_options={"num_cpus": 0})
    errors: list[BaseException] = []

    def train() -> None:
        try:
            fit_on_ray(
                cfg,
                run_dir=run_dir,
                shard_dir=Path(cfg.data.shard_dir),
                workers=scaling.workers,
                cpus_per_worker=scaling.cpus_per_worker,
                gpus_per_worker=scaling.gpus_per_worker,
                max_failures=scaling.max_failures,
                extra_callbacks=[TrialWorkerCallback(running.stop_file), *extra_callbacks],
                run_callbacks=[forward_reports_callback(reports)],
            )
        except BaseException as err:
            errors.append(err)
        finally:
            running.done.set()

    thread = threading.Thread(target=train, name=f"ray-train-{trial_id}", daemon=True)
    thread.start()
    try:
        while not running.stopping:
            # Every report is queued before the run ends: once `done`, an empty queue is
            # the end.
            finished = running.done.is_set()
            try:
                metrics, folder = reports.get(timeout=0.5)
            except Empty:
                if finished:
                    break
                continue
            if not validated_this_epoch(metrics):
                continue  # an old validation's metrics: Tune would take them for this epoch's
            if folder is None:
                tune.report(tune_result(metrics))
                continue
            # missing_ok: Ray Train keeps only its 2 newest checkpoints.
            ckpt = Path(folder) / RayTrainReportCallback.CHECKPOINT_NAME
            report_with_checkpoint(tune_result(metrics), ckpt, run_dir / "checkpoints", True)
    finally:
        running.done.wait(STOP_TIMEOUT_S)
        _RUNNING.pop(trial_id, None)
    if running.stopping:
        # Tune stopped the trial and ends its session: end as its own report would
        # (Tune's runner takes SystemExit(0) for a trial that was told to stop).
        raise SystemExit(0)
    if errors:
        raise errors[0]


def build_trainable(
    sweep: Sweep,
    cwd: str | os.PathLike | None = None,
    scaling: TrialScaling | None = None,
    extra_callbacks: list[Callback] | tuple = (),
) -> Any:
    """The trainable Tune runs for each trial, with its resources: `run_trial` in the
    trial's process, or with `scaling` a Ray Train run (`run_ray_trial`). extra_callbacks
    go to every worker of a multi-worker trial (tests inject failures so)."""
    from ray import tune

    from pipeline import quiet

    cpu, gpu = sweep.spec.resources.cpu, sweep.spec.resources.gpu
    settings = TrialSettings(
        sweep_name=sweep.name,
        base=sweep.base,
        sweep_dir=str(sweep.sweep_dir.resolve()),
        cwd=str(Path(cwd or os.getcwd()).resolve()),
        max_epochs=sweep.max_epochs,
        cpu_threads=max(1, int(cpu if scaling is None else scaling.cpus_per_worker)),
        verbose=quiet.is_verbose(),
        json_keys=sweep.json_keys,
    )
    if scaling is None:

        def bihm_trial(params: dict[str, Any]) -> None:
            run_trial(params, settings)

        return tune.with_resources(bihm_trial, {"cpu": cpu, "gpu": gpu})

    callbacks = list(extra_callbacks)

    def bihm_ray_trial(params: dict[str, Any]) -> None:
        run_ray_trial(params, settings, scaling, callbacks)

    bihm_ray_trial.__mixins__ = (StopOnTuneStop,)
    # The workers' resources are Ray Train's to reserve, when the run starts.
    return tune.with_resources(bihm_ray_trial, {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})


def trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial: its id, as for its run folder trials/<id>/."""
    return trial.trial_id


# --------------------------------------------------------------------------- results
@dataclass
class TrialRecord:
    trial_id: str
    status: str
    """completed | stopped (by the scheduler) | failed | unfinished (interrupted)."""
    params: dict[str, Any]
    epochs: list[int]
    values: list[float]
    """The metric at each reported epoch."""
    error: str = ""

    @property
    def epochs_trained(self) -> int:
        """Epochs trained through the last report: its epoch + 1. Not the count of reports,
        which is smaller when validation runs every n-th epoch only."""
        return self.epochs[-1] + 1 if self.epochs else 0

    def best(self, mode: str) -> tuple[float, int] | None:
        """(best metric, its epoch) over the reported epochs; None without a finite value."""
        pairs = [(v, e) for v, e in zip(self.values, self.epochs, strict=True) if math.isfinite(v)]
        if not pairs:
            return None
        sign = 1 if mode == "max" else -1
        return max(pairs, key=lambda p: sign * p[0])


def best_record(records: list[TrialRecord], mode: str) -> TrialRecord | None:
    """The trial with the best metric at any epoch, among those that did not fail (a
    config that diverged later is no config to train)."""
    scored = [(r.best(mode), r) for r in records if r.status != "failed"]
    scored = [(b[0], r) for b, r in scored if b is not None]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda s: sign * s[0])[1]


def _csv_value(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, list | dict) else value


def write_results(
    sweep_dir: Path, records: list[TrialRecord], keys: list[str], metric: str, mode: str
) -> None:
    """results.csv, one row per trial."""
    header = ["trial_id", "status", *keys, "epochs", f"final_{metric}", f"best_{metric}"]
    header += ["best_epoch", "run_dir", "error"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in records:
        best = r.best(mode)
        final = r.values[-1] if r.values else None
        writer.writerow(
            [r.trial_id, r.status]
            + [_csv_value(r.params.get(k, "")) for k in keys]
            + [r.epochs_trained, "" if final is None else repr(final)]
            + (["", ""] if best is None else [repr(best[0]), best[1]])
            + [f"{TRIALS_DIR}/{r.trial_id}", r.error]
        )
    atomic_write_text(sweep_dir / "results.csv", buf.getvalue())


def best_config(sweep: Sweep, record: TrialRecord) -> dict[str, Any]:
    """The base config with the best trial's values: what `bihm train` should run next."""
    data = config_from_dict(apply_params(sweep.base, record.params)).to_dict()
    data["name"] = f"{sweep.name}_best"
    data["run_dir"] = None
    return data


def write_best(sweep: Sweep, record: TrialRecord) -> Path:
    value, epoch = record.best(sweep.spec.mode)
    path = sweep.sweep_dir / "best.yaml"
    header = (
        f"# Best trial of sweep {sweep.name}: {record.trial_id}, {sweep.spec.metric} = "
        f"{value:.4f} at epoch {epoch} (run folder {TRIALS_DIR}/{record.trial_id}).\n"
        f"# Searched: {json.dumps(record.params)}\n"
        f"# Train it: bihm train --config {path}\n"
    )
    body = yaml.safe_dump(best_config(sweep, record), sort_keys=False)
    atomic_write_text(path, header + body)
    return path


def write_outputs(sweep: Sweep, records: list[TrialRecord]) -> TrialRecord | None:
    """results.csv, trials.png and (when a trial reported the metric) best.yaml."""
    from pipeline.plots import save_trial_curves

    spec = sweep.spec
    keys = [p.key for p in sweep.params]
    write_results(sweep.sweep_dir, records, keys, spec.metric, spec.mode)
    best = best_record(records, spec.mode)
    curves = [
        (f"{r.trial_id} ({r.status}) {json.dumps(r.params)}", r.epochs, r.values) for r in records
    ]
    save_trial_curves(
        sweep.sweep_dir / "trials.png",
        curves,
        metric=spec.metric,
        best=None if best is None else curves[records.index(best)][0],
        title=f"sweep {sweep.name}",
    )
    if best is not None:
        write_best(sweep, best)
    return best


def _dotted(data: dict[str, Any], key: str) -> Any:
    """The value at `a.b.c` of a nested config dict; KeyError where a level is missing."""
    for part in key.split("."):
        data = data[part]
    return data


def _validated(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict as `pipeline.config` reads it: types checked, values normalised."""
    return config_from_dict(data).to_dict()


def _option_settings(sweep: Sweep) -> dict[str, tuple[list[str], list[tuple[Any, list]]]]:
    """For each grid or choice search key: the config keys that any of its options sets, and
    each option with the values the validated config holds there. Made once per sweep."""
    out = {}
    for p in sweep.params:
        if p.kind not in ("grid", "choice"):
            continue
        options = [v if p.key == BUNDLE_KEY else {p.key: v} for v in p.values]
        keys = sorted({k for option in options for k in option})
        held = [
            (v, [_dotted(_validated(apply_params(sweep.base, option)), k) for k in keys])
            for v, option in zip(p.values, options, strict=True)
        ]
        out[p.key] = (keys, held)
    return out


def _trial_params(
    sweep: Sweep,
    settings: dict[str, tuple[list[str], list[tuple[Any, list]]]],
    config: dict[str, Any],
    where: Path,
) -> dict[str, Any]:
    """The searched values a trial ran with, read back from its config.yaml: a continuous or
    plain key's value as it is; for a bundle or choice, the option whose settings the config
    holds on every key that any option of that param sets (`_option_settings`: so the empty
    recipe {} of a grid is told apart from the ones that add a key)."""
    params: dict[str, Any] = {}
    for p in sweep.params:
        if p.key not in settings:
            params[p.key] = _dotted(config, p.key)
            continue
        keys, options = settings[p.key]
        held = [_dotted(config, k) for k in keys]
        match = [v for v, values in options if values == held]
        if len(match) != 1:
            raise ConfigError(
                f"{where}: its config matches {len(match)} of the values of search key "
                f"{p.key!r}, not one: is it a trial of {sweep.path}?"
            )
        params[p.key] = match[0]
    return params


def records_from_runs(sweep: Sweep, sweep_dir: Path) -> list[TrialRecord]:
    """A TrialRecord per run folder under `sweep_dir`/trials/ (config.yaml and metrics.csv),
    read from the folders themselves rather than from Tune's state: so that a trial continued
    after the sweep with `bihm train --resume` counts with all its epochs, and a study whose
    trials ran as plain `bihm train` runs of the sweep's configs can be summarised as a sweep.
    A trial is `completed` once it has trained the sweep's epochs, else `unfinished`."""
    from pipeline.compare import read_metric

    trials = sweep_dir / TRIALS_DIR
    runs = (
        sorted(d for d in trials.iterdir() if (d / "metrics.csv").is_file())
        if trials.is_dir()
        else []
    )
    if not runs:
        raise ConfigError(f"{trials}: no trial folders (with a metrics.csv) to collect")
    settings = _option_settings(sweep)
    records = []
    for run in runs:
        config_path = run / "config.yaml"
        try:
            config = _validated(yaml.safe_load(config_path.read_text()))
        except (OSError, yaml.YAMLError, ConfigError) as err:
            raise ConfigError(f"{config_path}: cannot read the trial's config ({err})") from None
        params = _trial_params(sweep, settings, config, config_path)
        # A resumed run may redo the epoch its checkpoint was written in: the later row counts.
        by_epoch = dict(zip(*read_metric(run, sweep.spec.metric), strict=True))
        epochs = sorted(by_epoch)
        # Its last epoch, not its count: a run validated every n-th epoch has a row for each.
        status = "completed" if epochs and epochs[-1] + 1 >= sweep.max_epochs else "unfinished"
        records.append(TrialRecord(run.name, status, params, epochs, [by_epoch[e] for e in epochs]))
    return records


def _error_line(trial: Any) -> str:
    """The last line of the trial's error (the exception and its message)."""
    error = trial.get_pickled_error() or trial.get_error()
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


def collect_records(experiment_path: Path, sweep: Sweep) -> list[TrialRecord]:
    """A TrialRecord per trial from Tune's experiment state and reported results."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_path))
    records = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        df = analysis.trial_dataframes.get(trial.trial_id)
        rows: dict[int, dict[str, Any]] = {}
        if df is not None and not df.empty and "epoch" in df:
            for row in df.to_dict("records"):  # a resumed trial may repeat an epoch
                rows[int(row["epoch"])] = row
        epochs = sorted(rows)
        values = [float(rows[e].get(sweep.spec.metric, math.nan)) for e in epochs]
        if trial.status == "ERROR":
            status, error = "failed", _error_line(trial)
        elif trial.status == "TERMINATED":
            final = bool(epochs) and bool(rows[epochs[-1]].get("final"))
            status, error = ("completed" if final else "stopped"), ""
        else:
            status, error = "unfinished", ""
        params = decode_params(
            {p.key: trial.config.get(p.key) for p in sweep.params}, sweep.json_keys
        )
        records.append(TrialRecord(trial.trial_id, status, params, epochs, values, error))
    return records


# --------------------------------------------------------------------------- the sweep
def prepare_data(sweep: Sweep) -> None:
    """Shards for every data folder the trials can use, prepared once, before any trial."""
    from pipeline.train import ensure_shards

    seen = set()
    configs = [sweep.base] + [
        apply_params(sweep.base, {p.key: v})
        for p in sweep.params
        if p.key.startswith("data.")
        for v in p.representatives()
    ]
    for data in configs:
        where = (data["data"]["shard_dir"], data["data"]["dataset"])
        if where not in seen:
            seen.add(where)
            ensure_shards(*where)


def trial_needs(sweep: Sweep, scaling: TrialScaling | None) -> dict[str, float]:
    """The CPUs and GPUs one trial holds: its own, or those of its Ray Train workers."""
    if scaling is None:
        return {"cpu": sweep.spec.resources.cpu, "gpu": sweep.spec.resources.gpu}
    return {
        "cpu": scaling.workers * scaling.cpus_per_worker,
        "gpu": scaling.workers * scaling.gpus_per_worker,
    }


def check_resources(
    sweep: Sweep, cluster: dict[str, float], scaling: TrialScaling | None = None
) -> None:
    """A trial that the cluster cannot hold would wait forever: say so before the sweep
    starts."""
    for key, need in trial_needs(sweep, scaling).items():
        have = cluster.get(key.upper(), 0)
        if need > have:
            if scaling is None:
                what = f"{sweep.path}: sweep key 'resources.{key}': a trial needs {need:g}"
            else:
                what = (
                    f"--workers-per-trial {scaling.workers}: a trial's workers need "
                    f"{need:g} {key.upper()}s"
                )
            raise ConfigError(f"{what} but the Ray cluster has {have:g}")


def concurrent_trials(sweep: Sweep, cluster: dict[str, float], scaling: TrialScaling | None) -> int:
    """At most this many trials at once (0: no limit): max_concurrent_trials, and for
    multi-worker trials no more than the cluster's scarcest resource holds. Tune reserves
    only a multi-worker trial's own process; a trial whose workers do not fit would start
    and wait, its Ray Train run retrying to start them (Ray's advice: limit the trials by
    the scarcest resource)."""
    limit = sweep.spec.max_concurrent_trials or 0
    if scaling is None:
        return limit
    fits = max(
        1,
        min(
            int(cluster.get(key.upper(), 0) // need)
            for key, need in trial_needs(sweep, scaling).items()
            if need > 0
        ),
    )
    return min(limit, fits) if limit else fits


def make_search_alg(sweep: Sweep, max_concurrent: int) -> Any:
    """Ray Tune's variant generator (grid and random), or Optuna's TPE."""
    spec = sweep.spec
    if spec.search_alg == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=spec.seed)  # metric and mode: the TuneConfig's
        return ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune's max_concurrent_trials does not apply to a given generator.
    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=spec.seed)


def start_ray(address: str | None, num_cpus: int | None) -> None:
    """ray.init: `address`, else $RAY_ADDRESS, else a new local Ray, never one that
    someone else started on this machine (as `bihm train --launcher ray`)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=False)


def run_sweep(
    sweep: Sweep,
    *,
    num_samples: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    resume: bool = False,
    scaling: TrialScaling | None = None,
    extra_callbacks: list[Callback] | tuple = (),
) -> dict[str, Any]:
    """Run (or with resume=True continue) the sweep; write the sweep folder's outputs.

    scaling: multi-worker trials (see `trial_scaling`); a resumed sweep keeps those it was
    started with. extra_callbacks go to the workers of multi-worker trials (tests).
    Starts a local Ray instance (or connects to `address`) unless Ray is already
    initialised, and shuts down what it started. Returns {"sweep_dir", "records", "best"};
    raises SweepInterrupted after writing the outputs if the sweep was interrupted.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipeline.train import TrainingError

    spec = sweep.spec
    sweep_dir = sweep.sweep_dir
    experiment = (sweep_dir / EXPERIMENT_DIR).resolve()
    # What `--resume` needs besides Tune's state: the trial count, the --set it ran with
    # and the workers of each trial.
    state_path = sweep_dir / "sweep.json"
    if resume:
        if num_samples is not None:
            raise ConfigError("--num-samples cannot change a sweep that is resumed")
        if not tune.Tuner.can_restore(str(experiment)) or not state_path.is_file():
            raise TrainingError(f"--resume: no sweep to resume at {experiment}")
        state = json.loads(state_path.read_text())
        if state["overrides"] != sweep.overrides:
            raise ConfigError(
                f"--resume: pass the same --set as the sweep was started with: "
                f"{state['overrides'] or 'none'}"
            )
        started_with = state.get("scaling")
        if scaling is not None and scaling.to_dict() != started_with:
            was = "one-worker trials" if started_with is None else json.dumps(started_with)
            raise ConfigError(
                f"--resume: the sweep was started with {was}; resume it without "
                f"--workers-per-trial and the per-worker flags (or with the same)"
            )
        scaling = None if started_with is None else TrialScaling(**started_with)
    elif experiment.exists():
        raise TrainingError(
            f"{sweep_dir} already holds a sweep; pass --resume to continue it, or set "
            f"another name or run_dir in the sweep file"
        )
    else:
        state = {
            "num_samples": num_samples or spec.num_samples,
            "overrides": sweep.overrides,
            "scaling": None if scaling is None else scaling.to_dict(),
        }
        atomic_write_text(state_path, json.dumps(state, indent=1) + "\n")
    prepare_data(sweep)

    started = not ray.is_initialized()
    if started:
        start_ray(address, num_cpus)
    try:
        cluster = ray.cluster_resources()
        check_resources(sweep, cluster, scaling)
        trainable = build_trainable(sweep, scaling=scaling, extra_callbacks=extra_callbacks)
        if resume:
            tuner = tune.Tuner.restore(
                str(experiment), trainable, resume_unfinished=True, resume_errored=False
            )
        else:
            scheduler = None
            if spec.scheduler.type == "asha":
                scheduler = ASHAScheduler(
                    time_attr=EPOCHS_DONE,
                    max_t=sweep.max_epochs,
                    grace_period=spec.scheduler.grace_period,
                    reduction_factor=spec.scheduler.reduction_factor,
                )
            tuner = tune.Tuner(
                trainable,
                param_space=sweep.param_space(),
                tune_config=tune.TuneConfig(
                    metric=spec.metric,
                    mode=spec.mode,
                    search_alg=make_search_alg(sweep, concurrent_trials(sweep, cluster, scaling)),
                    scheduler=scheduler,
                    num_samples=state["num_samples"],
                    trial_dirname_creator=trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT_DIR,
                    storage_path=str(experiment.parent),
                    # A failed trial is recorded and the sweep goes on.
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                ),
            )
        tuner.fit()
    finally:
        if started:
            ray.shutdown()
    records = collect_records(experiment, sweep)
    best = write_outputs(sweep, records)
    # Interrupted (Ctrl+C): Tune returns with trials unfinished or not yet created.
    left = sweep.num_trials(state["num_samples"]) - len(records)
    left += sum(r.status == "unfinished" for r in records)
    if left > 0:
        raise SweepInterrupted(
            f"sweep {sweep.name} interrupted with {left} trial(s) to run; continue it with --resume"
        )
    return {"sweep_dir": str(sweep_dir), "records": records, "best": best}
