"""Pictures: digit grids (samples, inpainting) and learning curves, written atomically."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bihm.atomic import atomic_path  # noqa: E402

IMAGE_SHAPE = (28, 28)


def _atomic_savefig(fig, path: str | os.PathLike) -> None:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(
                tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=100, bbox_inches="tight"
            )
    finally:
        plt.close(fig)


def tile(images: torch.Tensor | np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """(n, 784) -> one 2-D array with the digits on a grid, separated by `pad` grey pixels."""
    images = np.asarray(torch.as_tensor(images).detach().cpu().float())
    n = images.shape[0]
    h, w = IMAGE_SHAPE
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad), 0.5, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = images[i].reshape(h, w)
    return grid


def save_panels(
    path: str | os.PathLike,
    panels: Sequence[tuple[str, np.ndarray]],
    title: str | None = None,
) -> None:
    """Side-by-side grey-scale panels [(title, 2-D array)], e.g. from `tile`."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    for ax, (name, grid) in zip(axes[0], panels, strict=True):
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    _atomic_savefig(fig, path)


def save_curves(path: str | os.PathLike, rows: Sequence[dict[str, float]]) -> None:
    """Learning curves from metrics rows (one per epoch): log-likelihoods, 2 log Z, errors."""
    epochs = [r["epoch"] for r in rows]

    def series(key):
        return [r.get(key, float("nan")) for r in rows]

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    ax = axes[0]
    for key, label in [
        ("train/log_ptilde_star", "train log p~* (K train)"),
        ("val/log_ptilde_star", "val log p~*"),
        ("val/log_p", "val log p"),
        ("val/log_pstar", "val log p*"),
    ]:
        ax.plot(epochs, series(key), marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats")
    ax.legend(fontsize=8)
    ax.set_title("log-likelihood estimates")
    axes[1].plot(epochs, series("val/two_log_z"), marker=".")
    axes[1].set_xlabel("epoch")
    axes[1].set_title("2 log Z (validation estimate)")
    ax = axes[2]
    for key, label in [("val/gibbs_error", "Gibbs p* inpainting"), ("val/recon_error", "q-then-p")]:
        xs = [e for e, v in zip(epochs, series(key), strict=True) if not math.isnan(v)]
        ys = [v for v in series(key) if not math.isnan(v)]
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_title("masked-pixel error rate (bottom half)")
    ax.legend(fontsize=8)
    ax = axes[3]
    for key, label in [("train_time_s", "training"), ("val_time_s", "validation")]:
        ax.plot(epochs, series(key), marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("seconds")
    ax.set_title("time per epoch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic_savefig(fig, path)


def save_trial_curves(
    path: str | os.PathLike,
    trials: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    metric: str,
    best: str | None = None,
    title: str | None = None,
) -> None:
    """A sweep's metric against the epoch, one line per trial [(label, epochs, values)];
    the trial labelled `best` drawn thick. Legend only up to 12 trials (else the best)."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for label, epochs, values in trials:
        is_best = label == best
        ax.plot(
            epochs,
            values,
            marker=".",
            linewidth=3 if is_best else 1,
            alpha=1 if is_best else 0.7,
            label=("best: " if is_best else "") + label if is_best or len(trials) <= 12 else None,
            zorder=3 if is_best else 2,
        )
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _atomic_savefig(fig, path)
