"""Writes notebooks/playground.ipynb from the cells below, without outputs.

The notebook is generated so that its git diff stays readable and it never carries outputs or
execution counts (tests/test_notebook.py checks both, and that the committed notebook is what
this script writes). To change the notebook, edit the cells here and run

    python notebooks/build_playground.py

Cell ids are fixed (nbformat 4.5 requires them; random ones would change on every build).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).resolve().with_name("playground.ipynb")

CELLS: list[tuple[str, str]] = []


def md(text: str) -> None:
    CELLS.append(("markdown", text.strip("\n")))


def code(text: str) -> None:
    CELLS.append(("code", text.strip("\n")))


# --------------------------------------------------------------------------- introduction
md(
    r"""
# BiHM playground

A Bidirectional Helmholtz Machine (J. Bornschein, S. Shabanian, A. Fischer, Y. Bengio,
*Bidirectional Helmholtz Machines*, ICML 2016) on binarized MNIST, top to bottom on a laptop
CPU in a few minutes: prepare the data, train a small model with the project's
`BiHMModule` and `BinarizedMNISTDataModule`, look at samples from $p$ and $p^*$, fill in
half-hidden digits, run the likelihood estimators against the number of samples $K$, and load
a checkpoint written by `bihm train`.

**Run it** from the repository root:

```bash
pip install -e ".[notebook]" jupyterlab     # the project, the kernel, and a notebook UI
jupyter lab notebooks/playground.ipynb
```

Without internet, point `BIHM_DATA_SOURCE` at a folder with
`binarized_mnist_{train,valid,test}.amat[.gz]` before starting Jupyter. The symbols are those
of `bihm/model.py` (its docstrings carry the math); equation numbers are the paper's.
"""
)

md(
    r"""
## Parameters

Every setting of the notebook is here. `BIHM_NOTEBOOK_FAST=1` picks a tiny model, a few hundred
images and short Gibbs chains (the test suite runs the notebook that way, in about a minute).
The notebook writes only below `WORK_DIR` and `SHARD_DIR`; both default to folders of the
repository that git ignores (`runs/notebook/`, `data/binarized_mnist/`, the latter shared
with `bihm train`). Weights & Biases logging is off unless `BIHM_NOTEBOOK_WANDB` is `offline`
or `online`.
"""
)

code(
    r"""
import os

FAST = os.environ.get("BIHM_NOTEBOOK_FAST", "0") == "1"
WORK_DIR = os.environ.get("BIHM_NOTEBOOK_DIR")  # None: <repository>/runs/notebook
SHARD_DIR = os.environ.get("BIHM_NOTEBOOK_SHARDS")  # None: <repository>/data/binarized_mnist
CHECKPOINT = os.environ.get("BIHM_NOTEBOOK_CHECKPOINT")  # None: train one with `bihm train`
WANDB = os.environ.get("BIHM_NOTEBOOK_WANDB", "off")  # off | offline | online
SEED = 0
# Small models run fastest on one thread: their matrix products are too small to split, and
# a second thread that has to wait for a busy core slows every step down many times.
CPU_THREADS = 1  # None: torch's default (one per core)

if FAST:
    LAYERS = [784, 32, 8]  # n_0 = 784 pixels, then the latent layers h_1 .. h_L
    TRAIN_IMAGES, VALID_IMAGES, EPOCHS = 300, 100, 2
    VAL_K, VAL_Z_SAMPLES = 10, 200  # validation: K per digit, N of the 2 log Z estimator
    N_SAMPLES, GIBBS_STEPS, PROPOSALS = 8, 3, 20  # chains, sweeps, proposals S per layer
    INPAINT_DIGITS, INPAINT_CHAINS, INPAINT_STEPS = 3, 2, 3
    EVAL_DIGITS, EVAL_KS, Z_SAMPLES = 10, [1, 10, 100], 1_000
    ESS_KS = [10, 100]
    BIHM_TRAIN_SETTINGS = [  # on top of configs/smoke.yaml
        "data.train_limit=300",
        "data.valid_limit=100",
        "train.max_epochs=1",
        "validation.K=10",
        "validation.z_samples=200",
        "validation.gibbs.every_n_epochs=0",
        "samples.n=4",
        "samples.gibbs_steps=2",
        "samples.proposals=20",
        "samples.every_n_epochs=1",
    ]
