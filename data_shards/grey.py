"""The grey MNIST images behind the fixed binarized MNIST training set, for dynamic
binarization of the same 50,000 training images (`data.binarization: dynamic`).

The standard binarized MNIST (Larochelle & Murray 2011) drew each pixel once,
x_i ~ Bern(g_i / 255), from a grey MNIST image g. Its order is not MNIST's (checked on the
mirrors: training image i and MNIST training image i share nothing, the same-index pairing
scores no better than a shifted one), and its training and validation images are mixed
from all 60,000 MNIST training images. So each fixed image is matched to the grey image it
was most likely drawn from,

    j(i) = argmax_j  sum_pixels [x_i log g_j + (1 - x_i) log(1 - g_j)],

among grey images that could have given it at all (no pixel with x = 1 where g = 0, or
x = 0 where g = 255). Training and validation images are matched together, one to one,
clearest first, so that a grey image that a validation image came from is not used for
training. On the mirrors the best match wins by a median of 92 nats; about 10% are
near-ties (thin digits that several look-alike grey images explain within 20 nats), where
any of the tied candidates is a source the fixed image could have come from. The grey
images are written in the fixed set's order, so index i is the same digit in both folders.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from data_shards.sources import DataError

# Candidates kept per binary image, and how far below its best log-likelihood an assigned
# candidate may lie. A thin digit (a "1") has few uncertain pixels, so several grey images
# of the same shape explain it within a few nats: those near-ties are why the matching is a
# one-to-one assignment and not a per-image argmax.
CANDIDATES = 4
MAX_SHORTFALL_NATS = 10.0
# A match that wins by this many nats is unambiguous (most do, by ~90 nats).
CLEAR_MARGIN_NATS = 20.0
# log(0) is clipped to log(EPS) for the scores; impossible pixels are counted separately.
EPS = 1e-4


def _candidates(
    binary: np.ndarray, grey: np.ndarray, chunk: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CANDIDATES best grey images of each binary image: (indices, log-likelihoods,
    impossible-pixel counts), each (N, CANDIDATES), best first."""
    import torch

    x = torch.as_tensor(binary, dtype=torch.float32)
    g = torch.as_tensor(grey, dtype=torch.float32) / 255.0
    log1 = g.clamp_min(EPS).log()
    log0 = (1 - g).clamp_min(EPS).log()
    # sum x log g + (1 - x) log(1 - g) = x . (log g - log(1 - g)) + sum log(1 - g)
    slope, offset = (log1 - log0).T.contiguous(), log0.sum(1)
    zero, full = (g == 0).float(), (g == 1).float()
    n = len(x)
    idx = np.empty((n, CANDIDATES), dtype=np.int64)
    ll = np.empty((n, CANDIDATES), dtype=np.float64)
    bad = np.empty((n, CANDIDATES), dtype=np.int64)
    bar = _progress(n, progress)
    for lo in range(0, n, chunk):
        xb = x[lo : lo + chunk]
        top = (xb @ slope + offset).topk(CANDIDATES, dim=1)
        j = top.indices
        idx[lo : lo + chunk] = j.numpy()
        ll[lo : lo + chunk] = top.values.double().numpy()
        # x = 1 where g = 0, or x = 0 where g = 255: a pixel this grey image cannot give.
        impossible = (xb[:, None, :] * zero[j]).sum(-1) + ((1 - xb[:, None, :]) * full[j]).sum(-1)
        bad[lo : lo + chunk] = impossible.long().numpy()
        if bar is not None:
            bar.update(len(xb))
    if bar is not None:
        bar.close()
    return idx, ll, bad


