"""`bihm data ...` sub-commands (placeholder until the data issue lands)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare and benchmark the sharded data set")
    data.set_defaults(func=lambda args: data.print_help())
