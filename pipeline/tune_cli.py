"""`bihm tune`: the command line of pipeline/tune.py (Ray Tune sweeps).

Registering the flags imports nothing heavy; the handler imports Ray and the training code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.argtypes import non_negative_float, positive_float, positive_int
from pipeline.config import add_override_argument


def _tune(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError
    from pipeline.tune import (
        SweepInterrupted,
        TrialRecord,
        load_sweep,
        run_sweep,
        trial_scaling,
    )

    if args.num_cpus is not None and args.address:
        raise ConfigError("--num-cpus: only for a local Ray (not with --address)")
    sweep = load_sweep(args.config, args.set)
    if args.collect is not None:
        return _collect(sweep, args.collect)
    scaling = trial_scaling(
        sweep,
        args.workers_per_trial,
        args.cpus_per_worker,
        args.gpus_per_worker,
        args.max_failures,
    )
    from bihm.atomic import check_writable

    # After the flags (a bad flag leaves no folder behind), before Ray starts or any data is
    # prepared: the sweep folder must take files.
    check_writable(sweep.sweep_dir, "sweep folder", folder=True, source="run_dir in the sweep file")
    try:
        outcome = run_sweep(
            sweep,
            num_samples=args.num_samples,
            address=args.address,
            num_cpus=args.num_cpus,
            resume=args.resume,
            scaling=scaling,
        )
    except SweepInterrupted as err:
        print(f"bihm tune: {err}", file=sys.stderr)
        return 130
    records: list[TrialRecord] = outcome["records"]
    counts = {s: sum(r.status == s for r in records) for s in ("completed", "stopped", "failed")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    best = outcome["best"]
    if best is None:
        print(
            f"bihm tune: error: no trial reported {sweep.spec.metric} ({summary}); "
            f"see {outcome['sweep_dir']}/results.csv",
            file=sys.stderr,
        )
        return 1
    value, epoch = best.best(sweep.spec.mode)
    print(
        f"bihm tune: {len(records)} trials ({summary}); best {sweep.spec.metric} {value:.4f} "
        f"(trial {best.trial_id}, epoch {epoch}); config {outcome['sweep_dir']}/best.yaml"
    )
    return 0


def _collect(sweep, sweep_dir: Path) -> int:
    """`--collect DIR`: results.csv, trials.png and best.yaml of DIR from its trial folders."""
    import dataclasses

    from pipeline.config import ConfigError
    from pipeline.tune import records_from_runs, write_outputs

    if not sweep_dir.is_dir():
        raise ConfigError(f"--collect: {sweep_dir} is not a folder")
    records = records_from_runs(sweep, sweep_dir)
    spec = dataclasses.replace(sweep.spec, run_dir=str(sweep_dir))
    best = write_outputs(dataclasses.replace(sweep, spec=spec), records)
    done = sum(r.status == "completed" for r in records)
    line = f"bihm tune: collected {len(records)} trials in {sweep_dir} ({done} completed)"
    if best is not None:
        value, epoch = best.best(sweep.spec.mode)
        line += f"; best {sweep.spec.metric} {value:.4f} (trial {best.trial_id}, epoch {epoch})"
    print(line)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune", help="Ray Tune sweep over training hyper-parameters (see configs/sweep_*.yaml)"
    )
    p.add_argument("--config", type=Path, required=True, help="sweep YAML file")
    add_override_argument(p, "override a value of the base config for every trial (repeatable)")
    p.add_argument("--num-samples", type=positive_int, default=None, help="override num_samples")
    p.add_argument(
        "--address", default=None, help="Ray cluster to join (e.g. auto); default: start one"
    )
    p.add_argument(
        "--num-cpus", type=positive_int, default=None, help="CPUs of a locally started Ray"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)"
    )
    p.add_argument(
        "--collect",
        type=Path,
        metavar="DIR",
        default=None,
        help="run nothing: rewrite DIR's results.csv, trials.png and best.yaml from the run "
        "folders DIR/trials/* (with the epochs of trials continued by `bihm train --resume`)",
    )
    ray = p.add_argument_group(
        "multi-worker trials: each trial a Ray Train run, as `bihm train --launcher ray`"
    )
    ray.add_argument(
        "--workers-per-trial",
        type=positive_int,
        default=None,
        help="Ray Train workers (DDP processes) per trial; default: one-worker trials",
    )
    ray.add_argument(
        "--cpus-per-worker",
        type=positive_float,
        default=None,
        help="default: the sweep's resources.cpu",
    )
    ray.add_argument(
        "--gpus-per-worker",
        type=non_negative_float,
        default=None,
        help="default: the sweep's resources.gpu",
    )
    ray.add_argument(
        "--max-failures",
        type=int,
        default=None,
        help="restarts of a trial's workers from its last checkpoint (default 2, -1: no limit)",
    )
    p.set_defaults(func=_tune)
