"""Hints name the right folder: a raw-data folder is never offered as a place for shards,
a checkpoint's relative data folder is found beside the run it came from, a shard folder
that cannot be written is not blamed on the data source, a new shard folder is announced
with where it is, and the resume hint has its `make` form under `make train`."""

from __future__ import annotations

import errno
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from bihm.errors import UserError
from data_shards import load_manifest
from data_shards.sources import DataError, RawData
from pipeline.cli import main
from pipeline.config import config_from_dict
from tests.conftest import make_shards, tiny_config


def raw_mirror(folder: Path, kind: str = "amat") -> Path:
    """A folder laid out like a raw-data mirror (the names are what matter here)."""
    folder.mkdir(parents=True)
    names = (
        [f"binarized_mnist_{s}.amat.gz" for s in ("train", "valid", "test")]
        if kind == "amat"
        else ["train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"]
    )
    for name in names:
        (folder / name).write_bytes(gzip.compress(b"0 1\n"))
    return folder


# --------------------------------------------------------------------------- raw data
@pytest.mark.parametrize("kind", ["amat", "idx"])
def test_a_raw_mirror_as_shards_suggests_another_output_folder(tmp_path, kind):
    raw = raw_mirror(tmp_path / "mirror", kind)
    with pytest.raises(DataError) as info:
        load_manifest(raw)
    message = str(info.value)
    assert f"--source {raw}" in message and "holds raw data" in message, message
    assert f"--out {raw}" not in message, message
    out = "data/binarized_mnist" if kind == "amat" else "data/mnist_dynamic"
    assert f"--out {out}`" in message, message


