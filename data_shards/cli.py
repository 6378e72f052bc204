"""`bihm data ...` sub-commands: prepare the shards, benchmark the loader."""

from __future__ import annotations

import argparse
import json

from data_shards import DATASETS
from data_shards.argtypes import int_list, positive_int


def _prepare(args: argparse.Namespace) -> int:
    from data_shards.shards import prepare

    prepare(
        args.out,
        args.source,
        dataset=args.dataset,
        shard_size=args.shard_size,
        seed=args.seed,
        progress=not args.no_progress,
        out_name="--out",  # checked for writing before any data is read
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.json:
        from bihm.atomic import check_writable

        check_writable(args.json, "--json")  # before the measurement, not after it
    from data_shards.bench import bench_loader, format_rows

    results = bench_loader(
        args.shards, workers=args.workers, batch_size=args.batch_size, epochs=args.epochs
    )
    print("\n".join(format_rows(results)))
    if args.json:
        from bihm.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare and benchmark the sharded data set")
    data.set_defaults(func=lambda args: data.print_help())
    commands = data.add_subparsers(dest="data_command")

    prep = commands.add_parser(
        "prepare",
        help="acquire (binarized) MNIST, verify it and write WebDataset shards + manifest.json",
    )
    prep.add_argument(
        "--source",
        default=None,
        help="mirror folder, or http(s)/file base URL (default: $BIHM_DATA_SOURCE, "
        "$BIHM_MNIST_SOURCE for mnist_*, else download from the canonical URL)",
    )
    prep.add_argument("--out", required=True, help="output folder for the shards")
    prep.add_argument("--shard-size", type=positive_int, default=10_000, help="samples per shard")
    prep.add_argument("--dataset", choices=DATASETS, default="binarized_mnist")
    prep.add_argument("--seed", type=int, default=0, help="seed of the static binarization")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=_prepare)

    bench = commands.add_parser("bench", help="measure the training loader's samples/s")
    bench.add_argument("--shards", required=True, help="folder written by `bihm data prepare`")
    bench.add_argument(
        "--workers",
        type=int_list(minimum=0),
        default=[0, 1, 2],
        help="comma-separated DataLoader worker counts (default 0,1,2)",
    )
    bench.add_argument("--batch-size", type=positive_int, default=100)
    bench.add_argument(
        "--epochs", type=positive_int, default=2, help="epochs timed per worker count"
    )
    bench.add_argument("--json", default=None, help="also write the results to this JSON file")
    bench.set_defaults(func=_bench)


def main(argv: list[str] | None = None) -> int:
    """`python -m data_shards.cli data ...`: the same sub-commands without the rest of `bihm`."""
    parser = argparse.ArgumentParser(prog="bihm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
