"""Every sub-command answers bad input with one line that names the culprit, exit status 2
and no traceback; `bihm --help` imports nothing heavy; written files are shared as the umask
says; the packaged configs work after a plain, non-editable install."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch
import yaml

from bihm import BiHM
from bihm.atomic import atomic_write_text
from pipeline.cli import build_parser, main
from tests.conftest import ROOT, make_shards, run_python, tiny_config


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good and bad inputs: shards, a checkpoint, a corrupt manifest, broken sources."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    shards = make_shards(tmp / "shards", n_train=200, n_valid=50, n_test=50)
    ckpt = tmp / "model.pt"
    BiHM([784, 8, 4]).save(ckpt)
    BiHM([784, 8, 4], n_classes=10).save(tmp / "labels.pt")
    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    bad_manifest = tmp / "bad_manifest"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.json").write_text("{ not json")
    empty = tmp / "empty"
    empty.mkdir()
    truncated = tmp / "truncated_source"
    truncated.mkdir()
    for split in ("train", "valid", "test"):
        data = gzip.compress(b"0 1 0 1\n" * 50)
        (truncated / f"binarized_mnist_{split}.amat.gz").write_bytes(data[: len(data) // 2])
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(shards, tmp / "run")))
    bad_data_config = tmp / "bad_data.yaml"
    bad_data_config.write_text(yaml.safe_dump(tiny_config(bad_manifest, tmp / "run2")))
    return {
        "shards": shards,
        "ckpt": ckpt,
        "labels_ckpt": tmp / "labels.pt",
        "garbage": garbage,
        "bad_manifest": bad_manifest,
        "empty": empty,
        "truncated": truncated,
        "config": config,
        "bad_data_config": bad_data_config,
        "tmp": tmp,
    }


# (argv with {placeholders} from `files`, text the one-line error must contain)
BAD_INPUTS = [
    # bihm data prepare / bench
    ("data prepare --source {tmp}/nowhere --out {tmp}/o1", "nowhere"),
    ("data prepare --source {empty} --out {tmp}/o2", "binarized_mnist_train"),
    ("data prepare --source {truncated} --out {tmp}/o3", "truncated_source"),
    ("data prepare --source {empty} --out {tmp}/o4 --shard-size 0", "--shard-size"),
    ("data prepare --out {tmp}/o5 --dataset cifar", "--dataset"),
    ("data bench --shards {empty}", "manifest"),
    ("data bench --shards {shards} --workers a,b", "--workers"),
    # bihm train
    ("train --config {tmp}/missing.yaml", "missing.yaml"),
    ("train --config {config} --set optim.lr=-1", "optim.lr"),
    ("train --config {config} --set optim.momentum=0.9", "optim.momentum"),
    ("train --config {config} --devices 0", "--devices"),
    ("train --config {bad_data_config}", "manifest.json"),
    ("train --run-dir {tmp}/no_run --resume", "config.yaml"),
    # bihm eval
    ("eval --checkpoint {ckpt} --shards {shards} --z-samples 0", "--z-samples"),
    ("eval --checkpoint {ckpt} --shards {shards} --z-chunk 0", "--z-chunk"),
    ("eval --checkpoint {ckpt} --shards {shards} --batch-size 0", "--batch-size"),
    ("eval --checkpoint {ckpt} --shards {shards} --samples 1,x", "--samples"),
    ("eval --checkpoint {ckpt} --shards {shards} --samples 0", "--samples"),
    ("eval --checkpoint {ckpt} --shards {shards} --limit 0", "--limit"),
    ("eval --checkpoint {tmp}/missing.ckpt", "missing.ckpt"),
    ("eval --checkpoint {garbage} --shards {shards}", "garbage.ckpt"),
    ("eval --checkpoint {ckpt} --shards {empty}", "manifest"),
    ("eval --checkpoint {ckpt} --shards {bad_manifest}", "manifest.json"),
    ("eval --checkpoint {ckpt} --set validation.K=0", "validation.K"),
    # bihm validate
    ("validate --checkpoint {ckpt} --devices 0", "--devices"),
    ("validate --checkpoint {garbage}", "garbage.ckpt"),
    ("validate --checkpoint {ckpt} --shards {empty}", "manifest"),
    # bihm sample
    ("sample --checkpoint {ckpt} --n 0 --out {tmp}/s.png", "--n"),
    ("sample --checkpoint {ckpt} --gibbs-steps -1 --out {tmp}/s.png", "--gibbs-steps"),
    ("sample --checkpoint {ckpt} --proposals 0 --out {tmp}/s.png", "--proposals"),
    ("sample --checkpoint {tmp}/missing.ckpt --out {tmp}/s.png", "missing.ckpt"),
    ("sample --checkpoint {labels_ckpt} --out {tmp}/s.png", "labels.pt"),
    # bihm inpaint
    ("inpaint --checkpoint {ckpt} --digits 0 --out {tmp}/i.png", "--digits"),
    ("inpaint --checkpoint {ckpt} --chains 0 --out {tmp}/i.png", "--chains"),
    ("inpaint --checkpoint {ckpt} --mask diagonal --out {tmp}/i.png", "--mask"),
    ("inpaint --checkpoint {ckpt} --shards {empty} --out {tmp}/i.png", "manifest"),
    ("inpaint --checkpoint {labels_ckpt} --out {tmp}/i.png", "labels.pt"),
    # bihm bench
    ("bench --min-time 0", "--min-time"),
    ("bench --device tpu", "--device"),
    ("bench --epoch-limit 0", "--epoch-limit"),
    # bihm tune
    ("tune --config {tmp}/missing_sweep.yaml", "missing_sweep.yaml"),
    ("tune --config {config} --num-samples 0", "--num-samples"),
    # bihm submit
    ("submit slurm --config {config} --nodes 0 --gpus-per-node 0 --dry-run", "--nodes"),
    ("submit slurm --config {config} --nodes 1 --gpus-per-node 0 --time 1:2 --dry-run", "--time"),
    ("submit slurm --config {tmp}/missing.yaml --nodes 1 --gpus-per-node 0 --dry-run", "missing"),
    ("submit ray --address http://127.0.0.1:9 --config {tmp}/missing.yaml", "missing.yaml"),
    # no sub-command / an unknown one
    ("frobnicate", "frobnicate"),
]


@pytest.mark.parametrize(("argv", "culprit"), BAD_INPUTS, ids=[a for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_culprit(files, argv, culprit, capsys):
    args = argv.format(**files).split()
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse refuses a flag before any handler runs
        code = exit_.code
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, (out.out[-2000:], out.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("bihm"), out.err
    assert culprit in lines[0], lines[0]
    assert "Traceback" not in out.err + out.out


def test_sub_commands_are_registered():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, type(parser._subparsers._actions[-1]))]
    names = {"data", "train", "eval", "validate", "sample", "inpaint", "bench", "tune", "submit"}
    assert names <= set(sub.choices)


def test_debug_shows_the_traceback(files):
    with pytest.raises(Exception, match="missing.ckpt"):
        main(["--debug", "eval", "--checkpoint", str(files["tmp"] / "missing.ckpt")])


def test_help_imports_no_torch_or_lightning():
    """`bihm --help` must answer at once: building the parser imports no heavy module."""
    code = (
        "import sys; from pipeline.cli import build_parser; build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'pytorch_lightning', 'ray', 'numpy', "
        "'webdataset', 'matplotlib') if m in sys.modules))"
    )
    proc = run_python(["-c", code], ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------- files
def test_outputs_are_readable_by_group_and_others_under_umask_022(tmp_path):
    """mkstemp's 0600 would hide results from teammates: every writer follows the umask."""
    from pipeline.plots import save_curves

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        BiHM([784, 4]).save(tmp_path / "m.pt")
        save_curves(tmp_path / "c.png", [{"epoch": 0.0, "val/log_p": -100.0}])
        make_shards(tmp_path / "shards", n_train=200, n_valid=20, n_test=20)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 3 + 4  # a.txt, m.pt, c.png; 3 shards and manifest.json
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert not list(tmp_path.rglob("*.tmp*")), "temporary files left behind"


