"""The BiHM as a PyTorch Lightning module: model, optimiser, schedules and metrics only.

Launcher concerns (strategy, devices, nodes, cluster environment, loggers, callbacks) live
in `pipeline/train.py`, so this module runs unchanged under a plain Trainer, DDP, Ray Train
or SLURM. It only uses `self.trainer.world_size / global_rank` and the strategy's
collectives (`reduce`, `all_gather`), and only at epoch ends for evaluation metrics.

Exact distributed evaluation
----------------------------
Every per-example estimate draws its samples from a `torch.Generator` seeded by
(seed, purpose, K, global example index), so an example gets the same samples whichever
rank evaluates it. Ranks accumulate float64 sums, sums of squares and counts; these are
summed across ranks at the epoch end, so the reported mean is the exact mean over the
whole split. 2 log Z (paper Eq. 7) is estimated from N outer samples split into fixed
chunks, chunk c seeded by (seed, c) and taken by rank c mod world_size; per-rank
log-sum-exp partial sums of w and w^2 are all-gathered and combined by log-sum-exp, then
`log_mean_and_sem`. One process and many therefore give the same numbers up to float
rounding of the sums.

The module takes one argument, `config`: the plain-dict form of `pipeline.config.Config`
(sections model, train, optim, validation, seed). It is stored as a hyper-parameter of
plain types, so checkpoints load with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import math
import struct
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch import Tensor

from bihm.model import BiHM, log_mean_and_sem

# The val/, train/ and test metrics are reduced exactly by this module (global sums, log-sum-exp)
# and logged with the same value on every rank: Lightning's advice to add sync_dist does not
# apply to them (and averaging would be wrong for 2 log Z).
warnings.filterwarnings(
    "ignore",
    message=r"It is recommended to use `self\.log\('(val|train)/",
    category=PossibleUserWarning,
)

# Purposes mixed into the seeds, so that no two uses share random numbers.
_TRAIN, _LL, _Z, _GIBBS, _RECON, _SAMPLES = range(1, 7)

IMAGE_SHAPE = (28, 28)


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient; the optimiser step was not taken."""


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (stable across processes and runs)."""
    data = struct.pack(f"<{len(parts)}q", *(int(p) for p in parts))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def make_generator(device: torch.device | str, *parts: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(mix_seed(*parts))
    return g


def half_mask(side: str, shape: tuple[int, int] = IMAGE_SHAPE) -> Tensor:
    """A flat 0/1 mask (1 = observed) that hides the `side` half of a row-major image."""
    h, w = shape
    mask = torch.ones(h, w)
    if side == "bottom":
        mask[h // 2 :] = 0
    elif side == "top":
        mask[: h // 2] = 0
    elif side == "left":
        mask[:, : w // 2] = 0
    elif side == "right":
        mask[:, w // 2 :] = 0
    else:
        raise ValueError(f"mask side must be bottom, top, left or right, got {side!r}")
    return mask.reshape(-1)


# --------------------------------------------------------------------------- estimators
@torch.no_grad()
def per_example_log_likelihood(
    model: BiHM, x: Tensor, idx: Tensor, K: int, seed: int
) -> tuple[Tensor, Tensor]:
    """log p(x) and log p~*(x) with K samples, each example with its own seeded generator.

    Returns two float64 tensors of shape (B,). The samples of example i depend only on
    (seed, K, idx[i]), not on the batch, the rank or the number of processes.
    """
    log_p = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    log_pt = torch.empty_like(log_p)
    for i in range(x.shape[0]):
        g = make_generator(x.device, seed, _LL, K, int(idx[i]))
        lp, lpt = model.log_likelihood(x[i], K, generator=g)
        log_p[i], log_pt[i] = lp.double(), lpt.double()
    return log_p, log_pt


@torch.no_grad()
def log_z2_partial(
    model: BiHM,
    n: int,
    inner: int,
    chunk: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> Tensor:
    """This rank's [log sum w, log sum w^2] over its chunks of the N outer Eq. 7 terms.

    Chunk c covers outer samples [c * chunk, min(n, (c + 1) * chunk)), uses a generator
    seeded by (seed, c) and belongs to rank c mod world_size. float64, shape (2,).
    """
    device = model.prior_logits.device
    lse = torch.full((2,), -math.inf, dtype=torch.float64, device=device)
    chunks = range(rank, math.ceil(n / chunk), world_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"2 log Z (N={n}, rank {rank})", leave=False)
    for c in chunks:
        size = min(chunk, n - c * chunk)
        g = make_generator(device, seed, _Z, c)
        terms = model.log_z2_terms(size, inner, generator=g).double()
        part = torch.stack([torch.logsumexp(terms, 0), torch.logsumexp(2 * terms, 0)])
        lse = torch.logaddexp(lse, part)
    return lse


def combine_log_z2(partials: Tensor, n: int) -> tuple[float, float]:
    """2 log Z and its standard error from per-rank partials (world_size, 2) by log-sum-exp."""
    lse = torch.logsumexp(partials.reshape(-1, 2).double(), dim=0)
    return log_mean_and_sem(float(lse[0]), float(lse[1]), n)


def mean_and_sem(total: float, total_sq: float, n: float) -> tuple[float, float]:
    """Mean and standard error of the mean across examples from global sums."""
    if n <= 0:
        return math.nan, math.nan
    mean = total / n
    if n < 2:
        return mean, math.inf
    var = max(total_sq - n * mean * mean, 0.0) / (n - 1)
    return mean, math.sqrt(var / n)


@torch.no_grad()
def inpainting_errors(
    model: BiHM,
    x: Tensor,
    idx: Tensor,
    mask: Tensor,
    *,
    chains: int,
    steps: int,
    proposals: int,
    inner: int,
    seed: int,
) -> Tensor:
    """[masked-pixel errors of Gibbs inpainting, of q-then-p reconstruction, masked pixels].

    Each example runs `chains` chains with generators seeded by (seed, idx): the result
    does not depend on which rank evaluates it. float64, shape (3,).
    """
    out = torch.zeros(3, dtype=torch.float64, device=x.device)
    free = 1 - mask
    for i in range(x.shape[0]):
        xi = x[i].expand(chains, -1)
        mi = mask.expand(chains, -1)
        g = make_generator(x.device, seed, _GIBBS, int(idx[i]))
        filled = model.inpaint(xi, mi, steps=steps, proposals=proposals, inner=inner, generator=g)
        g = make_generator(x.device, seed, _RECON, int(idx[i]))
        recon = model.reconstruct(xi, mi, generator=g)
        out[0] += float(((filled != xi) * free).sum())
        out[1] += float(((recon != xi) * free).sum())
        out[2] += float(free.sum()) * chains
    return out


# --------------------------------------------------------------------------- module
class BiHMModule(pl.LightningModule):
    """Trains a `BiHM` with the BiHM or RWS objective; validates and tests exactly."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = config
        self.model = BiHM(config["model"]["layers"])
        self.seed = int(config.get("seed", 0))
        self.train_cfg = config["train"]
        self.optim_cfg = config["optim"]
        self.val_cfg = config["validation"]
        self.epoch_metrics: dict[str, float] = {}
        # Set by `bihm eval` before `trainer.test`: Ks, z_samples, z_inner, z_chunk, seed.
        self.eval_settings: dict[str, Any] | None = None
        self.eval_result: dict[str, Any] | None = None
        # Set by `bihm validate` to run the Gibbs metrics whatever the epoch.
        self.force_gibbs = False
        self._train_sums: Tensor | None = None
        self._train_sums_epoch = -1
        self._val_sums: Tensor | None = None
        self._test_sums: Tensor | None = None
        self._loss_finite = torch.tensor(True)

    # ------------------------------------------------------------------ schedules
    def _switched(self, epoch: int) -> bool:
        s = self.optim_cfg.get("switch") or {}
        return s.get("epoch") is not None and epoch >= s["epoch"]

    def K_at(self, epoch: int) -> int:
        """Training K at `epoch`: train.K, or optim.switch.K from optim.switch.epoch on."""
        if self._switched(epoch) and self.optim_cfg["switch"].get("K") is not None:
            return int(self.optim_cfg["switch"]["K"])
        return int(self.train_cfg["K"])

    def lr_at(self, epoch: int) -> float:
        """Learning rate at `epoch`: (optim.lr or the switch lr) times the schedule factor.

        A pure function of the epoch, so a resumed run has exactly the schedule of an
        uninterrupted one.
        """
        o = self.optim_cfg
        base = o["lr"]
        if self._switched(epoch) and o["switch"].get("lr") is not None:
            base = o["switch"]["lr"]
        kind = o.get("schedule", "constant")
        if kind == "constant":
            factor = 1.0
        elif kind == "cosine":
            t = min(epoch / max(1, int(self.train_cfg["max_epochs"])), 1.0)
            m = o.get("min_factor", 0.0)
            factor = m + (1 - m) * 0.5 * (1 + math.cos(math.pi * t))
        elif kind == "exponential":
            factor = o["gamma"] ** epoch
        elif kind == "step":
            factor = o["gamma"] ** (epoch // o["step_size"])
        else:
            raise ValueError(f"optim.schedule: unknown schedule {kind!r}")
        return float(base * factor)

    def configure_optimizers(self):
        o = self.optim_cfg
        return torch.optim.Adam(
            self.model.parameters(),
            lr=self.lr_at(0),
            betas=tuple(o["betas"]),
            eps=o["eps"],
            weight_decay=o["weight_decay"],
            # One fused kernel instead of ~5 per parameter tensor: 1.4 ms instead of 4.5 ms
            # per step for the paper model on one CPU core (~10% of a K = 10 step).
            fused=self.device.type in ("cpu", "cuda"),
        )

    # ------------------------------------------------------------------ helpers
    def _zeros(self, n: int) -> Tensor:
        return torch.zeros(n, dtype=torch.float64, device=self.device)

    def _reduce_sum(self, t: Tensor) -> Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return t
        return self.trainer.strategy.reduce(t.clone(), reduce_op="sum")

    def _rank_world(self) -> tuple[int, int]:
        if self._trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _log_z2(self, n: int, inner: int, chunk: int, seed: int, progress: bool) -> tuple:
        rank, world = self._rank_world()
        part = log_z2_partial(self.model, n, inner, chunk, seed, rank, world, progress)
        if world > 1:
            part = self.trainer.strategy.all_gather(part)
        return combine_log_z2(part, n)

    def _log_dict(self, metrics: dict[str, float], prog_bar: tuple[str, ...] = ()) -> None:
        # Values are already global (identical on every rank): no sync_dist needed.
        for key, value in metrics.items():
            if math.isfinite(value):
                self.log(key, value, prog_bar=key in prog_bar, sync_dist=False)

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Set every step (not only at epoch start: Lightning skips the epoch-start hooks
        # when it resumes from a checkpoint written at an epoch end).
        lr = self.lr_at(self.current_epoch)
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        if self._train_sums is None or self._train_sums_epoch != self.current_epoch:
            self._train_sums = self._zeros(5)
            self._train_sums_epoch = self.current_epoch

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, _ = batch
        rank, _ = self._rank_world()
        g = make_generator(self.device, self.seed, _TRAIN, rank, self.global_step)
        out = self.model.loss(
            x, K=self.K_at(self.current_epoch), objective=self.train_cfg["objective"], generator=g
        )
        # No host sync here: the finiteness flag is read once, in on_before_optimizer_step.
        self._loss_finite = torch.isfinite(out.loss.detach())
        B = x.shape[0]
        self._train_sums += torch.stack(
            [out.loss.detach() * B, out.log_p * B, out.log_ptilde_star * B, out.ess * B]
            + [out.loss.new_tensor(float(B))]
        ).double()
        self.log("loss", out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return out.loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop before a non-finite loss or gradient reaches the weights, on every rank.

        Gradients are already all-reduced here, and the per-rank loss flag is summed
        across ranks (the same number of train steps on every rank), so all ranks raise
        together and no checkpoint is written after the bad step.
        """
        finite = [self._loss_finite] + [
            torch.isfinite(p.grad).all() for p in self.parameters() if p.grad is not None
        ]
        bad = (~torch.stack(finite).all()).double().reshape(1)
        if float(self._reduce_sum(bad).sum()) > 0:
            raise NonFiniteLossError(
                f"non-finite loss or gradient at global step {self.global_step} "
                f"(epoch {self.current_epoch}, K={self.K_at(self.current_epoch)}, "
                f"lr={self.lr_at(self.current_epoch):g}); the step was not applied. "
                f"Resume from the last good checkpoint with a lower optim.lr."
            )

    # ------------------------------------------------------------------ validation
    def _gibbs_now(self) -> bool:
        every = int(self.val_cfg["gibbs"]["every_n_epochs"])
        if every <= 0:
            return False
        return self.force_gibbs or (self.current_epoch + 1) % every == 0

    def on_validation_epoch_start(self) -> None:
        # n, sum log p, sum log p^2, sum log p~*, sum log p~*^2, gibbs err, recon err, masked
        self._val_sums = self._zeros(8)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, idx = batch
        v = self.val_cfg
        lp, lpt = per_example_log_likelihood(self.model, x, idx, int(v["K"]), int(v["seed"]))
        self._val_sums[:5] += torch.stack(
            [lp.new_tensor(float(len(lp))), lp.sum(), (lp**2).sum()] + [lpt.sum(), (lpt**2).sum()]
        )
        if self._gibbs_now():
            gv = v["gibbs"]
            keep = idx < int(gv["examples"])
            if bool(keep.any()):
                mask = half_mask("bottom").to(x)
                self._val_sums[5:] += inpainting_errors(
                    self.model,
                    x[keep],
                    idx[keep],
                    mask,
                    chains=int(gv["chains"]),
                    steps=int(gv["steps"]),
                    proposals=int(gv["proposals"]),
                    inner=int(gv["inner"]),
                    seed=int(v["seed"]),
                )

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        v = self.val_cfg
        fitting = (
            self.trainer.state.fn == "fit"
            and self._train_sums is not None
            and self._train_sums_epoch == self.current_epoch
        )
        sums = torch.cat([self._val_sums, self._train_sums if fitting else self._zeros(5)])
        sums = self._reduce_sum(sums).tolist()
        n = sums[0]
        lp, lp_sem = mean_and_sem(sums[1], sums[2], n)
        lpt, lpt_sem = mean_and_sem(sums[3], sums[4], n)
        two_log_z, z_sem = self._log_z2(
            int(v["z_samples"]), int(v["z_inner"]), int(v["z_chunk"]), int(v["seed"]), False
        )
        m = {
            "epoch": float(self.current_epoch),
            "val/n": n,
            "val/log_p": lp,
            "val/log_p_sem": lp_sem,
            "val/log_ptilde_star": lpt,
            "val/log_ptilde_star_sem": lpt_sem,
            "val/two_log_z": two_log_z,
            "val/two_log_z_sem": z_sem,
            "val/log_pstar": lpt - two_log_z,
        }
        if sums[7] > 0:
            m["val/gibbs_error"] = sums[5] / sums[7]
            m["val/recon_error"] = sums[6] / sums[7]
        if fitting and sums[12] > 0:
            t = sums[8:]
            m.update(
                {
                    "train/loss": t[0] / t[4],
                    "train/log_p": t[1] / t[4],
                    "train/log_ptilde_star": t[2] / t[4],
                    "train/ess": t[3] / t[4],
                    "train/K": float(self.K_at(self.current_epoch)),
                    "train/lr": self.lr_at(self.current_epoch),
                }
            )
        self.epoch_metrics = m
        self._log_dict(
            {k: val for k, val in m.items() if k != "epoch"}, prog_bar=("val/log_ptilde_star",)
        )

    # ------------------------------------------------------------------ test (bihm eval)
    def _eval_Ks(self) -> list[int]:
        if self.eval_settings is None:
            raise RuntimeError("set module.eval_settings (Ks, z_samples, ...) before testing")
        return [int(k) for k in self.eval_settings["Ks"]]

    def on_test_epoch_start(self) -> None:
        # per K: sum log p, sum log p^2, sum log p~*, sum log p~*^2; then n
        self._test_sums = self._zeros(4 * len(self._eval_Ks()) + 1)

    def test_step(self, batch, batch_idx: int) -> None:
        x, idx = batch
        seed = int(self.eval_settings["seed"])
        for j, K in enumerate(self._eval_Ks()):
            lp, lpt = per_example_log_likelihood(self.model, x, idx, K, seed)
            self._test_sums[4 * j : 4 * j + 4] += torch.stack(
                [lp.sum(), (lp**2).sum(), lpt.sum(), (lpt**2).sum()]
            )
        self._test_sums[-1] += x.shape[0]

    def on_test_epoch_end(self) -> None:
        s = self.eval_settings
        sums = self._reduce_sum(self._test_sums).tolist()
        n = sums[-1]
        two_log_z, z_sem = self._log_z2(
            int(s["z_samples"]),
            int(s["z_inner"]),
            int(s["z_chunk"]),
            int(s["seed"]),
            progress=bool(s.get("progress", True)) and self.trainer.is_global_zero,
        )
        result: dict[str, Any] = {"log_p": {}, "log_ptilde_star": {}, "log_pstar": {}}
        for j, K in enumerate(self._eval_Ks()):
            lp, lp_sem = mean_and_sem(sums[4 * j], sums[4 * j + 1], n)
            lpt, lpt_sem = mean_and_sem(sums[4 * j + 2], sums[4 * j + 3], n)
            result["log_p"][str(K)] = {"mean": lp, "sem": lp_sem}
            result["log_ptilde_star"][str(K)] = {"mean": lpt, "sem": lpt_sem}
            result["log_pstar"][str(K)] = {"mean": lpt - two_log_z, "sem": lpt_sem}
        result["two_log_z"] = {"value": two_log_z, "sem": z_sem, "n": int(s["z_samples"])}
        result["n_examples"] = int(n)
        self.eval_result = result
