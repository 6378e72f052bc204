"""Subsets of a data set chosen by example index alone.

A subset that is a function of the global index i only is the same on every rank, in every
batch and every epoch, so that distributed training and evaluation see the same examples
as one process. Two kinds:

- spread subsets: n of the `count` indices, spread evenly (floor(j * count / n), j < n): a
  split's `limit` (data_shards) and the validation images that Gibbs inpainting scores
  (bihm.lightning). The standard binarized MNIST test file is sorted by class
  (`bihm-math.md`, "The data's order"), so a subset taken from its start is not representative.
- the labelled subset of semi-supervised training: frac(i * phi) < fraction.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def spread_indices(count: int, n: int) -> np.ndarray:
    """n indices spread evenly over range(count): floor(j * count / n) for j < n.

    A subset of a split (`limit`) must represent the whole split: the standard binarized
    MNIST test file is sorted by class, so its first images are all zeros.
    """
    n = min(n, count)
    return np.arange(n, dtype=np.int64) * count // n


def in_spread_subset(idx: np.ndarray | int, count: int, n: int) -> np.ndarray | bool:
    """Whether idx is one of `spread_indices(count, n)`, without listing them."""
    n = min(n, count)
    j = subset_position(idx, count, n)  # ceil(idx * n / count)
    return (j < n) & (j * count // n == np.asarray(idx))


def subset_position(idx: np.ndarray | int, count: int, n: int) -> np.ndarray | int:
    """The position j in `spread_indices(count, n)` of an index that is in it."""
    n = min(n, count)
    return -(-np.asarray(idx, dtype=np.int64) * n // count)


def labelled(idx: Tensor, fraction: float) -> Tensor:
    """Which training examples keep their label (semi-supervised training): frac(idx * phi)
    < fraction, with phi the golden ratio. A function of the index alone (the same examples
    every epoch, on every rank), and close to the fraction over any range of consecutive
    indices (a low-discrepancy sequence), so a data subset keeps the fraction too."""
    return torch.frac(idx.double() * ((1 + math.sqrt(5)) / 2)) < fraction
