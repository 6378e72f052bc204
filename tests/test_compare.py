"""`bihm compare`: runs side by side at their last common epoch, and a plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main


def _run(folder: Path, values: dict[int, str]) -> Path:
    folder.mkdir(parents=True)
    lines = ["epoch,val/log_pstar,train/loss"]
    lines += [f"{epoch},{value},1.0" for epoch, value in values.items()]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_compare_uses_the_last_common_epoch_and_plots(tmp_path, capsys):
    a = _run(tmp_path / "base", {3: "-90.0", 4: "-89.5", 5: "-89.4", 6: "-89.3"})
    b = _run(tmp_path / "lr3e-4", {3: "-90.0", 4: "-89.2", 5: "-89.1"})
    out = tmp_path / "cmp.png"
    assert main(["compare", str(a), str(b), "--from-epoch", "4", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["base", "epoch", "5", "val/log_pstar", "-89.400"]
    assert lines[1].split() == ["lr3e-4", "epoch", "5", "val/log_pstar", "-89.100"]
    assert out.stat().st_size > 0


def test_compare_labels_name_the_runs_in_order(tmp_path, capsys):
    a = _run(tmp_path / "base", {4: "-89.5"})
    b = _run(tmp_path / "l1", {4: "-89.2"})
    assert main(["compare", str(a), str(b), "--label", "earlier run", "--label", "L1 1e-5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("earlier run ") and lines[0].split()[-1] == "-89.500"
    assert lines[1].startswith("L1 1e-5 ") and lines[1].split()[-1] == "-89.200"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing"], "no metrics.csv"),
        (["base", "--metric", "val/nope"], "no column 'val/nope'"),
        (["base", "--from-epoch", "9"], "share no epoch"),
        (["base", "--label", "a", "--label", "b"], "--label: 2 labels for 1 runs"),
    ],
)
def test_compare_bad_input_is_one_line(tmp_path, capsys, monkeypatch, args, message):
    _run(tmp_path / "base", {0: "-90.0"})
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
