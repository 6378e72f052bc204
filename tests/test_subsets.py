"""bihm/subsets.py: subsets of a data set chosen by example index alone."""

from __future__ import annotations

import math

import numpy as np
import torch

from bihm.subsets import in_spread_subset, labelled, spread_indices, subset_position


def test_a_limited_subset_spans_the_whole_split():
    """The standard test split is sorted by class: a subset must not be its first images."""
    for count, n in ((10_000, 100), (97, 10), (10, 10), (5, 9), (1000, 999)):
        idx = spread_indices(count, n)
        assert len(idx) == min(n, count) == len(set(idx.tolist()))
        m = min(n, count)
        assert idx[0] == 0 and idx[-1] >= count - -(-count // m)  # reaches the end
        gaps = np.diff(idx)
        assert gaps.max() - gaps.min() <= 1 if len(gaps) else True  # evenly spread
        member = in_spread_subset(np.arange(count), count, n)
        assert np.flatnonzero(member).tolist() == idx.tolist()
        assert subset_position(idx, count, n).tolist() == list(range(m))


def test_labelled_examples_depend_on_the_index_alone_and_keep_the_fraction_locally():
    """Semi-supervised training keeps the label of frac(i * phi) < fraction: the same
    examples in any order, and close to the fraction in every run of consecutive indices
    (a Kronecker sequence: its discrepancy grows like log w, where an independent draw per
    example would be off by ~sqrt(w f (1 - f)), 50 examples at w = 10,000, f = 1/2)."""
    idx = torch.arange(60_000)
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))
    for fraction in (0.05, 0.3, 0.5, 0.9):
        keep = labelled(idx, fraction)
        assert torch.equal(labelled(idx[perm], fraction), keep[perm])
        counts = torch.cat([torch.zeros(1), keep.double().cumsum(0)])
        for w in (10, 100, 1000, 10_000):
            worst = ((counts[w:] - counts[:-w]) - fraction * w).abs().max().item()
            assert worst <= 1 + math.log(w), (fraction, w, worst)
    assert not labelled(idx, 0.0).any() and labelled(idx, 1.0).all()
