"""`bihm bench`: see benchmarks/bench.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.argtypes import positive_float, positive_int


def _bench(args: argparse.Namespace) -> int:
    from bihm.atomic import check_writable

    # Outputs first: a typo must not cost the minutes of measurement.
    if args.json is not None:
        check_writable(args.json, "--json")
    if not args.no_epoch and not (Path(args.shards) / "manifest.json").is_file():
        from data_shards.shards import raw_folder_error

        raw_folder_error(args.shards, "--shards")
        check_writable(args.shards, "--shards", folder=True)  # the epoch prepares them there

    import torch

    from benchmarks.bench import format_table, run, write_json

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bihm bench: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    epoch = None
    if not args.no_epoch:
        epoch = {
            "shard_dir": args.shards,
            "limit": args.epoch_limit,
            "contention": not args.no_contention,
        }
    result = run(
        args.device, min_time=args.min_time, epoch=epoch, compare_compiled=not args.no_compiled
    )
    print(format_table(result))
    if args.json is not None:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="measure training/evaluation throughput")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument(
        "--min-time",
        type=positive_float,
        default=3.0,
        help="seconds of repeats per workload (median)",
    )
    p.add_argument(
        "--shards",
        type=Path,
        default=Path("data/binarized_mnist"),
        help="prepared shards for the whole-epoch measurement (prepared if missing)",
    )
    p.add_argument("--no-epoch", action="store_true", help="skip the whole-epoch measurement")
    p.add_argument(
        "--no-contention", action="store_true", help="skip the epoch beside a busy-loop process"
    )
    p.add_argument(
        "--no-compiled",
        action="store_true",
        help="skip the comparison with train.compile: true (it compiles for minutes)",
    )
    p.add_argument(
        "--epoch-limit",
        type=positive_int,
        default=None,
        help="train/valid images of the epoch (tests)",
    )
    p.set_defaults(func=_bench)
