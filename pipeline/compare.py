"""`bihm compare`: runs side by side, one metric of their metrics.csv against the epoch.

For continuations from a common checkpoint (a larger K, a lower learning rate, ...): each
run folder (or results/ folder) holding a metrics.csv becomes one line of the plot, and
the table gives each run's value at the last epoch that all of them reached, so that the
candidates are compared at equal epochs. `--label` names the lines (by default the
folders' names), for example to say that a run was validated on other images.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from bihm.errors import UserError
from pipeline.argtypes import non_negative_int


def read_metric(run: Path, metric: str, from_epoch: int = 0) -> tuple[list[int], list[float]]:
    """(epochs, values) of `metric` in run/metrics.csv from `from_epoch` on; empty cells
    (epochs that did not compute it) are left out."""
    path = run / "metrics.csv"
    if not path.is_file():
        raise UserError(f"{path}: no metrics.csv in this run folder")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if metric not in (reader.fieldnames or []):
            raise UserError(f"{path}: no column {metric!r}")
        epochs, values = [], []
        for row in reader:
            epoch, value = int(row["epoch"]), row[metric]
            if epoch >= from_epoch and value not in ("", None) and math.isfinite(float(value)):
                epochs.append(epoch)
                values.append(float(value))
    return epochs, values


def compare(
    runs: list[Path],
    metric: str,
    from_epoch: int = 0,
    out: Path | None = None,
    labels: list[str] | None = None,
) -> list[tuple[str, int, float]]:
    """Each run's value of `metric` at the last epoch common to all runs, as
    [(label, epoch, value)]; with `out`, also the plot of every run's curve. `labels`, one
    per run in order, replace the folders' names."""
    if labels and len(labels) != len(runs):
        raise UserError(f"--label: {len(labels)} labels for {len(runs)} runs (give one per run)")
    names = labels or [run.name for run in runs]
    curves = [
        (name, *read_metric(run, metric, from_epoch)) for name, run in zip(names, runs, strict=True)
    ]
    common = set.intersection(*(set(epochs) for _, epochs, _ in curves))
    if not common:
        raise UserError(f"the runs share no epoch with {metric} from epoch {from_epoch} on")
    last = max(common)
    table = [(label, last, values[epochs.index(last)]) for label, epochs, values in curves]
    if out is not None:
        from pipeline.plots import save_trial_curves

        save_trial_curves(out, curves, metric, title=f"{metric} from epoch {from_epoch}")
    return table


def _compare(args: argparse.Namespace) -> int:
    table = compare(args.runs, args.metric, args.from_epoch, args.out, args.label)
    width = max(len(label) for label, _, _ in table)
    for label, epoch, value in table:
        print(f"{label:<{width}}  epoch {epoch}  {args.metric} {value:.3f}")
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="runs side by side: a metric against the epoch")
    p.add_argument("runs", nargs="+", type=Path, help="run folders holding a metrics.csv")
    p.add_argument("--metric", default="val/log_pstar", help="a column of metrics.csv")
    p.add_argument("--from-epoch", type=non_negative_int, default=0, help="first epoch shown")
    p.add_argument("--out", type=Path, help="write the plot here (PNG)")
    p.add_argument(
        "--label",
        action="append",
        help="a run's name in the table and legend, one per run in order (repeatable)",
    )
    p.set_defaults(func=_compare)