def test_a_failed_write_leaves_the_old_file(tmp_path):
    from bihm.atomic import atomic_path

    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_checkpoint_error_does_not_advise_weights_only_false(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "obj": subprocess.CompletedProcess([], 0)}, path)
    assert main(["eval", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert "evil.ckpt" in err and "weights_only" not in err and "False" not in err


# --------------------------------------------------------------------------- packaging
@pytest.mark.slow
def test_packaged_config_runs_after_a_plain_install(tmp_path):
    """Build a wheel, install it (not editable) into a fresh venv that sees the project's
    dependencies, and run `bihm train --config smoke` from an empty folder."""
    wheel_dir = tmp_path / "wheel"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheel_dir.glob("bihm-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, system_site_packages=False)
    # The dependencies come from the test's own environment (no network, no torch rebuild):
    # a .pth file puts its site-packages after the new venv's, which holds bihm itself.
    # (Paths in a .pth file are added without running the .pth files inside them, so the
    # checkout's editable-install hook stays off.)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    python = env_dir / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), wheel],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("BIHM_DATA_SOURCE", str(ROOT.parent / "shared" / "datasets" / "binarized_mnist"))
    where = subprocess.run(
        [python, "-c", "import pipeline, bihm_configs; print(pipeline.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    assert str(site) in where.stdout, where.stdout  # the installed copy, not the checkout
    proc = subprocess.run(
        [python, "-m", "pipeline.cli", "train", "--config", "smoke", "--set", "train.max_epochs=1"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (work / "runs" / "smoke" / "metrics.csv").is_file()
    assert (work / "runs" / "smoke" / "checkpoints" / "last.ckpt").is_file()
