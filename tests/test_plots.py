"""Learning-curve pictures: the panels drawn follow the metrics a run has."""

from __future__ import annotations

import math

import pytest

from pipeline import plots


@pytest.fixture
def drawn(monkeypatch):
    """The figures save_curves draws, instead of PNG files."""
    figures = []
    monkeypatch.setattr(plots, "_atomic_savefig", lambda fig, path: figures.append(fig))
    return figures


def _rows(n, lr=lambda e: 1e-3, gibbs_every=0):
    return [
        {
            "epoch": float(e),
            "train/log_ptilde_star": -100.0 + e,
            "val/log_ptilde_star": -101.0 + e,
            "val/log_p": -99.0 + e,
            "val/log_pstar": -98.0 + e,
            "val/two_log_z": -3.0,
            "train/lr": lr(e),
            "train/K": 10.0,
            "val/gibbs_error": 0.2 if gibbs_every and e % gibbs_every == 0 else math.nan,
            "val/recon_error": 0.3 if gibbs_every and e % gibbs_every == 0 else math.nan,
            "train_time_s": 30.0,
            "val_time_s": 10.0,
        }
        for e in range(n)
    ]


def _switch_lines(fig):
    zoom = fig.axes[1]
    return [line for line in zoom.lines if line.get_linestyle() == ":"]


def test_inpainting_panel_only_when_gibbs_validation_ran(drawn):
    plots.save_curves("unused.png", _rows(20))
    plots.save_curves("unused.png", _rows(20, gibbs_every=5))
    without, with_errors = drawn
    titles = [ax.get_title() for ax in with_errors.axes]
    assert len(without.axes) == 4 and len(with_errors.axes) == 5
    assert "masked-pixel error rate (bottom half)" in titles
    assert titles[1] == "validation estimates from epoch 10"  # the later half, zoomed


def test_an_lr_switch_is_marked_but_a_schedule_is_not(drawn):
    plots.save_curves("unused.png", _rows(20, lr=lambda e: 1e-3 if e < 15 else 3e-4))
    plots.save_curves("unused.png", _rows(20, lr=lambda e: 1e-3 * 0.9**e))
    switched, scheduled = drawn
    lines = _switch_lines(switched)
    assert len(lines) == 1 and list(lines[0].get_xdata()) == [15.0, 15.0]
    assert _switch_lines(scheduled) == []


def test_gap_panel_shows_training_against_validation_at_equal_k(drawn):
    rows = _rows(10)
    for r in rows:
        r["train_eval/log_pstar"] = r["val/log_pstar"] + 0.1 * r["epoch"]
        r["gap/log_pstar"] = 0.1 * r["epoch"]
    plots.save_curves("unused.png", _rows(10))
    plots.save_curves("unused.png", rows)
    without, with_gap = drawn
    assert len(with_gap.axes) == len(without.axes) + 2  # the panel and its twin axis
    panel = next(
        ax for ax in with_gap.axes if ax.get_title() == "training vs validation at equal K"
    )
    labels = [line.get_label() for line in panel.lines]
    assert labels == ["train images log p*", "validation log p*"]
    twin = next(ax for ax in with_gap.axes if ax.get_ylabel() == "train - validation (nats)")
    assert list(twin.lines[0].get_ydata()) == pytest.approx([0.1 * e for e in range(10)])
