"""How far two evaluations that draw the same samples may differ: float32 rounding, propagated.

Runs that deal a data set differently (1 or 2 processes, another batch size, another thread
count) give every example the same samples: its random streams are keyed by its global index
(bihm/rng.py). Their float32 arithmetic is not the same, though: the BLAS chooses its kernel,
and with it the order of a dot product's additions, by the matrix shape, the thread count and
the CPU (MKL's sgemm on an AVX-512 Xeon is not the AVX2 kernel it runs on an AMD EPYC). So an
example's log weights d_k = log p(x, h_k) - log q(h_k | x), float32 sums of hundreds of
log-probabilities, agree between two runs only up to rounding. The model used here:

    |delta d_k| <= DELTA = ULPS * 2^-23 * D,   ULPS = 4,   D = 2 |log p~*(x)|,

i.e. 4 float32 ulps (ulp(v) <= 2^-23 |v|) of a bound D on the size of what is rounded: the
log weights that carry the weight lie within log K of log p~*(x) (Gibbs' inequality: the
w~-mean of d/2 is S_1/2 - H(w~) >= S_1/2 - log K), and |log q(h | x)| is small next to
|log p(x, h)| (tens of nats against hundreds); 2 |log p~*| covers both for these models.
Measured on this project's 784-pixel models (DELTA is ~12 ulps of their log weights): runs
differed by at most 1 ulp between batch sizes 1 to 129 or 1 and 2 threads, 2 ulps with
MKL's SSE kernel (MKL_CBWR=COMPATIBLE), 3 ulps between that with ATen's scalar kernels
(ATEN_CPU_CAPABILITY=default) and the defaults (MKL's AVX2, ATen's AVX-512 kernels).

Everything after the log weights is float64 (`BiHM.estimates`' log-sum-exps, `Sums`), so a
reported number moves by at most (plus ~1e-13 from the order of float64 sums):

- log p, log p~* (log-sum-exps, then means; 1-Lipschitz in the max norm): DELTA;
  their standard errors (a sample standard deviation over n examples): DELTA / sqrt(n - 1);
- 2 log Z (a log-sum-exp of N Eq. 7 terms, float32 sums of the same size): DELTA; its
  standard error s = sqrt((r - 1) / (N - 1)), r = N e^{S_2 - 2 S_1}, where log r moves by
  4 DELTA, so s by r 4 DELTA / (2 s (N - 1)) = 2 DELTA (s + 1 / (s (N - 1)));
- log p* = log p~* - 2 log Z, and its sem = hypot(two sems): the sum of the two;
- ESS = exp(2 S_1/2 - S_1) or exp(2 S_1 - S_2), and their means: a factor exp(4 DELTA);
- counts (misclassified examples, Gibbs errors, n): not at all.

A count moves only where float32 rounding flips a discrete choice: an argmax tied within
DELTA, or a uniform falling within the rounding of its probability (~1e-7 per draw).
"""

from __future__ import annotations

import math

from torch import Tensor

ULPS = 4
FLOAT64_SUMS = 1e-12  # relative: float64 sums of ~1e3 terms in another order


def log_weight_rounding(log_ptilde_star: float | Tensor) -> float | Tensor:
    """DELTA: how far two runs' float32 log weights of an example may differ (see above),
    from its log p~*(x) (a tensor of them, or the data set's mean at the smallest K)."""
    return ULPS * 2.0**-23 * 2 * abs(log_ptilde_star)


def _z_sem_rounding(delta: float, sem: float, n: int) -> float:
    return 2 * delta * (sem + 1 / (sem * (n - 1)))


def eval_tolerances(result: dict) -> dict[str, float]:
    """Absolute tolerances by key path ("log_p.10.mean") for every float of a `bihm eval`
    JSON result; counts and other floats not listed must be equal."""
    Ks = list(result["log_p"])
    delta = log_weight_rounding(max(abs(result["log_ptilde_star"][K]["mean"]) for K in Ks))
    sem_delta = delta / math.sqrt(result["n_examples"] - 1)
    z = result["two_log_z"]
    z_sem = _z_sem_rounding(delta, z["sem"], z["n"])
    tol = {"two_log_z.value": delta, "two_log_z.sem": z_sem}
    for K in Ks:
        for name in ("log_p", "log_ptilde_star"):
            tol[f"{name}.{K}.mean"] = delta
            tol[f"{name}.{K}.sem"] = sem_delta
        tol[f"log_pstar.{K}.mean"] = 2 * delta
        tol[f"log_pstar.{K}.sem"] = sem_delta + z_sem
        for kind in ("p", "pstar"):
            tol[f"ess.{K}.{kind}"] = math.expm1(4 * delta) * result["ess"][K][kind]
    return tol


def validation_tolerances(metrics: dict, z_samples: int) -> dict[str, float]:
    """The same for the flat `bihm validate` JSON (or a metrics.csv row), whose 2 log Z came
    from `z_samples` outer samples."""
    delta = log_weight_rounding(metrics["val/log_ptilde_star"])
    sem_delta = delta / math.sqrt(metrics["val/n"] - 1)
    z_sem = _z_sem_rounding(delta, metrics["val/two_log_z_sem"], z_samples)
    tol = {}
    if "train_eval/n" in metrics:  # the training subset, scored like the validation set
        t_delta = log_weight_rounding(metrics["train_eval/log_ptilde_star"])
        t_sem_delta = t_delta / math.sqrt(metrics["train_eval/n"] - 1)
        tol = {
            "train_eval/log_p": t_delta,
            "train_eval/log_ptilde_star": t_delta,
            "train_eval/log_pstar": t_delta + delta,
            "train_eval/log_p_sem": t_sem_delta,
            "train_eval/log_ptilde_star_sem": t_sem_delta,
            "gap/log_p": t_delta + delta,
            "gap/log_pstar": t_delta + delta,
        }
    return tol | {
        "val/log_p": delta,
        "val/log_ptilde_star": delta,
        "val/two_log_z": delta,
        "val/log_pstar": 2 * delta,
        "val/log_p_sem": sem_delta,
        "val/log_ptilde_star_sem": sem_delta,
        "val/two_log_z_sem": z_sem,
        "val/log_pstar_sem": sem_delta + z_sem,
        "val/ess_pstar": math.expm1(4 * delta) * metrics["val/ess_pstar"],
        "val/ess_p": math.expm1(4 * delta) * metrics["val/ess_p"],
    }


def assert_same_up_to_rounding(a, b, tolerances: dict[str, float], path: str = "") -> None:
    """a and b (nested dicts of JSON values) are equal, floats within tolerances[path]
    (plus float64 summation order); a float without a tolerance must be equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            sub = f"{path}.{key}" if path else str(key)
            assert_same_up_to_rounding(a[key], b[key], tolerances, sub)
    elif isinstance(a, float) and path in tolerances:
        ok = math.isclose(a, b, rel_tol=FLOAT64_SUMS, abs_tol=tolerances[path])
        assert ok, (path, a, b, f"|a - b| = {abs(a - b):.3g} > {tolerances[path]:.3g}")
    else:
        assert a == b, (path, a, b)
