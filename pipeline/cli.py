"""The `bihm` command line: one entry point, one sub-command per job."""

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
    from pipeline.config import ConfigError, apply_overrides, config_from_dict, load_config
    from pipeline.train import TrainingError, config_for_resume, run_training

    try:
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
    except (ConfigError, TrainingError) as err:
        print(f"bihm train: error: {err}", file=sys.stderr)
        return 2
    if result["global_rank"] == 0:
        print(
            f"bihm train: done after {result['epochs']} epochs; best validation log p~* "
            f"{result['best']} at {result['best_path']}; run folder {result['run_dir']}"
        )
    return 0


def _add_train(subparsers) -> None:
    from pipeline.config import add_override_argument

    p = subparsers.add_parser(
        "train", help="train a BiHM (default config: configs/bmnist_paper.yaml)"
    )
    p.add_argument("--config", type=Path, default=None, help="YAML config file")
    add_override_argument(p, "override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--devices", type=int, default=None, help="processes per node")
    p.add_argument("--num-nodes", type=int, default=None)
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
        "--workers", type=int, default=None, help="training processes (default devices x nodes)"
    )
    ray.add_argument("--cpus-per-worker", type=float, default=None, help="default 1")
    ray.add_argument(
        "--gpus-per-worker",
        type=float,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bihm", description="Train and evaluate Bidirectional Helmholtz Machines."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    from data_shards.cli import register as register_data

    register_data(subparsers)
    _add_train(subparsers)
    from pipeline.evaluate import register as register_eval

    register_eval(subparsers)
    from benchmarks.cli import register as register_bench

    register_bench(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
