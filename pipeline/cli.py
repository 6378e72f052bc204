"""The `bihm` command line: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, apply_overrides, config_from_dict, load_config
    from pipeline.train import TrainingError, config_for_resume, run_training

    try:
        if args.resume and args.config is None:
            # Continue with the config the run was started with (plus any --set).
            run_dir = args.run_dir or load_config(None).resolved_run_dir()
            cfg = config_from_dict(apply_overrides(config_for_resume(run_dir).to_dict(), args.set))
        else:
            cfg = load_config(args.config, args.set)
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
    from cluster.submit import register as register_submit

    register_submit(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
