"""Training a BiHM as a PyTorch Lightning module: `BiHMModule` trains with the BiHM or RWS
objective (bihm/objectives.py: paper Algorithm 1, K samples h_k ~ q(h | x), weights w~)
and validates with the estimators of `bihm-math.md` (log p, log p~*, 2 log Z, ESS, Gibbs
inpainting). The test evaluation of a trained model (`bihm eval`) is bihm/eval_module.py.

Launcher concerns (strategy, devices, nodes, cluster environment, loggers, callbacks) live
in `pipeline/`, so the module runs unchanged under a plain Trainer, DDP, Ray Train or
SLURM. It only uses `self.trainer.world_size / global_rank` and the strategy's
collectives (`reduce`, `all_gather`), and only at epoch ends for evaluation metrics. The
estimators over a data set, and why one process and many give the same numbers, are in
`bihm/evaluation.py`.

`BiHMModule` takes one argument, `config`: the plain-dict form of `pipeline.config.Config`
(sections model, train, optim, validation, seed). It is stored as a hyper-parameter of
plain types, so checkpoints load with `weights_only=True`.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from bihm import evaluation as ev
from bihm.errors import UserError
from bihm.gibbs import half_mask
from bihm.model import BiHM
from bihm.rng import step_generator
from bihm.subsets import in_spread_subset, labelled, subset_position

# Running sums of a training epoch and of a validation, by name (see evaluation.Sums).
TRAIN_SUMS = ["n", "loss", "log_p", "log_ptilde_star", "ess"]
VAL_ESTIMATES = ev.ESTIMATES
# The training subset scored at each validation (the generalization gap): its log p and
# log p~* under the same K and 2 log Z as the validation images.
TRAIN_EVAL_ESTIMATES = ["log_p", "log_ptilde_star"]
VAL_SUMS = (
    [n for name in VAL_ESTIMATES for n in ev.moment_names(name)]
    + [n for name in TRAIN_EVAL_ESTIMATES for n in ev.moment_names(f"train_eval.{name}")]
    + [
        "gibbs",
        "recon",
        "masked",
        "class.n",
        "class.q",
        "class.pstar",
    ]
)


def model_from_config(model_cfg: dict[str, Any]) -> BiHM:
    """The BiHM of a config's model section (keys added later default to the paper's model,
    so the configs inside older checkpoints still load)."""
    return BiHM(
        model_cfg["layers"],
        families=model_cfg.get("families"),
        gaussian_std=model_cfg.get("gaussian_std", 1.0),
        learn_std=model_cfg.get("learn_std", True),
        n_classes=model_cfg.get("labels", 0),
    )


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a non-finite loss or gradient; the optimiser step was not taken.
    A user error: the message names the step and what to change (usually optim.lr)."""


