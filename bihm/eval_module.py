"""The authors' test evaluation of a trained BiHM as a Lightning module (`bihm eval`).

For each K, the test means of the estimators of `bihm-math.md` with K samples
h_k ~ q(h | x) (bihm/estimators.py): log p(x), log p~*(x) and
log p*(x) = log p~*(x) - 2 log Z, with standard errors across examples, the ESS of both
weight kinds, and 2 log Z from N outer samples of the paper's Eq. 7. It runs as
`trainer.test` under any launcher (one process, DDP, Ray); every sum is reduced exactly
across ranks (bihm/evaluation.py), so any number of processes and any batch size give the
same table. Training and validation are `bihm.lightning.BiHMModule`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl

from bihm import evaluation as ev
from bihm.model import BiHM


class EvalModule(ev.Collectives, pl.LightningModule):
    """The authors' evaluation of a trained model (`bihm eval`), as `trainer.test`:

    for each K, the test means of log p(x), log p~*(x), log p*(x) = log p~*(x) - 2 log Z
    with standard errors across examples, and the mean ESS of both weight kinds; 2 log Z
    from `z_samples` outer samples of Eq. 7. A Gaussian visible layer adds bits per
    dimension; a label node the classification errors of q(y | x) and p*(y | x) per K.
    Everything is reduced exactly across ranks (see bihm/evaluation.py). After
    `trainer.test`, `result` holds the table.
    """

    def __init__(
        self,
        model: BiHM,
        *,
        Ks: Sequence[int],
        z_samples: int,
        z_inner: int = 10,
        z_chunk: int = 10_000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.Ks = [int(k) for k in Ks]
        self.z_samples, self.z_inner, self.z_chunk, self.seed = z_samples, z_inner, z_chunk, seed
        self.names = [
            n for K in self.Ks for e in ev.ESTIMATES for n in ev.moment_names(f"{e}@{K}")
        ] + [f"class.{name}@{K}" for K in self.Ks for name in ("n", "q", "pstar")]
        self.result: dict[str, Any] | None = None
        self._sums: ev.Sums | None = None

    def on_test_epoch_start(self) -> None:
        self._sums = ev.Sums(self.names, self.device)

    def test_step(self, batch, batch_idx: int) -> None:
        x, idx = batch[0], batch[1]
        for K in self.Ks:
            est = ev.estimates(self.model, x, idx, K, self.seed)
            for name in ev.ESTIMATES:
                self._sums.add_moments(f"{name}@{K}", getattr(est, name))
            if self.model.n_classes:
                errors = ev.classification_errors(self.model, x, batch[2], idx, K, self.seed)
                for name, value in errors.items():
                    self._sums.add(f"class.{name}@{K}", value)

    def on_test_epoch_end(self) -> None:
        sums = self._sums.reduced(self._reduce_sum)
        two_log_z, z_sem = self._log_z2(
            self.model,
            self.z_samples,
            self.z_inner,
            self.z_chunk,
            self.seed,
            self._show_progress(),
        )
        result = ev.evaluation_table(sums, self.Ks, two_log_z, z_sem)
        result["ess"] = {
            str(K): {
                "pstar": ev.moments_mean_and_sem(sums, f"ess_pstar@{K}")[0] / K,
                "p": ev.moments_mean_and_sem(sums, f"ess_p@{K}")[0] / K,
            }
            for K in self.Ks
        }
        result["two_log_z"] = {"value": two_log_z, "sem": z_sem, "n": self.z_samples}
        if self.model.families[0] == "gaussian":
            result["bits_per_dim"] = {
                name: {K: ev.bits_per_dim(self.model, e["mean"])["bpd"] for K, e in col.items()}
                for name, col in result.items()
                if name in ("log_p", "log_ptilde_star", "log_pstar")
            }
        result["n_examples"] = int(sums[f"log_p@{self.Ks[0]}.n"])
        if self.model.n_classes:  # test error of the label node, from q(y|x) and p*(y|x)
            result["classification"] = {
                str(K): {
                    kind: sums[f"class.{kind}@{K}"] / sums[f"class.n@{K}"]
                    for kind in ("q", "pstar")
                }
                for K in self.Ks
            }
        self.result = result
