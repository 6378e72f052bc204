"""Outputs are checked before the work: every output option of every sub-command that
cannot be written stops the command at once with one line naming the flag and the path,
exit status 2, before any checkpoint, data or model is touched.

"Cannot be written" is made real, not a permission bit (root passes every permission
check): a path below a regular file, which fails for root too; a read-only tmpfs mounted
in a private mount namespace, where the machine allows it (`unshare -m`); and a read-only
file system simulated in-process for the error's wording.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bihm import BiHM
from bihm.atomic import PROBE_PREFIX, check_writable
from bihm.errors import UserError
from pipeline.cli import main
from tests.conftest import ROOT, make_shards, tiny_config


class WorkStarted(AssertionError):
    """Raised by a stand-in for the first step of the real work."""


def boom(*args, **kwargs):
    raise WorkStarted("the work started before the output was checked")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fail_fast")
    shards = make_shards(tmp / "shards", n_train=200, n_valid=50, n_test=50)
    ckpt = tmp / "model.pt"
    BiHM([784, 8, 4]).save(ckpt)
    blocker = tmp / "a_file"  # a regular file: nothing can be written below it, not as root
    blocker.write_text("not a folder")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(shards, blocker / "run")))
    sweep = tmp / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "base": str(config),
                "run_dir": str(blocker / "sweep"),
                "search": {"optim.lr": {"choice": [0.01, 0.02]}},
            }
        )
    )
    return {"shards": shards, "ckpt": ckpt, "blocker": blocker, "config": config, "sweep": sweep}


# (argv, the flag the line must name, the first step of the work: replaced by `boom`)
LOAD = "pipeline.evaluate.load_checkpoint"
DATA = "pipeline.train.make_datamodule"
CASES = [
    ("eval --checkpoint {ckpt} --json {blocker}/e.json", "--json", LOAD),
    ("validate --checkpoint {ckpt} --json {blocker}/v.json", "--json", LOAD),
    ("sample --checkpoint {ckpt} --out {blocker}/s.png", "--out", LOAD),
    ("inpaint --checkpoint {ckpt} --out {blocker}/sub/i.png", "--out", LOAD),
    ("bench --json {blocker}/b.json --no-epoch", "--json", "benchmarks.bench.run"),
    ("bench --shards {blocker}/shards", "--shards", "benchmarks.bench.run"),
    ("data bench --shards {shards} --json {blocker}/j", "--json", "data_shards.bench.bench_loader"),
    ("data prepare --out {blocker}/out", "--out", "data_shards.shards._acquire"),
    ("train --config {config}", "--run-dir", DATA),
    ("train --config {config} --run-dir {blocker}/r", "--run-dir", DATA),
    ("train --config {config} --launcher ray", "--run-dir", "pipeline.ray_launcher.ensure_shards"),
    ("tune --config {sweep}", "sweep folder", "pipeline.tune.run_sweep"),
]  # fmt: skip
IDS = [
    "eval-json", "validate-json", "sample-out", "inpaint-out", "bench-json", "bench-shards",
    "data-bench-json", "data-prepare-out", "train-config-run_dir", "train-run-dir",
    "train-ray-run-dir", "tune-sweep-folder",
]  # fmt: skip


@pytest.mark.parametrize(("argv", "flag", "work"), CASES, ids=IDS)
def test_an_unwritable_output_stops_the_command_before_the_work(
    inputs, argv, flag, work, capsys, monkeypatch
):
    module, name = work.rsplit(".", 1)
    monkeypatch.setattr(f"{module}.{name}", boom)
    monkeypatch.setattr("pipeline.train.BiHMModule", boom)
    args = argv.format(**inputs).split()
    assert main(args) == 2  # WorkStarted (an AssertionError) would escape main instead
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bihm"), out.err
    assert flag in lines[0] and str(inputs["blocker"]) in lines[0], lines[0]
    assert "cannot write" in lines[0] and "is a file, not a folder" in lines[0], lines[0]
    assert "Traceback" not in out.err + out.out


def test_an_output_that_is_a_folder_is_refused(inputs, capsys, monkeypatch):
    monkeypatch.setattr("pipeline.evaluate.load_checkpoint", boom)
    folder = inputs["shards"]
    assert main(["eval", "--checkpoint", str(inputs["ckpt"]), "--json", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"--json {folder}: is a folder" in err


# --------------------------------------------------------------------------- the probe
def test_the_probe_creates_missing_folders_and_leaves_no_file(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    assert check_writable(target, "--json") == target
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/b"]
    check_writable(tmp_path / "c", "--out", folder=True)
    assert (tmp_path / "c").is_dir() and not list((tmp_path / "c").iterdir())


def test_a_read_only_file_system_is_named(tmp_path, monkeypatch):
    """What the probe reports when the write itself fails (EROFS), whatever the mode bits."""
    import bihm.atomic

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / f"{PROBE_PREFIX}x"))

    monkeypatch.setattr(bihm.atomic.tempfile, "mkstemp", read_only)
    with pytest.raises(UserError) as info:
        check_writable(tmp_path / "e.json", "--json")
    assert (
        str(info.value)
        == f"--json {tmp_path / 'e.json'}: cannot write there (Read-only file system)"
    )


def _can_mount_read_only(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {folder}"],
        capture_output=True,
    )
    return proc.returncode == 0


def test_a_real_read_only_mount_is_caught_as_root(tmp_path):
    """A read-only tmpfs in a private mount namespace: the probe fails there for root too,
    and a writable folder beside it passes."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _can_mount_read_only(ro):
        pytest.skip("this machine does not allow a private mount namespace (unshare -m)")
    code = (
        "import sys; from bihm.atomic import check_writable; from bihm.errors import UserError\n"
        f"check_writable({str(tmp_path / 'rw' / 'e.json')!r}, '--json')\n"
        "try:\n"
        f"    check_writable({str(ro / 'sub' / 'e.json')!r}, '--json')\n"
        "except UserError as err:\n"
        "    print(err); sys.exit(3)\n"
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o ro tmpfs {ro} && exec "$@"', "sh"]
        + [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.strip() == (
        f"--json {ro / 'sub' / 'e.json'}: cannot write there (Read-only file system: {ro / 'sub'})"
    )