def match_grey_sources(
    binary: np.ndarray, grey: np.ndarray, chunk: int = 1000, progress: bool = False
) -> tuple[np.ndarray, dict[str, int]]:
    """For each binary image (N, 784) in {0, 1}, the index of the grey image (M, 784),
    0..255, it was drawn from; and counts of how clear the matches were.

    Images are assigned in the order of their margin over the runner-up (clearest first),
    each to its best candidate not yet taken. An image whose candidates are all taken is a
    near-tie among look-alike grey images (a thin "1" that several explain within a few
    nats, on the real data 44 of 60,000): it gets its best candidate, shared, and is counted.
    Raises DataError when an image has no candidate without impossible pixels within
    MAX_SHORTFALL_NATS of its best: then the grey images are not its source.
    """
    idx, ll, bad = _candidates(binary, grey, chunk, progress)
    usable = (bad == 0) & (ll[:, :1] - ll <= MAX_SHORTFALL_NATS)
    failed = int((~usable.any(1)).sum())
    if failed:
        raise DataError(
            f"{failed} of {len(idx)} binarized images match no grey image (no candidate "
            f"without impossible pixels within {MAX_SHORTFALL_NATS} nats of the best): "
            "is the grey source the MNIST they were binarized from?"
        )
    margin = ll[:, 0] - ll[:, 1]
    match = np.full(len(idx), -1, dtype=np.int64)
    taken: set[int] = set()
    second_choice = 0
    for i in np.argsort(-margin, kind="stable"):
        for c in np.flatnonzero(usable[i]):
            j = int(idx[i, c])
            if j not in taken:
                match[i] = j
                taken.add(j)
                second_choice += c > 0
                break
    shared = np.flatnonzero(match < 0)
    match[shared] = idx[shared, usable[shared].argmax(1)]  # the best usable candidate
    stats = {
        "images": len(idx),
        "clear": int((margin >= CLEAR_MARGIN_NATS).sum()),
        "near_ties": int((margin < CLEAR_MARGIN_NATS).sum()),
        "not_first_choice": int(second_choice),
        "shared": len(shared),
    }
    return match, stats


def _progress(total: int, show: bool):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="matching grey sources", unit="img", file=sys.stderr)


def _mnist_source(source: str | os.PathLike | None) -> str | os.PathLike | None:
    """The raw MNIST mirror: $BIHM_MNIST_SOURCE, or an `mnist/` folder inside or beside
    the binarized mirror (shared/datasets/{binarized_mnist,mnist}/); None: the default."""
    from data_shards import sources

    if os.environ.get(sources.MNIST_SOURCE_ENV):
        return os.environ[sources.MNIST_SOURCE_ENV]
    base = source if source is not None else os.environ.get(sources.SOURCE_ENV)
    if base is None or sources.is_url(base):
        return None
    for folder in (Path(base) / "mnist", Path(base).parent / "mnist"):
        if folder.is_dir():
            return folder
    return None


def prepare_grey(
    out_dir: str | os.PathLike,
    source: str | os.PathLike | None = None,
    *,
    shard_size: int = 10_000,
    progress: bool = True,
) -> dict:
    """Write the grey sources of the fixed binarized training images, in their order, as
    a "train" split of intensities that the reader binarizes afresh every epoch."""
    from data_shards import sources
    from data_shards.shards import MANIFEST, _acquire, load_manifest, verify_shards, write_shards

    out_dir = Path(out_dir)
    identity = {
        "dataset": "binarized_mnist_grey",
        "shard_size": shard_size,
        "source_hash": sources.combined_hash(
            {
                "binarized_mnist": sources.binarized_mnist_source_hash(),
                "mnist": sources.mnist_source_hash(),
            }
        ),
    }
    try:
        manifest = load_manifest(out_dir)
        verify_shards(out_dir, manifest)
        if all(manifest.get(k) == v for k, v in identity.items()):
            print(f"{out_dir / MANIFEST}: up to date (binarized_mnist_grey), nothing to do")
            return manifest
    except (OSError, ValueError):
        pass
    fixed = _acquire("binarized_mnist", source, out_dir)
    mnist = _acquire("mnist_dynamic", _mnist_source(source), out_dir)
    grey = np.concatenate([mnist.splits["train"], mnist.splits["valid"]])  # all 60,000
    # Training and validation images together: a grey image that a validation image was
    # drawn from must never become a training image's source.
    both = np.concatenate([fixed.splits["train"], fixed.splits["valid"]])
    match, stats = match_grey_sources(both, grey, progress=progress)
    match = match[: len(fixed.splits["train"])]
    manifest = write_shards(
        {"train": grey[match]},
        out_dir,
        shard_size=shard_size,
        source_hash=identity["source_hash"],
        progress=progress,
        binarization="dynamic",
        metadata={
            "dataset": identity["dataset"],
            # Which MNIST training image (0..59999) each fixed training image came from.
            "match_sha256": hashlib.sha256(match.astype("<i8").tobytes()).hexdigest(),
            "content_sha256": {"train": sources.array_sha256(grey[match])},
            "match_stats": stats,
        },
    )
    print(
        f"{out_dir / MANIFEST}: wrote the grey sources of {len(match)} training images "
        f"(of {stats['images']} train + valid matches: {stats['clear']} clear, "
        f"{stats['near_ties']} near-ties, {stats['not_first_choice']} not first choice, "
        f"{stats['shared']} sharing a source)"
    )
    return manifest
