"""Run configuration: YAML files in `configs/`, validated on load, with `--set` overrides.

A config is a tree of dataclasses. Loading is strict: an unknown key, a missing section
of the wrong shape or a bad value raises `ConfigError` naming the dotted key
(e.g. ``optim.lr``). `Config.to_dict()` gives plain Python types (what the checkpoint
stores and what `config.yaml` in the run folder holds), and `config_from_dict` reads it back.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bihm.atomic import atomic_write_text
from bihm.errors import UserError

# The repository's configs/ folder, installed as the package `bihm_configs` (pyproject.toml),
# so `bihm train --config smoke` works after a plain `pip install`, from any folder.
CONFIG_DIR = Path(str(importlib.resources.files("bihm_configs")))
DEFAULT_CONFIG = CONFIG_DIR / "bmnist_paper.yaml"


def packaged_configs() -> list[str]:
    """Names of the packaged configs (`--config NAME`)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("sweep"))


def resolve_config_path(name_or_path: str | os.PathLike | None) -> Path:
    """A YAML file's path; an existing file wins, else a packaged config's name (with or
    without .yaml); None is the default config (bmnist_paper)."""
    if name_or_path is None:
        return DEFAULT_CONFIG
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = CONFIG_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    raise ConfigError(
        f"config file {path} does not exist (packaged configs: {', '.join(packaged_configs())})"
    )


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the offending key."""


# --------------------------------------------------------------------------- schema
@dataclass
class ModelConfig:
    layers: list[int] = field(
        default_factory=lambda: [784, 300, 200, 100, 75, 50, 35, 30, 25, 20, 15, 10, 10]
    )
    """Layer sizes [n_0 = 784 pixels, n_1, ..., n_L]. An entry may also be a mapping
    {size: 784, family: gaussian}; the config is then resolved into sizes and `families`."""
    families: list[Literal["bernoulli", "gaussian"]] | None = None
    """One distribution family per layer, parallel to `layers` (bihm/families.py);
    null: all Bernoulli (the paper's model). A Gaussian visible layer needs real-valued
    data: data.dataset mnist_continuous."""
    gaussian_std: float = 1.0
    """Gaussian layers: the initial (learn_std) or fixed standard deviation of every unit."""
    learn_std: bool = True
    """Gaussian layers: learn a per-unit log standard deviation in each conditional."""
    labels: int = 0
    """Classes of the label node y (10 for MNIST; 0 = no label node). y joins the top
    prior, p(h_L, y), and q(y | h_{L-1}) is a softmax; needs a data set with labels
    (mnist_static, mnist_dynamic, mnist_continuous)."""


@dataclass
class DataConfig:
    shard_dir: str = "data/binarized_mnist"
    """Folder of the sharded data set; prepared automatically when it has no manifest."""
    dataset: Literal["binarized_mnist", "mnist_static", "mnist_dynamic", "mnist_continuous"] = (
        "binarized_mnist"
    )
    """What `data_shards.prepare` writes to shard_dir when it has no manifest.
    mnist_continuous: intensities in [0, 1], uniformly dequantized (for a Gaussian x)."""
    batch_size: int = 100
    """Training minibatch per process (the paper: 100). Under DDP each rank takes its own."""
    eval_batch_size: int = 500
    """Validation and evaluation batch per process; the numbers do not depend on it."""
    num_workers: int = 0
    """DataLoader worker processes per training process. 0 (the default): the loader is
    ~30x faster than a training step, so workers would only compete for the cores."""
    shuffle: Literal["permutation", "buffer"] = "permutation"
    """Training order: a fresh permutation of the whole training set every epoch (as the
    authors' code), or, for data too large to hold, a stream through a shuffle buffer."""
    shuffle_buffer: int = 5000
    """Images held by the shuffle buffer (shuffle: buffer only)."""
    train_limit: int | None = None
    """Use only this many training images, spread evenly over the split; null = all."""
    valid_limit: int | None = None
    """Validate on this many images, spread evenly over the split; null = all 10,000."""
    test_limit: int | None = None
    """Evaluate (bihm eval --split test) on this many images, spread evenly; null = all."""
    binarization: Literal["fixed", "dynamic"] = "fixed"
    """binarized_mnist only. fixed: train on the fixed binarized training images (the
    paper). dynamic: re-draw every training image's pixels from the grey MNIST image it was
    binarized from, a fresh draw each epoch (a function of seed, epoch and image), written
    once to grey_shard_dir. Validation, test and the training subset scored at validation
    stay the fixed binarized images. Trains on more information than the fixed set."""
    grey_shard_dir: str | None = None
    """dynamic binarization: the folder of the grey training images, in the order of the
    fixed set; null = shard_dir + "_grey". Prepared automatically when missing."""


@dataclass
class TrainConfig:
    objective: Literal["bihm", "rws"] = "bihm"
    """bihm: the BiHM objective, weights sqrt(p/q) (paper Alg. 1); rws: reweighted
    wake-sleep, weights p/q."""
    K: int = 10
    """Samples h_k ~ q(h | x) per example in the training objective."""
    max_epochs: int = 10_000
    """Upper bound on the epochs; early stopping usually ends the run first."""
    early_stopping_patience: int | None = 10
    """Epochs without improvement of the validation log p~* (log p for RWS) before
    stopping; null = never. The best checkpoint is chosen by the same metric. Counted in
    validations, ceil(patience / validation.every_n_epochs) of them, and taken from the
    config on --resume (not from the checkpoint); the wait so far carries over in epochs."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """auto: a GPU where torch sees one, else the CPU."""
    devices: int = 1
    """Processes per node (GPUs, or CPU processes with gloo); --devices overrides it."""
    num_nodes: int = 1
    """Nodes of a multi-node DDP job (e.g. under SLURM); --num-nodes overrides it."""
    log_every_n_steps: int = 50
    """Lightning logs the per-step loss every this many steps."""
    cpu_threads: int | None = None
    """torch threads per process on CPU. null: the cores divided by the processes per node,
    and training switches to 1 thread while that is faster (another job on the machine;
    pipeline/cpu_threads.py). Tiny models run fastest with 1 (small products do not
    parallelise); a background run that leaves a core free uses 1."""
    precision: Literal["32-true", "bf16-mixed"] = "32-true"
    """Lightning's precision for training. bf16-mixed runs the training step's matmuls in
    bf16 (a binary x or h is exact in bf16, a Gaussian layer's values and the weights round
    to 8 bits of mantissa)
    with fp32 master weights, logits, log-probabilities and optimizer. Validation and
    evaluation stay fp32. Fast only where bf16 matmuls are native (AVX512-BF16/AMX CPUs,
    GPUs); see the README for the evidence that it trains as well as fp32."""
    compile: Literal["auto", True, False] = "auto"
    """torch.compile for the training step, the estimators and counter-based random
    streams (bihm/compiled.py). auto: on a GPU (where Triton is present), not on a CPU
    (measured 1.1x for a step and a validation batch, nothing for an epoch); true: wherever
    a backend is present (an error names what is missing); false: eager. The two modes
    draw different random numbers, so their estimates differ by Monte Carlo noise. The
    first compilation of the paper model on a machine takes about a minute on a CPU; later
    processes reuse torch's on-disk cache. Also used by `bihm eval` and `bihm sample`."""
    cuda_graphs: bool = True
    """With train.compile on a GPU: run the compiled functions as CUDA graphs (torch.compile's
    mode reduce-overhead), one launch per training step instead of hundreds of tiny kernels.
    false compiles without them (to measure what they buy, or if a driver misbehaves)."""
    labelled_fraction: float = 1.0
    """With a label node: the fraction of training examples whose label is used (the same
    ones every epoch, chosen by index); the others are semi-supervised, y ~ q(y | ...)."""
    max_time_s: float | None = None
    """Stop after the first epoch that ends past this many seconds of training (Lightning's
    Timer, checked at epoch ends so that the run stops on a finished, validated and
    checkpointed epoch). For a time-boxed job: a SLURM wall-time limit, a borrowed GPU.
    null: no limit. The time counts from the start of this fit, resumes included only where
    the checkpoint was written with a limit set."""


@dataclass
class SwitchConfig:
    """The authors' "continue with larger K": from `epoch` on, train with K and lr."""

    epoch: int | None = None
    """The first epoch with the new K, lr or Adam state; null = no switch."""
    K: int | None = None
    """Training K from that epoch on; null = keep train.K."""
    lr: float | None = None
    """Base learning rate from that epoch on; null = keep optim.lr."""
    reset_optimizer: bool = False
    """Start `epoch` with a fresh Adam state (moments and step count), as the authors'
    reload with a new lr and K had; false keeps the state."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Adam's learning rate (the paper: 1e-3), times the schedule's factor."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam's beta1, beta2."""
    eps: float = 1e-8
    """Adam's epsilon."""
    weight_decay: float = 0.0
    """torch.optim.Adam's weight_decay: adds weight_decay * theta to the gradient of EVERY
    parameter, biases and top prior included. Kept for old configs; l2 is the authors'
    weights-only penalty."""
    schedule: Literal["constant", "cosine", "exponential", "step"] = "constant"
    """Learning-rate factor per epoch: constant 1; cosine from 1 to min_factor over
    max_epochs; exponential gamma**epoch; step gamma**(epoch // step_size)."""
    gamma: float = 1.0
    """The lr factor of the exponential and step schedules."""
    step_size: int = 100
    """Epochs per step of the step schedule."""
    min_factor: float = 0.0
    """The lr factor the cosine schedule ends at."""
    l2: float = 0.0
    """Per-example L2 penalty l2 * sum W^2 on the weight matrices W^p_l and W^q_l only (no
    biases, top prior, label node or Gaussian scales), added to the loss, so Adam sees its
    gradient 2 l2 W (coupled, as the authors' cost + L2; not decoupled weight decay). The
    authors' flag v on a cost summed over 100 examples is l2 = v / 100."""
    l1: float = 0.0
    """Per-example L1 penalty l1 * sum |W| on the same weight matrices as l2."""
    switch: SwitchConfig = field(default_factory=SwitchConfig)


@dataclass
class GibbsValidationConfig:
    """Inpainting of the bottom half of `examples` validation images spread over the split."""

    every_n_epochs: int = 10
    """0 = never."""
    examples: int = 100
    """Validation images inpainted, spread over the split."""
    chains: int = 1
    """Gibbs chains per image; the error is averaged over them."""
    steps: int = 20
    """Block Gibbs sweeps per chain."""
    proposals: int = 1000
    """S, the importance-sampling proposals of each layer update (the authors' 1000)."""
    inner: int = 10
    """Inner q-samples per proposal when scoring it."""


@dataclass
class ValidationConfig:
    every_n_epochs: int = 1
    """Validate after every n-th epoch (epochs n-1, 2n-1, ...; Lightning's
    check_val_every_n_epoch): metrics.csv then has a row per validated epoch. Validation
    can cost more than the epoch's training (the paper config on one CPU core: 77 s against
    35 s), so a long study may validate every few epochs. The Gibbs inpainting and sample
    pictures need a cadence that is a multiple of it."""
    K: int = 100
    """Samples h_k ~ q(h | x) per validation image for log p, log p~* and the ESS."""
    z_samples: int = 10_000
    """N, the outer samples of the 2 log Z estimator (paper Eq. 7)."""
    z_inner: int = 10
    """M, the inner q-samples per outer sample."""
    z_chunk: int = 1000
    """2 log Z is computed in fixed chunks of this many outer samples, each seeded by its
    id and shared round-robin between ranks: the estimate does not depend on the ranks."""
    seed: int = 1234
    """Seeds the per-example generators: the same samples every epoch and on any rank count."""
    train_examples: int | None = None
    """Training images (fixed, spread over the split) also scored at every validation with
    the same K and 2 log Z, logged as train_eval/* with the gap/* to validation: null = as
    many as the validation images in use, 0 = none."""
    gibbs: GibbsValidationConfig = field(default_factory=GibbsValidationConfig)


@dataclass
class SamplesConfig:
    every_n_epochs: int = 10
    """0 = never. Rank 0 writes samples/epoch_NNNN.png."""
    n: int = 64
    """Digits per picture."""
    gibbs_steps: int = 250
    """Block Gibbs sweeps from p* per picture (0: p samples only)."""
    proposals: int = 1000
    """S, the proposals of each Gibbs layer update."""
    inner: int = 10
    """Inner q-samples per proposal."""


@dataclass
class LoggingConfig:
    wandb: Literal["off", "offline", "online"] = "off"
    """offline writes the run to wandb/ in the run folder (wandb sync uploads it later);
    online needs WANDB_API_KEY."""
    wandb_project: str = "bihm"
    """The wandb project of the run."""
    wandb_group: str | None = None
    """Groups the wandb runs of related jobs (e.g. a sweep); null = no group."""
    progress_bar: bool = True
    """Lightning's progress bar (and the evaluation's) on the console."""


@dataclass
class Config:
    name: str = "bihm"
    """The run's name: its folder is runs/<name> unless run_dir is set, and wandb shows it."""
    seed: int = 0
    """Seeds the initial weights, the training order and (with the global step) the
    training draws."""
    run_dir: str | None = None
    """Defaults to runs/<name>."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


# --------------------------------------------------------------------------- parsing
def _fail(key: str, msg: str) -> typing.NoReturn:
    raise ConfigError(f"config key {key!r}: {msg}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            _fail(key, "must not be null")
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if value is None:
        _fail(key, "must not be null")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False and "off" in choices:  # YAML 1.1 reads a bare `off` as false
            value = "off"
        if value not in choices:
            _fail(key, f"must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            _fail(key, f"must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                _fail(key, f"must be a number, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(key, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            _fail(key, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")  # a bug in the schema


def _from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    where = prefix or "top level"
    if not isinstance(data, dict):
        _fail(where, f"must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        _fail(key, f"unknown key (allowed here: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def _check_range(cfg: Config) -> None:
    """Value checks that the types cannot express."""

    def positive(key: str, value: int | float | None, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            _fail(key, f"must be > 0, got {value!r}")

    def non_negative(key: str, value: int) -> None:
        if value < 0:
            _fail(key, f"must be >= 0, got {value!r}")

    layers = cfg.model.layers
    if len(layers) < 2:
        _fail("model.layers", f"needs the visible layer and at least one latent layer: {layers}")
    for i, n in enumerate(layers):
        positive(f"model.layers[{i}]", n)
    families = cfg.model.families
    if families is not None and len(families) != len(layers):
        _fail(
            "model.families",
            f"must name one family per layer ({len(layers)} layers), got {len(families)}",
        )
    positive("model.gaussian_std", cfg.model.gaussian_std)
    non_negative("model.labels", cfg.model.labels)
    if cfg.model.labels:
        if cfg.data.dataset == "binarized_mnist":
            _fail("model.labels", "needs a data.dataset with labels (an mnist_* data set)")
        if cfg.validation.gibbs.every_n_epochs or cfg.samples.every_n_epochs:
            _fail(
                "model.labels",
                "Gibbs sampling with a label node is not implemented: set "
                "validation.gibbs.every_n_epochs and samples.every_n_epochs to 0",
            )
    if not 0 <= cfg.train.labelled_fraction <= 1:
        _fail("train.labelled_fraction", f"must be in [0, 1], got {cfg.train.labelled_fraction}")
    visible = "bernoulli" if families is None else families[0]
    if (visible == "gaussian") != (cfg.data.dataset == "mnist_continuous"):
        _fail(
            "model.families",
            f"a {visible} visible layer does not fit data.dataset {cfg.data.dataset} "
            "(a Gaussian x needs mnist_continuous, a Bernoulli x binary data)",
        )
    if cfg.data.binarization == "dynamic" and cfg.data.dataset != "binarized_mnist":
        _fail(
            "data.binarization",
            f"dynamic applies to data.dataset binarized_mnist, not {cfg.data.dataset} "
            "(mnist_dynamic is dynamically binarized throughout)",
        )
    if not cfg.name or "/" in cfg.name:
        _fail("name", f"must be a non-empty name without '/', got {cfg.name!r}")
    d = cfg.data
    for key in ("batch_size", "eval_batch_size", "shuffle_buffer"):
        positive(f"data.{key}", getattr(d, key))
    non_negative("data.num_workers", d.num_workers)
    for key in ("train_limit", "valid_limit", "test_limit"):
        positive(f"data.{key}", getattr(d, key), allow_none=True)
    t = cfg.train
    for key in ("K", "max_epochs", "devices", "num_nodes", "log_every_n_steps"):
        positive(f"train.{key}", getattr(t, key))
    positive("train.early_stopping_patience", t.early_stopping_patience, allow_none=True)
    positive("train.cpu_threads", t.cpu_threads, allow_none=True)
    positive("train.max_time_s", t.max_time_s, allow_none=True)
    o = cfg.optim
    positive("optim.lr", o.lr)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        _fail("optim.betas", f"must be two numbers in [0, 1), got {o.betas}")
    positive("optim.eps", o.eps)
    non_negative("optim.weight_decay", o.weight_decay)
    non_negative("optim.l2", o.l2)
    non_negative("optim.l1", o.l1)
    positive("optim.gamma", o.gamma)
    positive("optim.step_size", o.step_size)
    if not 0 <= o.min_factor <= 1:
        _fail("optim.min_factor", f"must be in [0, 1], got {o.min_factor}")
    s = o.switch
    if s.epoch is None:
        if s.K is not None or s.lr is not None or s.reset_optimizer:
            _fail(
                "optim.switch.epoch",
                "must be set when optim.switch.K, .lr or .reset_optimizer is set",
            )
    else:
        non_negative("optim.switch.epoch", s.epoch)
        if s.K is None and s.lr is None and not s.reset_optimizer:
            _fail(
                "optim.switch",
                "set K, lr and/or reset_optimizer to switch to at optim.switch.epoch",
            )
        positive("optim.switch.K", s.K, allow_none=True)
        positive("optim.switch.lr", s.lr, allow_none=True)
    v = cfg.validation
    for key in ("K", "z_samples", "z_inner", "z_chunk"):
        positive(f"validation.{key}", getattr(v, key))
    non_negative("validation.seed", v.seed)
    if v.train_examples is not None:
        non_negative("validation.train_examples", v.train_examples)
    positive("validation.every_n_epochs", v.every_n_epochs)
    g = v.gibbs
    non_negative("validation.gibbs.every_n_epochs", g.every_n_epochs)
    for key, every in (
        ("validation.gibbs.every_n_epochs", g.every_n_epochs),
        ("samples.every_n_epochs", cfg.samples.every_n_epochs),
    ):
        if every > 0 and every % v.every_n_epochs:
            _fail(
                key,
                f"must be 0 or a multiple of validation.every_n_epochs "
                f"({v.every_n_epochs}): it is drawn at a validation, got {every}",
            )
    for key in ("examples", "chains", "proposals", "inner"):
        positive(f"validation.gibbs.{key}", getattr(g, key))
    non_negative("validation.gibbs.steps", g.steps)
    sm = cfg.samples
    non_negative("samples.every_n_epochs", sm.every_n_epochs)
    for key in ("n", "proposals", "inner"):
        positive(f"samples.{key}", getattr(sm, key))
    non_negative("samples.gibbs_steps", sm.gibbs_steps)
    non_negative("seed", cfg.seed)


# The family names of ModelConfig.families: list[Literal[...]] | None.
_FAMILIES_LIST = typing.get_args(typing.get_type_hints(ModelConfig)["families"])[0]
FAMILIES: tuple[str, ...] = typing.get_args(typing.get_args(_FAMILIES_LIST)[0])


def _layer_entries(data: Any) -> Any:
    """`model.layers` entries written as {size, family} mappings, resolved into the sizes
    and a parallel `model.families` list (Bernoulli where an entry gives no family)."""
    model = data.get("model") if isinstance(data, dict) else None
    layers = model.get("layers") if isinstance(model, dict) else None
    if not isinstance(layers, list) or not any(isinstance(e, dict) for e in layers):
        return data
    if model.get("families") is not None:
        _fail("model.families", "give the families in model.layers entries or here, not both")
    sizes, families = [], []
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict):
            entry = {"size": entry}
        unknown = [k for k in entry if k not in ("size", "family")]
        if unknown:
            _fail(f"model.layers[{i}].{unknown[0]}", "unknown key (allowed here: size, family)")
        if "size" not in entry:
            _fail(f"model.layers[{i}]", f"a layer mapping needs a size, got {entry!r}")
        family = entry.get("family", "bernoulli")
        if family not in FAMILIES:
            _fail(
                f"model.layers[{i}].family",
                f"must be one of {', '.join(FAMILIES)}; got {family!r}",
            )
        sizes.append(entry["size"])
        families.append(family)
    return {**data, "model": {**model, "layers": sizes, "families": families}}


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validate a plain dict (a parsed YAML file or a checkpoint's copy) into a Config."""
    cfg = _from_dict(Config, _layer_entries(data))
    _check_range(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 0.0003); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from err
    return parts, value


def add_override_argument(parser, help_text: str) -> None:
    """The repeatable `--set KEY=VALUE` option of the `bihm` sub-commands."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.path=value` applied (validated later)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(parts[: i + 1])!r} is not a section"
                )
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (a file, or a packaged config's name; default bmnist_paper), apply
    overrides, validate."""
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    try:
        return config_from_dict(apply_overrides(data, list(overrides)))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