def test_eval_and_prepare_never_write_into_a_raw_mirror(tmp_path, capsys):
    from bihm import BiHM

    raw = raw_mirror(tmp_path / "mirror")
    before = sorted(raw.iterdir())
    BiHM([784, 8, 4]).save(tmp_path / "m.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--shards", str(raw)]) == 2
    assert main(["data", "prepare", "--out", str(raw), "--source", str(raw)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(f"--out {raw}`" not in line for line in lines), lines
    assert lines[1].startswith(f"bihm data prepare: error: --out {raw} holds raw data"), lines
    assert sorted(raw.iterdir()) == before  # not even a probe file was written there


def test_training_on_a_raw_mirror_prepares_nothing_there(tmp_path, monkeypatch):
    from pipeline.train import ensure_shards

    raw = raw_mirror(tmp_path / "mirror")
    monkeypatch.setattr("data_shards.prepare", pytest.fail)
    with pytest.raises(DataError, match="holds raw data"):
        ensure_shards(raw)


# --------------------------------------------------------------------------- eval elsewhere
@pytest.fixture
def project(tmp_path) -> dict[str, Path]:
    """A training project: shards in data/bm and a checkpoint in runs/tiny/checkpoints/,
    with the relative paths a `bihm train` started in that folder stores in its config."""
    root = tmp_path / "project"
    make_shards(root / "data" / "bm", n_train=200, n_valid=50, n_test=50)
    cfg = config_from_dict(tiny_config(Path("data/bm"), Path("runs/tiny")))
    from bihm.lightning import BiHMModule

    module = BiHMModule(cfg.to_dict())
    ckpt = root / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": {"config": cfg.to_dict()}}, ckpt
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return {"root": root, "ckpt": ckpt, "elsewhere": elsewhere}


def test_eval_from_another_folder_finds_the_runs_data(project, monkeypatch, capsys):
    from pipeline.evaluate import load_checkpoint

    monkeypatch.chdir(project["elsewhere"])
    _, cfg = load_checkpoint(project["ckpt"], needs_shards=True)
    assert Path(cfg.data.shard_dir) == project["root"] / "data" / "bm"
    json_path = project["elsewhere"] / "e.json"
    argv = ["eval", "--checkpoint", str(project["ckpt"]), "--limit", "4", "--samples", "1"]
    argv += ["--z-samples", "20", "--z-chunk", "10", "--no-progress", "--json", str(json_path)]
    assert main(argv) == 0, capsys.readouterr().err
    assert json_path.is_file()


def test_the_current_folder_comes_first(project, monkeypatch):
    from pipeline.evaluate import load_checkpoint

    make_shards(project["elsewhere"] / "data" / "bm", n_train=200, n_valid=50, n_test=50)
    monkeypatch.chdir(project["elsewhere"])
    assert load_checkpoint(project["ckpt"], needs_shards=True)[1].data.shard_dir == "data/bm"
    # --shards (or --set data.shard_dir) is the user's own path: taken as given.
    _, cfg = load_checkpoint(project["ckpt"], ["data.shard_dir=other"])
    assert cfg.data.shard_dir == "other"


def test_shards_found_nowhere_name_what_was_tried_and_the_runs_folder(project, monkeypatch):
    from pipeline.evaluate import load_checkpoint

    shards = project["root"] / "data" / "bm"
    shards.rename(project["root"] / "data" / "moved")
    monkeypatch.chdir(project["elsewhere"])
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(project["ckpt"], needs_shards=True)
    message = str(info.value)
    assert str(project["elsewhere"] / "data" / "bm") in message, message  # tried here
    assert "--shards" in message and f"--out {shards}`" in message, message
    # `bihm sample` needs no data: the same checkpoint loads.
    assert load_checkpoint(project["ckpt"])[1].data.shard_dir == "data/bm"


# --------------------------------------------------------------------------- ensure_shards
def tiny_raw() -> RawData:
    rng = np.random.default_rng(0)
    splits = {s: (rng.random((20, 784)) < 0.3).astype(np.uint8) for s in ("train", "valid", "test")}
    return RawData(splits, "test-source")


def test_an_unwritable_shard_folder_is_not_blamed_on_the_source(tmp_path, monkeypatch):
    """The source is fine (a stand-in); the shard folder lies below a regular file."""
    from pipeline.train import ensure_shards

    monkeypatch.setenv("BIHM_DATA_SOURCE", str(tmp_path))
    monkeypatch.setattr("data_shards.shards._acquire", lambda *a, **k: tiny_raw())
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError) as info:
        ensure_shards(tmp_path / "a_file" / "shards")
    message = str(info.value)
    assert message.startswith(f"data.shard_dir {tmp_path / 'a_file' / 'shards'}: cannot write")
    assert "BIHM_DATA_SOURCE" not in message, message
    # The grey images of dynamic binarization live in a folder of their own config key.
    with pytest.raises(UserError, match=r"^data\.grey_shard_dir .*: cannot write"):
        ensure_shards(tmp_path / "a_file" / "grey", "binarized_mnist_grey")


def test_a_failed_write_after_reading_the_source_is_not_blamed_on_it(tmp_path, monkeypatch):
    from pipeline.train import ensure_shards

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv("BIHM_DATA_SOURCE", str(tmp_path))
    monkeypatch.setattr("data_shards.shards._acquire", lambda *a, **k: tiny_raw())
    monkeypatch.setattr("data_shards.shards.write_shards", disk_full)
    with pytest.raises(UserError) as info:
        ensure_shards(tmp_path / "shards")
    assert "No space left" in str(info.value) and "BIHM_DATA_SOURCE" not in str(info.value)


def test_a_missing_source_keeps_its_advice(tmp_path, monkeypatch):
    from pipeline.train import ensure_shards

    monkeypatch.setenv("BIHM_DATA_SOURCE", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"nowhere.*Without internet, set BIHM_DATA_SOURCE"):
        ensure_shards(tmp_path / "shards")


def test_a_new_shard_folder_is_announced_with_where_it_is(tmp_path, monkeypatch, capsys):
    """A mistyped data.shard_dir beside prepared shards: preparing a second copy is said,
    with the absolute folder and the prepared one beside it."""
    from pipeline.train import ensure_shards

    make_shards(tmp_path / "data" / "binarized_mnist", n_train=200, n_valid=50, n_test=50)
    calls = []
    monkeypatch.setattr("data_shards.prepare", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("BIHM_DATA_SOURCE", "/mirror")
    monkeypatch.chdir(tmp_path)
    ensure_shards("data/binarized_mnsit")
    assert calls == [("data/binarized_mnsit",)]
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "data.shard_dir data/binarized_mnsit has no shard manifest; preparing" in line
    assert f"into {tmp_path / 'data' / 'binarized_mnsit'}, a new folder" in line, line
    assert "did not exist" in line and "$BIHM_DATA_SOURCE=/mirror" in line, line
    assert "(prepared shards beside it: data/binarized_mnist; a typo?)" in line, line


# --------------------------------------------------------------------------- resume hint
def test_the_resume_hint_has_a_make_form_under_make(tmp_path, monkeypatch):
    from pipeline.train import check_run_dir

    cfg = config_from_dict(tiny_config(tmp_path / "shards", tmp_path / "run"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")

    def hint() -> str:
        with pytest.raises(UserError) as info:
            check_run_dir(cfg, resume=False)
        return str(info.value)

    monkeypatch.delenv("MAKELEVEL", raising=False)
    monkeypatch.setattr("sys.argv", [".venv/bin/bihm", "train", "--config", "smoke"])
    assert "pass --resume to continue it" in hint()
    monkeypatch.setenv("MAKELEVEL", "1")
    assert "run `make train ARGS='--config smoke --resume'` to continue it" in hint()
    monkeypatch.setattr("sys.argv", [".venv/bin/bihm", "train"])
    assert "run `make train ARGS=--resume` to continue it" in hint()
    monkeypatch.setattr("sys.argv", ["pytest"])  # `make test`: not a `bihm train` of make's
    assert "pass --resume to continue it" in hint()
