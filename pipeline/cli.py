"""The `bihm` command line: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bihm", description="Train and evaluate Bidirectional Helmholtz Machines."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    from data_shards.cli import register as register_data

    register_data(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