else:
    LAYERS = [784, 200, 100, 50, 20]
    TRAIN_IMAGES, VALID_IMAGES, EPOCHS = None, 1_000, 5  # None: all 50,000 training images
    VAL_K, VAL_Z_SAMPLES = 100, 10_000
    N_SAMPLES, GIBBS_STEPS, PROPOSALS = 36, 50, 100
    INPAINT_DIGITS, INPAINT_CHAINS, INPAINT_STEPS = 5, 2, 30
    EVAL_DIGITS, EVAL_KS, Z_SAMPLES = 50, [1, 10, 100, 1_000, 10_000], 50_000
    ESS_KS = [10, 100, 1_000]
    BIHM_TRAIN_SETTINGS = []  # configs/smoke.yaml as it is: 5 epochs on 5,000 images

K_TRAIN, LR = 10, 2e-3  # samples h_k ~ q(h | x) per training digit; Adam's learning rate
INNER = 10  # q-samples that estimate p~*(x) in the Gibbs visible-layer update and in Eq. 7 (M)
"""
)

# --------------------------------------------------------------------------- setup
code(
    r"""
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

try:
    import bihm  # noqa: F401
except ModuleNotFoundError:  # not installed: use the checkout this notebook belongs to
    sys.path.insert(0, str(Path.cwd().parent))

import matplotlib.pyplot as plt
import numpy as np
import pytorch_lightning as pl
import torch
from IPython.display import Image, display
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import TQDMProgressBar

from bihm.gibbs import half_mask
from bihm.lightning import BiHMModule
from data_shards import BinarizedMNISTDataModule, load_manifest, prepare
from pipeline.config import CONFIG_DIR, load_config
from pipeline.evaluate import load_checkpoint

ROOT = CONFIG_DIR.parent  # the repository (configs/ lives at its root)
WORK_DIR = Path(WORK_DIR or ROOT / "runs" / "notebook")
SHARD_DIR = Path(SHARD_DIR or ROOT / "data" / "binarized_mnist")
WORK_DIR.mkdir(parents=True, exist_ok=True)
if CPU_THREADS:
    torch.set_num_threads(CPU_THREADS)
pl.seed_everything(SEED, verbose=False)
print(f"repository {ROOT}\nwork folder {WORK_DIR}\nshards {SHARD_DIR}\nFAST = {FAST}")


