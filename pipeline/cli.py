"""The `bihm` command line: one entry point, one sub-command per job.

Building the parser imports no torch or Lightning, so `bihm --help` answers at once: each
sub-command's module registers its flags and imports the heavy code in its handler. A
`bihm.errors.UserError` (a bad file, key, flag or field) or an OSError ends as one line,
`bihm <cmd>: error: ...`, with exit status 2; `--debug` shows the traceback instead.
Known harmless warnings and log lines of the libraries are hidden (pipeline/quiet.py);
`--verbose` shows them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RAY_FLAGS = ("workers", "cpus_per_worker", "gpus_per_worker", "address", "max_failures")


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """--set values plus the --wandb* flags as config overrides (kept in config.yaml, so a
    resume logs the same way)."""
    import json

    sets = list(args.set)
    for flag, key in (("wandb", "wandb"), ("wandb_project", "wandb_project")):
        if getattr(args, flag) is not None:
            sets.append(f"logging.{key}={json.dumps(getattr(args, flag))}")
    if args.wandb_group is not None:
        sets.append(f"logging.wandb_group={json.dumps(args.wandb_group or None)}")
    return sets


def _train(args: argparse.Namespace) -> int:
    from pipeline.config import apply_overrides, config_from_dict, load_config
    from pipeline.train import (
        EXIT_INTERRUPTED,
        TrainingError,
        TrainingInterrupted,
        config_for_resume,
        resume_epoch,
        run_training,
    )

    if args.launcher == "ray":
        if args.devices is not None or args.num_nodes is not None:
            raise TrainingError(
                "--devices/--num-nodes are for --launcher local; with --launcher ray "
                "use --workers (Ray places the workers on the nodes)"
            )
    else:
        given = [f for f in RAY_FLAGS if getattr(args, f) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise TrainingError(f"{flag} needs --launcher ray")
    sets = _train_overrides(args)
    if args.resume and args.config is None:
        # Continue with the config the run was started with (plus any --set).
        run_dir = args.run_dir or load_config(None).resolved_run_dir()
        cfg = config_from_dict(apply_overrides(config_for_resume(run_dir).to_dict(), sets))
    else:
        cfg = load_config(args.config, sets)
    try:
        if args.launcher == "ray":
            from pipeline.ray_launcher import run_ray_training

            result = run_ray_training(
                cfg,
                workers=args.workers,
                cpus_per_worker=1.0 if args.cpus_per_worker is None else args.cpus_per_worker,
                gpus_per_worker=args.gpus_per_worker,
                address=args.address,
                max_failures=2 if args.max_failures is None else args.max_failures,
                run_dir=args.run_dir,
                resume=args.resume,
            )
        else:
            result = run_training(
                cfg,
                devices=args.devices,
                num_nodes=args.num_nodes,
                run_dir=args.run_dir,
                resume=args.resume,
            )
    except TrainingInterrupted as stop:
        # SIGTERM (scancel, a time limit, a preemption): not a success, and resumable.
        if stop.global_rank == 0:
            last = stop.run_dir / "checkpoints" / "last.ckpt"
            where = f"(run folder {stop.run_dir})"
            if last.is_file():
                line = f"interrupted at epoch {resume_epoch(last)}; continue with --resume"
            else:  # stopped before training began
                line = "interrupted before its first checkpoint; start it again"
            print(f"bihm train: {line} {where}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if result["global_rank"] == 0:
        print(
            f"bihm train: done after {result['epochs']} epochs; best {result['monitor']} "
            f"{result['best']} at {result['best_path']}; run folder {result['run_dir']}"
        )
    return 0


def _add_train(subparsers) -> None:
    from pipeline.argtypes import non_negative_float, positive_float, positive_int
    from pipeline.config import add_override_argument

    p = subparsers.add_parser("train", help="train a BiHM (default config: bmnist_paper)")
    p.add_argument(
        "--config",
        default=None,
        help="a YAML file, or the name of a packaged config: bmnist_paper (default), smoke, demo",
    )
    add_override_argument(p, "override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--devices", type=positive_int, default=None, help="processes per node")
    p.add_argument("--num-nodes", type=positive_int, default=None)
    p.add_argument("--run-dir", type=Path, default=None, help="default runs/<name>")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from <run-dir>/checkpoints/last.ckpt (its config.yaml unless --config)",
    )
    ray = p.add_argument_group("Ray Train (--launcher ray)")
    ray.add_argument(
        "--launcher",
        choices=("local", "ray"),
        default="local",
        help="local: this process (and its DDP children); ray: Ray Train workers",
    )
    ray.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="training processes (default devices x nodes)",
    )
    ray.add_argument("--cpus-per-worker", type=positive_float, default=None, help="default 1")
    ray.add_argument(
        "--gpus-per-worker",
        type=non_negative_float,
        default=None,
        help="default 1 if train.accelerator is gpu, or auto and the cluster has GPUs, else 0",
    )
    ray.add_argument(
        "--address",
        default=None,
        help="Ray cluster: auto (the one `ray start` made here) or HOST:PORT; "
        "default $RAY_ADDRESS, else an embedded local Ray",
    )
    ray.add_argument(
        "--max-failures",
        type=int,
        default=None,
        help="worker-group restarts from the last checkpoint (default 2, -1 = no limit)",
    )
    wandb = p.add_argument_group("wandb (sets logging.* in the config)")
    wandb.add_argument("--wandb", choices=("online", "offline", "off"), default=None)
    wandb.add_argument("--wandb-project", default=None)
    wandb.add_argument("--wandb-group", default=None, help="'' = no group")
    p.set_defaults(func=_train)


class _Parser(argparse.ArgumentParser):
    """argparse without the usage block on errors: one line naming the flag, exit 2.
    Sub-command parsers are made of the same class (argparse's parser_class default)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bihm", description="Train and evaluate Bidirectional Helmholtz Machines."
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of errors in your input too"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every warning and log line of the libraries, also those hidden by default "
        "as known and harmless (see pipeline/quiet.py)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    from data_shards.cli import register as register_data

    register_data(subparsers)
    _add_train(subparsers)
    from pipeline.eval_cli import register as register_eval

    register_eval(subparsers)
    from pipeline.tune_cli import register as register_tune

    register_tune(subparsers)
    from benchmarks.cli import register as register_bench

    register_bench(subparsers)
    from cluster.submit import register as register_submit

    register_submit(subparsers)
    from pipeline.compare import register as register_compare

    register_compare(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline import quiet

    quiet.install(verbose=args.verbose)  # before any command imports Lightning or Ray
    from bihm.errors import UserError

    try:
        return int(args.func(args) or 0)
    except (UserError, OSError) as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line
        command = " ".join(filter(None, [args.command, getattr(args, "data_command", None)]))
        print(f"bihm {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
