"""argparse types for `bihm`'s numeric flags, for pipeline's and benchmarks' commands.

They live in data_shards/argtypes.py, the lowest package whose commands use them (`bihm
data`): a package imports only the ones below it (tests/test_layering.py).
"""

from __future__ import annotations

from data_shards.argtypes import (
    int_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

__all__ = ["int_list", "non_negative_float", "non_negative_int", "positive_float", "positive_int"]