# --------------------------------------------------------------------------- module
class BiHMModule(ev.Collectives, pl.LightningModule):
    """Trains a `BiHM` with the BiHM or RWS objective; validates exactly across ranks."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = config
        self.model = model_from_config(config["model"])
        self.seed = int(config.get("seed", 0))
        self.train_cfg = config["train"]
        self.optim_cfg = config["optim"]
        self.val_cfg = config["validation"]
        # The last validation's global metrics (read by pipeline's MetricsCSV callback).
        self.epoch_metrics: dict[str, float] = {}
        self._train_sums: ev.Sums | None = None
        self._train_sums_epoch = -1
        self._val_sums: ev.Sums | None = None
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

    def _log_dict(self, metrics: dict[str, float], prog_bar: tuple[str, ...] = ()) -> None:
        # The values are already global, the same on every rank: a max over ranks returns
        # them unchanged (a mean could round), and it tells Lightning they are synced.
        for key, value in metrics.items():
            if math.isfinite(value):
                self.log(key, value, prog_bar=key in prog_bar, sync_dist=True, reduce_fx="max")

    # ------------------------------------------------------------------ training
    def resets_optimizer_at(self, epoch: int) -> bool:
        """Whether `epoch` starts with a fresh Adam state (optim.switch.reset_optimizer)."""
        s = self.optim_cfg.get("switch") or {}
        return bool(s.get("reset_optimizer")) and s.get("epoch") == epoch

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Set every step (not only at epoch start: Lightning skips the epoch-start hooks
        # when it resumes from a checkpoint written at an epoch end). All of Adam's
        # hyper-parameters come from the config, not only lr: a resume restores the
        # checkpoint's optimizer param_groups over configure_optimizers', so a betas, eps
        # or weight_decay changed with `--resume --set` would otherwise be dropped.
        o = self.optim_cfg
        hyper = {
            "lr": self.lr_at(self.current_epoch),
            "betas": (float(o["betas"][0]), float(o["betas"][1])),
            "eps": float(o["eps"]),
            "weight_decay": float(o["weight_decay"]),
        }
        for opt in self.trainer.optimizers:
            if batch_idx == 0 and self.resets_optimizer_at(self.current_epoch):
                # Adam re-creates a missing state at its next step: zero moments, step 0,
                # so its bias correction starts over. Checkpoints are written at epoch
                # ends only: a resume reaches this batch again only from a checkpoint
                # written before the reset.
                opt.state.clear()
            for group in opt.param_groups:
                group.update(hyper)
        if self._train_sums is None or self._train_sums_epoch != self.current_epoch:
            self._train_sums = ev.Sums(TRAIN_SUMS, self.device)
            self._train_sums_epoch = self.current_epoch

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch[0], None
        if self.model.n_classes:  # labels -1 where semi-supervised training leaves them out
            keep = labelled(batch[1], float(self.train_cfg.get("labelled_fraction", 1.0)))
            y = torch.where(keep, batch[2], torch.full_like(batch[2], -1))
        rank, _ = self._rank_world()
        # Keyed by (seed, TRAIN, rank, step): a resumed run draws what the uninterrupted
        # one drew.
        g = step_generator(
            self.device, self.seed, ev.TRAIN, rank, self.global_step, rows=x.shape[0]
        )
        out = self.model.loss(
            x,
            K=self.K_at(self.current_epoch),
            objective=self.train_cfg["objective"],
            generator=g,
            y=y,
        )
        penalized = out.loss + self.weight_penalty()
        loss = out.loss.detach()
        # No host sync here: the finiteness flag is read once, in on_before_optimizer_step.
        self._loss_finite = torch.isfinite(loss)
        B = x.shape[0]
        sums = self._train_sums
        sums.add("n", float(B))
        for name, value in (
            ("loss", loss),
            ("log_p", out.log_p),
            ("log_ptilde_star", out.log_ptilde_star),
            ("ess", out.ess),
        ):
            sums.add(name, value * B)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return penalized

    def weight_penalty(self) -> Tensor | float:
        """optim.l2 * sum W^2 + optim.l1 * sum |W| over the weight matrices of p and q
        (`BiHM.weight_matrices`), per example: added to the batch-mean loss, its gradient
        2 l2 W + l1 sign(W) reaches Adam with the objective's (a coupled penalty, as the
        authors' cost + L1/L2, not decoupled weight decay). 0.0 when both are 0."""
        l1 = float(self.optim_cfg.get("l1", 0.0))
        l2 = float(self.optim_cfg.get("l2", 0.0))
        if l1 == 0.0 and l2 == 0.0:
            return 0.0
        penalty = 0.0
        for w in self.model.weight_matrices():
            if l2:
                penalty = penalty + l2 * w.square().sum()
            if l1:
                penalty = penalty + l1 * w.abs().sum()
        return penalty

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
        return every > 0 and (self.current_epoch + 1) % every == 0

    def _gibbs_examples(self, idx: Tensor, examples: int) -> Tensor:
        """Which of these validation examples the Gibbs inpainting uses: `examples` of them
        spread evenly over the validation images in use, the same on every rank."""
        count, n = self.trainer.datamodule.split_size("valid")
        position = subset_position(idx.cpu().numpy(), count, n)
        return torch.as_tensor(in_spread_subset(position, n, examples), device=idx.device)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = ev.Sums(VAL_SUMS, self.device)

    def _val_split(self, dataloader_idx: int) -> str:
        """The split of a validation loader: "valid", or "train" for the training subset
        that the data module adds (`val_splits`, BinarizedMNISTDataModule)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        return getattr(datamodule, "val_splits", ("valid",))[dataloader_idx]

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Evaluation stays fp32 under train.precision bf16-mixed: Lightning wraps this step
        # in the training precision's autocast, which would round the estimates' matmuls.
        with torch.autocast(self.device.type, enabled=False):
            if self._val_split(dataloader_idx) == "train":
                self._train_eval_step(batch)
            else:
                self._validation_step(batch)

    def _train_eval_step(self, batch) -> None:
        """Training images scored exactly as validation images: the same K, and per-example
        streams keyed by (seed, TRAIN_EVAL, K, index), so the numbers do not depend on the
        batch or the ranks either."""
        x, idx = batch[0], batch[1]
        v = self.val_cfg
        est = ev.estimates(self.model, x, idx, int(v["K"]), int(v["seed"]), ev.TRAIN_EVAL)
        for name in TRAIN_EVAL_ESTIMATES:
            self._val_sums.add_moments(f"train_eval.{name}", getattr(est, name))

    def _validation_step(self, batch) -> None:
        x, idx = batch[0], batch[1]
        v = self.val_cfg
        est = ev.estimates(self.model, x, idx, int(v["K"]), int(v["seed"]))
        for name in VAL_ESTIMATES:
            self._val_sums.add_moments(name, getattr(est, name))
        if self.model.n_classes:  # log p(x) above has y summed out; here the test error
            errors = ev.classification_errors(
                self.model, x, batch[2], idx, int(v["K"]), int(v["seed"])
            )
            for name, value in errors.items():
                self._val_sums.add(f"class.{name}", value)
        if self._gibbs_now():
            gv = v["gibbs"]
            keep = self._gibbs_examples(idx, int(gv["examples"]))
            errors = ev.inpainting_errors(
                self.model,
                x[keep],
                idx[keep],
                half_mask("bottom").to(x),
                chains=int(gv["chains"]),
                steps=int(gv["steps"]),
                proposals=int(gv["proposals"]),
                inner=int(gv["inner"]),
                seed=int(v["seed"]),
            )
            for name, value in errors.items():
                self._val_sums.add(name, value)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        v = self.val_cfg
        sums = self._val_sums.reduced(self._reduce_sum)
        lp, lp_sem = ev.moments_mean_and_sem(sums, "log_p")
        lpt, lpt_sem = ev.moments_mean_and_sem(sums, "log_ptilde_star")
        two_log_z, z_sem = self._log_z2(
            self.model,
            int(v["z_samples"]),
            int(v["z_inner"]),
            int(v["z_chunk"]),
            int(v["seed"]),
            self._show_progress(),
        )
        m = {
            "epoch": float(self.current_epoch),
            "val/n": sums["log_p.n"],
            "val/log_p": lp,
            "val/log_p_sem": lp_sem,
            "val/log_ptilde_star": lpt,
            "val/log_ptilde_star_sem": lpt_sem,
            "val/two_log_z": two_log_z,
            "val/two_log_z_sem": z_sem,
            "val/log_pstar": lpt - two_log_z,
            "val/log_pstar_sem": ev.log_pstar_sem(lpt_sem, z_sem),
            **ev.bits_per_dim(self.model, lp, "val/"),
            "val/ess_pstar": ev.moments_mean_and_sem(sums, "ess_pstar")[0],
            "val/ess_p": ev.moments_mean_and_sem(sums, "ess_p")[0],
        }
        if sums["train_eval.log_p.n"] > 0:
            # The same 2 log Z as the validation's: the gap in log p* is the gap in log p~*.
            tp, tp_sem = ev.moments_mean_and_sem(sums, "train_eval.log_p")
            tpt, tpt_sem = ev.moments_mean_and_sem(sums, "train_eval.log_ptilde_star")
            m.update(
                {
                    "train_eval/n": sums["train_eval.log_p.n"],
                    "train_eval/log_p": tp,
                    "train_eval/log_p_sem": tp_sem,
                    "train_eval/log_ptilde_star": tpt,
                    "train_eval/log_ptilde_star_sem": tpt_sem,
                    "train_eval/log_pstar": tpt - two_log_z,
                    "gap/log_p": tp - lp,
                    "gap/log_pstar": tpt - lpt,
                }
            )
        if sums["class.n"] > 0:
            m["val/error_q"] = sums["class.q"] / sums["class.n"]
            m["val/error_pstar"] = sums["class.pstar"] / sums["class.n"]
        if sums["masked"] > 0:
            m["val/gibbs_error"] = sums["gibbs"] / sums["masked"]
            m["val/recon_error"] = sums["recon"] / sums["masked"]
        fitting = (
            self.trainer.state.fn == "fit"
            and self._train_sums is not None
            and self._train_sums_epoch == self.current_epoch
        )
        if fitting:  # every rank takes part: the same number of train steps on each
            t = self._train_sums.reduced(self._reduce_sum)
            if t["n"] > 0:
                m.update(
                    {
                        "train/loss": t["loss"] / t["n"],
                        "train/log_p": t["log_p"] / t["n"],
                        "train/log_ptilde_star": t["log_ptilde_star"] / t["n"],
                        "train/ess": t["ess"] / t["n"],
                        "train/K": float(self.K_at(self.current_epoch)),
                        "train/lr": self.lr_at(self.current_epoch),
                    }
                )
        self.epoch_metrics = m
        # "val/epoch" says which epoch the logged validation metrics belong to: a report sent
        # at every epoch's end (Ray Train's) repeats them between validations
        # (validation.every_n_epochs > 1).
        logged = {k: val for k, val in m.items() if k != "epoch"}
        self._log_dict({**logged, "val/epoch": m["epoch"]}, prog_bar=("val/log_ptilde_star",))
