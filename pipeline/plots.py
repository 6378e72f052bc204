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
    """Learning curves from metrics rows (one per epoch): log-likelihoods (all epochs, then
    the validation estimates over the later half, where the first panel's scale hides the
    differences), 2 log Z, inpainting errors (when Gibbs validation ran) and epoch times."""
    epochs = [r["epoch"] for r in rows]

    def series(key):
        return [r.get(key, float("nan")) for r in rows]

    def measured(key):
        pairs = [(e, v) for e, v in zip(epochs, series(key), strict=True) if not math.isnan(v)]
        return [e for e, _ in pairs], [v for _, v in pairs]

    has_errors = any(measured(key)[0] for key in ("val/gibbs_error", "val/recon_error"))
    has_gap = bool(measured("train_eval/log_pstar")[0])
    panels = 4 + has_errors + has_gap
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    axes = list(axes)
    ax = axes.pop(0)
    validation = [
        ("val/log_ptilde_star", "val log p~*"),
        ("val/log_p", "val log p"),
        ("val/log_pstar", "val log p*"),
    ]
    for key, label in [("train/log_ptilde_star", "train log p~* (K train)"), *validation]:
        ax.plot(epochs, series(key), marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats")
    ax.legend(fontsize=8)
    ax.set_title("log-likelihood estimates")
    ax = axes.pop(0)
    half = epochs[len(epochs) // 2] if epochs else 0
    for i, (key, label) in enumerate(validation, start=1):
        xs, ys = measured(key)
        late = [(e, v) for e, v in zip(xs, ys, strict=True) if e >= half]
        # The colours of the first panel (its C0 is the training curve).
        ax.plot([e for e, _ in late], [v for _, v in late], marker=".", color=f"C{i}", label=label)
    # Mark where optim.switch changed the learning rate or K: a step in the curves often
    # starts there. A schedule changes the lr every epoch; its lines would only be clutter.
    lrs, Ks = series("train/lr"), series("train/K")
    switches = [
        j
        for j in range(1, len(rows))
        if epochs[j] >= half
        and not (math.isnan(lrs[j - 1]) or math.isnan(Ks[j - 1]))
        and (lrs[j] != lrs[j - 1] or Ks[j] != Ks[j - 1])
    ]
    for j in switches if len(switches) <= 3 else []:
        ax.axvline(epochs[j], color="grey", linestyle=":", linewidth=1)
        ax.annotate(
            f" lr {lrs[j]:.0e}, K {Ks[j]:.0f}",
            (epochs[j], 0.02),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color="grey",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats")
    ax.set_title(f"validation estimates from epoch {half:.0f}")
    ax.legend(fontsize=8)
    if has_gap:
        _gap_panel(axes.pop(0), measured)
    ax = axes.pop(0)
    ax.plot(epochs, series("val/two_log_z"), marker=".")
    ax.set_xlabel("epoch")
    ax.set_title("2 log Z (validation estimate)")
    if has_errors:
        ax = axes.pop(0)
        for key, label in [
            ("val/gibbs_error", "Gibbs p* inpainting"),
            ("val/recon_error", "q-then-p"),
        ]:
            ax.plot(*measured(key), marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_title("masked-pixel error rate (bottom half)")
        ax.legend(fontsize=8)
    ax = axes.pop(0)
    for key, label in [("train_time_s", "training"), ("val_time_s", "validation")]:
        ax.plot(epochs, series(key), marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("seconds")
    ax.set_title("time per epoch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic_savefig(fig, path)


def _gap_panel(ax, measured) -> None:
    """Training images against validation images, both scored at validation's K with the
    same 2 log Z (train_eval/* and val/*), and the gap between them on a second axis: the
    generalization gap, which the K-train, epoch-averaged train/* columns cannot show."""
    for key, label, color in [
        ("train_eval/log_pstar", "train images log p*", "C0"),
        ("val/log_pstar", "validation log p*", "C3"),
    ]:
        ax.plot(*measured(key), marker=".", color=color, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats")
    twin = ax.twinx()
    twin.plot(*measured("gap/log_pstar"), color="grey", linestyle="--", label="gap (right)")
    twin.set_ylabel("train - validation (nats)")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    ax.set_title("training vs validation at equal K")


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