def tile(x: torch.Tensor, ncols: int) -> np.ndarray:
    # Digits (n, 784) on a grid of ncols columns, one grey pixel between them.
    x = x.detach().float().cpu().reshape(-1, 28, 28)
    nrows = -(-x.shape[0] // ncols)
    grid = torch.full((nrows * ncols, 30, 30), 0.5)
    grid[: x.shape[0], 1:29, 1:29] = x
    return grid.reshape(nrows, ncols, 30, 30).permute(0, 2, 1, 3).reshape(nrows * 30, -1).numpy()


def show(panels: list[tuple[str, np.ndarray]], title: str | None = None, size: float = 4) -> None:
    # Side-by-side grey-scale panels [(title, tile(...))]; ink is black.
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (name, grid) in zip(axes[0], panels, strict=True):
        ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    plt.show()
"""
)

# --------------------------------------------------------------------------- data
md(
    r"""
## Data

`data_shards.prepare` reads the standard binarized MNIST (50,000 train, 10,000 validation,
10,000 test digits), checks it against the published hashes and writes WebDataset shards with a
`manifest.json`. It reads `$BIHM_DATA_SOURCE` when set (offline), else the project's mirror
`../shared/datasets/binarized_mnist` next to the repository when there is one, else it downloads.
A second run finds the manifest up to date and does nothing.
"""
)

code(
    r"""
source = os.environ.get("BIHM_DATA_SOURCE")
mirror = ROOT.parent / "shared" / "datasets" / "binarized_mnist"
if not source and mirror.is_dir():
    source = mirror
prepare(SHARD_DIR, source=source or None)
manifest = load_manifest(SHARD_DIR)
print({split: info["count"] for split, info in manifest["splits"].items()})
"""
)

md(
    r"""
The `BinarizedMNISTDataModule` streams the shards as batches `(x, idx)`: `x` is a float
tensor of 0/1 pixels of shape (B, 784), `idx` the digits' positions in their split. Outside a
Trainer it works as a plain source of batches. The test file is sorted by class, so the
digits used below for evaluation are spread evenly over it.
"""
)

code(
    r"""
def test_digits(n: int) -> torch.Tensor:
    # n test digits spread over the whole test set (its file starts with all the zeros).
    step = manifest["splits"]["test"]["count"] // n
    loader = BinarizedMNISTDataModule(SHARD_DIR, eval_batch_size=1_000).test_dataloader()
    return torch.cat([x[idx % step == 0] for x, idx in loader])[:n]


x_eval = test_digits(EVAL_DIGITS)
x_inpaint = test_digits(INPAINT_DIGITS)
show([("test digits used below", tile(x_eval[:40], 10))], size=5)
"""
)

# --------------------------------------------------------------------------- model
md(
    r"""
## The model

`bihm.BiHM(layer_sizes)` holds two sigmoid belief nets over binary layers
$h_0 = x, h_1, \dots, h_L$ (`bihm/model.py`):

* the top-down generative model $p$: $p(h_L) = \mathrm{Bern}(\sigma(b))$ with a learned bias
  $b$ (`prior_logits`), and $p(h_l \mid h_{l+1}) = \mathrm{Bern}(\sigma(W^p_l h_{l+1} + c^p_l))$
  (`p_nets[l]`);
* the bottom-up model $q$: $q(h_{l+1} \mid h_l) = \mathrm{Bern}(\sigma(W^q_l h_l + c^q_l))$
  (`q_nets[l]`).

The BiHM is their geometric mean (paper Eq. 1-3)
$$p^*(x, h) = \frac{1}{Z}\sqrt{p(x, h)\, q(x)\, q(h \mid x)}, \qquad q(x) = p^*(x),$$
which gives (Eq. 4-5)
$$p^*(x) = \frac{\tilde p^*(x)}{Z^2}, \qquad
\tilde p^*(x) = \Big(\sum_h \sqrt{p(x, h)\, q(h \mid x)}\Big)^2 .$$
Since $Z \le 1$, $\log p^*(x) \ge \log \tilde p^*(x)$, and
$\log \tilde p^*(x) = \log p(x) - 2 D_B\big(p(h \mid x), q(h \mid x)\big)$: maximising
$\log \tilde p^*$ trains $p$ and pulls $q$ towards $p$'s posterior at the same time.

The settings start from `configs/smoke.yaml` with the parameters above, through the project's
config loader (`pipeline.config.load_config`, the same checks as `bihm train --set`).
"""
)

code(
    r"""
def setting(key: str, value) -> str:
    # A `--set KEY=VALUE` override; JSON is valid YAML, and None becomes null.
    return f"{key}={json.dumps(value)}"


cfg = load_config(
    CONFIG_DIR / "smoke.yaml",
    [
        setting("name", "notebook"),
        setting("seed", SEED),
        setting("model.layers", LAYERS),
        setting("data.shard_dir", str(SHARD_DIR)),
        setting("data.train_limit", TRAIN_IMAGES),
        setting("data.valid_limit", VALID_IMAGES),
        setting("train.K", K_TRAIN),
        setting("train.max_epochs", EPOCHS),
        setting("optim.lr", LR),
        setting("validation.K", VAL_K),
        setting("validation.z_samples", VAL_Z_SAMPLES),
        setting("validation.z_chunk", min(VAL_Z_SAMPLES, 1_000)),
        setting("validation.gibbs.every_n_epochs", 0),  # inpainting is done below instead
        setting("logging.wandb", WANDB),
    ],
)
module = BiHMModule(cfg.to_dict())
model = module.model
print(model)
print({section: getattr(cfg, section) for section in ("train", "optim", "validation")})
"""
)

# --------------------------------------------------------------------------- training
md(
    r"""
## Training

Each step follows the paper's Algorithm 1 (`BiHM.loss`): for every digit $x$ draw $K$ samples
$h_k \sim q(h \mid x)$, let $d_k = \log p(x, h_k) - \log q(h_k \mid x)$ and
$\tilde w = \mathrm{softmax}_k(d_k / 2)$ (the normalised weights `w~`); then $p$ ascends
$\sum_k \tilde w_k \nabla \log p(x, h_k)$ and $q$ ascends
$\sum_k (\tilde w_k - 1/K)\, \nabla \log q(h_k \mid x)$, where $-1/K$ is a zero-mean
control variate. Every layer is sampled, so every gradient is local to its layer. The
plotted `loss` is the surrogate whose gradient that is, not a likelihood.

After each epoch `BiHMModule` evaluates the validation digits: $\log p$ and $\log \tilde p^*$
with `validation.K` samples each, $2 \log Z$ by Eq. 7 and $\log p^* = \log \tilde p^* - 2\log Z$.
The callback below redraws the curves as training goes; Lightning draws the progress bars.
"""
)

code(
    r"""
class LiveCurves(pl.Callback):
    # Redraws the training loss (per step) and the validation estimates (per epoch) in place.

    def __init__(self, every_n_steps: int = 25) -> None:
        self.every = every_n_steps
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.epochs: list[dict[str, float]] = []
        self.handle = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append(trainer.global_step)
        self.losses.append(float(loss))
        if trainer.global_step % self.every == 0:
            self.redraw()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and pl_module.epoch_metrics:
            self.epochs.append(dict(pl_module.epoch_metrics))
            self.redraw()

    def figure(self) -> Figure:
        fig = Figure(figsize=(11, 3.6))
        ax_loss, ax_val = fig.subplots(1, 2)
        ax_loss.plot(self.steps, self.losses, lw=0.8)
        ax_loss.set(xlabel="step", ylabel="surrogate loss", title="training loss")
        for key, label in [
            ("val/log_p", "log p"),
            ("val/log_ptilde_star", "log p~*"),
            ("val/log_pstar", "log p* = log p~* - 2 log Z"),
            ("train/log_ptilde_star", f"log p~*, training (K = {K_TRAIN})"),
        ]:
            epochs = [m["epoch"] for m in self.epochs if key in m]
            ax_val.plot(epochs, [m[key] for m in self.epochs if key in m], "o-", label=label)
        ax_val.set(xlabel="epoch", ylabel="nats per digit", title=f"validation (K = {VAL_K})")
        ax_val.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def redraw(self) -> None:
        if self.handle is None:
            self.handle = display(self.figure(), display_id=True)
        else:
            self.handle.update(self.figure())


logger = False
if WANDB != "off":
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(
        project=cfg.logging.wandb_project,
        name=cfg.name,
        save_dir=str(WORK_DIR),
        offline=WANDB == "offline",
        config=cfg.to_dict(),
    )

datamodule = BinarizedMNISTDataModule(
    SHARD_DIR,
    batch_size=cfg.data.batch_size,
    eval_batch_size=cfg.data.eval_batch_size,
    shuffle_buffer=cfg.data.shuffle_buffer,
    seed=cfg.seed,
    train_limit=cfg.data.train_limit,
    valid_limit=cfg.data.valid_limit,
)
live = LiveCurves()
bar = TQDMProgressBar(refresh_rate=20)  # fewer redraws: each one is a notebook output
trainer = pl.Trainer(
    accelerator="cpu",  # "auto" picks a GPU when there is one
    devices=1,
    max_epochs=EPOCHS,
    logger=logger,
    callbacks=[live, bar],
    enable_checkpointing=False,  # the model is saved by hand below
    default_root_dir=str(WORK_DIR),
    num_sanity_val_steps=0,
    log_every_n_steps=10,
    use_distributed_sampler=False,  # the data module shards the data itself
)
start = time.time()
trainer.fit(module, datamodule=datamodule)
print(f"{EPOCHS} epochs in {time.time() - start:.0f} s")
model.eval()
model.save(WORK_DIR / "playground_model.pt")  # BiHM.save: a plain dict of tensors
"""
)

md(
    r"""
### Learning curves

Validation estimates per epoch (the rows `bihm train` writes to `metrics.csv`):
"""
)

code(
    r"""
for m in live.epochs:
    print(
        f"epoch {m['epoch']:.0f}: log p {m['val/log_p']:.2f}, "
        f"log p~* {m['val/log_ptilde_star']:.2f}, 2 log Z {m['val/two_log_z']:.2f}, "
        f"log p* {m['val/log_pstar']:.2f}, training ESS {m.get('train/ess', float('nan')):.2f}"
    )
live.figure()
"""
)

# --------------------------------------------------------------------------- samples
md(
    r"""
## Samples from $p$ and from $p^*$

`model.sample_p(n)` draws $(x, h) \sim p$ top-down (ancestral sampling). Samples from $p^*$ need
Markov chains: `model.sample_pstar` starts from those samples and runs block Gibbs sweeps, first
all odd layers, then all even ones (each layer's conditional involves only its neighbours).
Layer $h_l$ is updated by importance resampling from `proposals` draws of
$p(h_l \mid h_{l+1})$ and as many of $q(h_l \mid h_{l-1})$, plus the current state, with target
$\sqrt{p(h_l \mid h_{l+1})\, p(h_{l-1} \mid h_l)\, q(h_l \mid h_{l-1})\, q(h_{l+1} \mid h_l)}$;
for the visible layer $q(x) = p^*(x)$ is replaced by its estimate $\tilde p^*(x)$ from `inner`
samples of $q$. With enough sweeps $p^*$'s digits are visibly crisper than $p$'s.
"""
)

code(
    r"""
g = torch.Generator().manual_seed(SEED)
x_p = model.sample_p(N_SAMPLES, generator=g)[0]
start = time.time()
x_star = model.sample_pstar(
    N_SAMPLES, steps=GIBBS_STEPS, proposals=PROPOSALS, inner=INNER, generator=g
)[0]
print(f"{N_SAMPLES} chains x {GIBBS_STEPS} sweeps in {time.time() - start:.0f} s")
ncols = int(np.ceil(np.sqrt(N_SAMPLES)))
show(
    [
        ("p: top-down samples", tile(x_p, ncols)),
        (f"p*: {GIBBS_STEPS} Gibbs sweeps, S = {PROPOSALS}", tile(x_star, ncols)),
    ]
)
"""
)

# --------------------------------------------------------------------------- inpainting
md(
    r"""
## Inpainting

A mask $m$ (`bihm.gibbs.half_mask`: 1 = observed pixel) hides one half of each digit.
`model.reconstruct(x, m)` is the plain baseline: $h \sim q(h \mid x)$ with the hidden pixels set
to 0, then the hidden pixels from $p(x \mid h_1)$. `model.inpaint(x, m)` starts there and runs
Gibbs sweeps on $p^*$ with the observed pixels clamped, so the filled-in half has to agree with
the visible one. One row per mask; from left to right the original digits, the masked input
(grey = hidden), the $q$-then-$p$ fill-in, and `INPAINT_CHAINS` Gibbs chains per digit (one
line of digits per chain). The error rate is the fraction of hidden pixels that differ from
the original.
"""
)

code(
    r"""
chains = x_inpaint.repeat(INPAINT_CHAINS, 1)  # chain c of digit i is row c * INPAINT_DIGITS + i
fig, axes = plt.subplots(4, 4, figsize=(14, 4 * (0.9 + 0.45 * INPAINT_CHAINS)))
for row, side in zip(axes, ["bottom", "top", "left", "right"], strict=True):
    mask = half_mask(side).expand_as(chains)
    hidden = 1 - mask
    recon = model.reconstruct(chains, mask, generator=g)
    filled = model.inpaint(
        chains, mask, steps=INPAINT_STEPS, proposals=PROPOSALS, inner=INNER, generator=g
    )
    err_recon = float(((recon != chains) * hidden).sum() / hidden.sum())
    err_gibbs = float(((filled != chains) * hidden).sum() / hidden.sum())
    panels = [
        (f"original ({side} half hidden)", x_inpaint),
        ("masked input", mask[:INPAINT_DIGITS] * x_inpaint + 0.5 * hidden[:INPAINT_DIGITS]),
        (f"q then p: {err_recon:.1%} wrong", recon[:INPAINT_DIGITS]),
        (f"p* Gibbs, {INPAINT_STEPS} sweeps: {err_gibbs:.1%} wrong", filled),
    ]
    for ax, (name, images) in zip(row, panels, strict=True):
        ax.imshow(tile(images, INPAINT_DIGITS), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
fig.tight_layout()
plt.show()
"""
)

# --------------------------------------------------------------------------- estimators
md(
    r"""
## Likelihood estimators against $K$

With $h_k \sim q(h \mid x)$, $k = 1..K$, and $d_k = \log p(x, h_k) - \log q(h_k \mid x)$,
`model.log_likelihood(x, K)` returns per digit
$$\log p(x) \approx \log \frac{1}{K}\sum_k e^{d_k}, \qquad
\log \tilde p^*(x) \approx 2 \log \frac{1}{K}\sum_k e^{d_k / 2}.$$
Both are stochastic lower bounds that tighten as $K$ grows. `model.estimate_log_z2(N, inner=M)`
estimates $Z^2$ with paper Eq. 7: draw $(x, h) \sim p$ and $h'_m \sim q(h \mid x)$, then
$Z^2 = \mathbb{E}\big[\sqrt{q(h \mid x) / p(x, h)}\ \frac{1}{M}\sum_m
\sqrt{p(x, h'_m) / q(h'_m \mid x)}\big]$, returned as $2 \log Z$ with its standard error
(biased low for small $N$). Then $\log p^*(x) = \log \tilde p^*(x) - 2 \log Z$.
The error bars are standard errors across the digits: they say how much digits differ, not
how noisy the trend in $K$ is (the same digits are scored at every $K$).
"""
)

code(
    r"""
def sem(values: torch.Tensor) -> float:
    # Standard error of the mean across digits.
    return float(values.std() / np.sqrt(len(values)))


start = time.time()
two_log_z, z_sem = model.estimate_log_z2(Z_SAMPLES, inner=INNER, generator=g)
rows = []
for K in EVAL_KS:
    log_p, log_pt = model.log_likelihood(x_eval, K, generator=g)
    rows.append((K, float(log_p.mean()), sem(log_p), float(log_pt.mean()), sem(log_pt)))
print(f"{EVAL_DIGITS} test digits; 2 log Z = {two_log_z:.3f} ± {z_sem:.3f} (N = {Z_SAMPLES})")
print(f"{'K':>6} | {'log p':>16} | {'log p~*':>16} | {'log p*':>16}")
for K, lp, lp_sem, lpt, lpt_sem in rows:
    print(
        f"{K:>6} | {lp:9.2f} ± {lp_sem:4.2f} | {lpt:9.2f} ± {lpt_sem:4.2f} | "
        f"{lpt - two_log_z:9.2f} ± {lpt_sem:4.2f}"
    )
print(f"({time.time() - start:.0f} s)")

Ks = [r[0] for r in rows]
fig, ax = plt.subplots(figsize=(6, 4))
ax.errorbar(Ks, [r[1] for r in rows], [r[2] for r in rows], fmt="o-", label="log p", capsize=3)
ax.errorbar(Ks, [r[3] for r in rows], [r[4] for r in rows], fmt="s-", label="log p~*", capsize=3)
ax.plot(Ks, [r[3] - two_log_z for r in rows], "^--", label="log p* = log p~* - 2 log Z")
ax.set(xscale="log", xlabel="K (samples from q per digit)", ylabel="nats per digit")
ax.legend()
plt.show()
"""
)

md(
    r"""
### Effective sample size of the two kinds of weights

`model.ess(x, K)` gives, per digit, $\mathrm{ESS} = (\sum_k w_k)^2 / \sum_k w_k^2 \in [1, K]$
for the $p^*$ weights $w_k = \sqrt{p(x, h_k) / q(h_k \mid x)}$ (`.pstar`) and the $p$ weights
$w_k = p(x, h_k) / q(h_k \mid x)$ (`.p`). $\mathrm{ESS}/K$ near 1 means that $q$ is a good
proposal: every sample counts.
"""
)

code(
    r"""
ess = {K: model.ess(x_eval, K, generator=g) for K in ESS_KS}
for K, e in ess.items():
    print(
        f"K = {K:>5}: ESS/K of the p* weights {float(e.pstar.mean()) / K:6.1%}, "
        f"of the p weights {float(e.p.mean()) / K:6.1%}"
    )
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(ESS_KS, [float(e.pstar.mean()) / K for K, e in ess.items()], "o-", label="p*: sqrt(p/q)")
ax.plot(ESS_KS, [float(e.p.mean()) / K for K, e in ess.items()], "s-", label="p: p/q")
ax.set(xscale="log", yscale="log", xlabel="K", ylabel="ESS / K (mean over digits)")
ax.legend()
plt.show()
middle, last = rows[len(rows) // 2], rows[-1]
print(
    f"from K = {middle[0]} to K = {last[0]}: log p~* rose by {last[3] - middle[3]:.2f} nats, "
    f"log p by {last[1] - middle[1]:.2f} nats"
)
"""
)

md(
    r"""
**The paper's sample-efficiency claim, as seen here.** The posterior of $p^*$,
$p^*(h \mid x) \propto \sqrt{p(x, h)\, q(h \mid x)}$, lies halfway between $q$ and the
posterior of $p$, so $q$ is a much better proposal for it than for $p$'s: the weights
$\sqrt{p/q}$ spread far less than $p/q$, and their ESS is a much larger fraction of $K$.
The $\log \tilde p^*$ estimate is therefore close to converged after tens to hundreds of
samples, while the $\log p$ estimate keeps climbing up to $K = 10^4$ (the README's demo model:
from $K = 100$ to $10^4$, $\log \tilde p^*$ moves 0.5 nats and $\log p$ 2.2). With the `FAST`
settings the model is barely trained and the numbers are only indicative.
"""
)

# --------------------------------------------------------------------------- checkpoint
md(
    r"""
## A checkpoint from `bihm train`

`bihm train --config CONFIG [--set KEY=VALUE ...] --run-dir DIR` writes a run folder:
`config.yaml`, `metrics.csv`, `curves.png`, `samples/`, and Lightning checkpoints
`checkpoints/last.ckpt` and `checkpoints/best-epochNNNN.ckpt` (best validation $\log \tilde p^*$).
The checkpoints hold the config as plain types, so `pipeline.evaluate.load_checkpoint` reads them
with `torch.load(weights_only=True)` and returns a `BiHMModule` and its `Config`; it also accepts
a file written by `BiHM.save`. Set `BIHM_NOTEBOOK_CHECKPOINT` to evaluate a checkpoint of your
own; otherwise the cell below runs `bihm train` on `configs/smoke.yaml` (about a minute; a
second run of the notebook reuses the run folder).
"""
)

code(
    r"""
run_dir = WORK_DIR / "bihm_train"
if CHECKPOINT:
    ckpt = Path(CHECKPOINT)
else:
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        sets = [setting("data.shard_dir", str(SHARD_DIR)), "logging.progress_bar=false"]
        sets += BIHM_TRAIN_SETTINGS
        cmd = ["bihm", "train", "--config", str(CONFIG_DIR / "smoke.yaml"), "--run-dir", run_dir]
        cmd += [arg for s in sets for arg in ("--set", s)]
        print("$", " ".join(map(str, cmd)))
        # `python -m pipeline.cli` is the `bihm` command, from this notebook's checkout.
        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        with subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *map(str, cmd[1:])],
            cwd=WORK_DIR,
            env={**os.environ, "PYTHONPATH": path},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc:
            for line in proc.stdout:
                print(line, end="")
        if proc.returncode != 0:
            raise RuntimeError(f"bihm train failed with exit code {proc.returncode}")
    ckpt = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))[-1]

trained, trained_cfg = load_checkpoint(ckpt)
print(f"\nloaded {ckpt}")
print(f"layers {trained_cfg.model.layers}, objective {trained_cfg.train.objective}")
samples = sorted((ckpt.parent.parent / "samples").glob("epoch_*.png"))
if samples:
    display(Image(filename=str(samples[-1])))  # written by `bihm train` during the run
"""
)

md(
    r"""
Evaluating it uses the same model API as above, and `trainer.validate` recomputes the run's
training-time validation metrics: every digit's samples come from a generator seeded by
(seed, K, digit), so it reproduces the row of `metrics.csv` for the checkpoint's epoch.
"""
)

code(
    r"""
trained_model = trained.model.eval()
K = EVAL_KS[-1]
log_p, log_pt = trained_model.log_likelihood(x_eval, K, generator=g)
tlz, tlz_sem = trained_model.estimate_log_z2(Z_SAMPLES, inner=INNER, generator=g)
print(
    f"{EVAL_DIGITS} test digits, K = {K}: log p {float(log_p.mean()):.2f}, "
    f"log p~* {float(log_pt.mean()):.2f}, 2 log Z {tlz:.3f} ± {tlz_sem:.3f}, "
    f"log p* {float(log_pt.mean()) - tlz:.2f}"
)

valid = BinarizedMNISTDataModule(
    SHARD_DIR,
    eval_batch_size=trained_cfg.data.eval_batch_size,
    valid_limit=trained_cfg.data.valid_limit,
)
validator = pl.Trainer(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    default_root_dir=str(WORK_DIR),
    use_distributed_sampler=False,
)
validator.validate(trained, datamodule=valid)
metrics_csv = ckpt.parent.parent / "metrics.csv"
if metrics_csv.is_file():
    with open(metrics_csv, newline="") as f:
        best = max(csv.DictReader(f), key=lambda row: float(row["val/log_ptilde_star"]))
    print(
        f"val/log_ptilde_star of epoch {best['epoch']} in metrics.csv: "
        f"{float(best['val/log_ptilde_star']):.4f}; "
        f"recomputed now: {trained.epoch_metrics['val/log_ptilde_star']:.4f}"
    )
"""
)

md(
    r"""
## Where next

* `bihm eval --checkpoint CKPT --split test --samples 1,10,100,1000,10000 --z-samples 1000000`
  prints the authors' evaluation table on the whole test set (`--devices N` for several
  processes).
* `bihm train` with the default `configs/bmnist_paper.yaml` trains the paper's 12-layer model
  (hundreds of epochs: use a GPU).
* Weights & Biases: `BIHM_NOTEBOOK_WANDB=offline` (or `online`, after `wandb login`) logs this
  notebook's training; `--set logging.wandb=offline` does the same for `bihm train`.
"""
)


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs, with stable cell ids."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, source) in enumerate(CELLS):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cell = make(source)
        cell.id = f"cell-{i:02d}"
        if kind == "code" and source.startswith("import os\n\nFAST ="):
            cell.metadata["tags"] = ["parameters"]  # papermill's parameters cell
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render() -> str:
    return nbformat.writes(build()) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if NOTEBOOK.read_text() != text:
            print(f"{NOTEBOOK} is not what {Path(__file__).name} writes: run it", file=sys.stderr)
            return 1
        return 0
    sys.path.insert(0, str(NOTEBOOK.parents[1]))  # the repository, for pipeline.config
    from pipeline.config import atomic_write_text

    atomic_write_text(NOTEBOOK, text)
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
