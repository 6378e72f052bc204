"""notebooks/playground.ipynb: kept without outputs, in step with its builder, and runnable.

The slow test executes every cell with a real Jupyter kernel (nbclient, ipykernel's python3)
on the notebook's reduced setting (BIHM_NOTEBOOK_FAST=1), writing only into a temporary
folder, and fails if any cell raises.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "playground.ipynb"
BUILDER = ROOT / "notebooks" / "build_playground.py"
# Folders that tools write while the test runs, whatever the notebook does.
TOOL_FOLDERS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}


def read_notebook() -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def test_notebook_is_stored_without_outputs():
    code_cells = [c for c in read_notebook().cells if c.cell_type == "code"]
    assert code_cells
    dirty = [c.id for c in code_cells if c.outputs or c.execution_count is not None]
    assert dirty == [], f"cells with outputs or execution counts: {dirty}"


def test_notebook_is_what_its_builder_writes():
    result = subprocess.run(
        [sys.executable, str(BUILDER), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


def test_notebook_extra_is_installed_by_dev():
    """CI installs `.[dev]`: it must bring what the executing test needs."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    # ipywidgets: tqdm.auto's progress bars in the notebook ("IProgress not found" without
    # it); nbconvert: the README's headless run, `jupyter nbconvert --execute`.
    assert {"ipykernel", "ipywidgets", "nbclient", "nbconvert", "nbformat"} <= {
        req.split("=")[0].split(">")[0] for req in extras["notebook"]
    }
    assert set(extras["notebook"]) <= set(extras["dev"])


def repository_files() -> set[str]:
    """Every file below the repository root, tool caches aside (data/ and runs/ included)."""
    found = set()
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in TOOL_FOLDERS]
        found.update(os.path.relpath(os.path.join(folder, f), ROOT) for f in files)
    return found


def mirror() -> Path:
    default = ROOT.parent / "shared" / "datasets" / "binarized_mnist"
    source = Path(os.environ.get("BIHM_DATA_SOURCE") or default)
    assert source.is_dir(), f"{source}: binarized MNIST mirror not found (set BIHM_DATA_SOURCE)"
    return source


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # The kernel inherits this environment: the reduced setting, a temporary work folder,
    # the offline data mirror, this checkout's code, and no wandb.
    monkeypatch.setenv("BIHM_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("BIHM_NOTEBOOK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("BIHM_NOTEBOOK_SHARDS", str(tmp_path / "shards"))
    monkeypatch.setenv("BIHM_DATA_SOURCE", str(mirror()))
    monkeypatch.delenv("BIHM_NOTEBOOK_CHECKPOINT", raising=False)
    monkeypatch.setenv("BIHM_NOTEBOOK_WANDB", "off")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as for a user

    before = repository_files()
    nb = read_notebook()
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,  # per cell
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working folder
    )
    client.execute()  # raises CellExecutionError naming the cell if any cell raises

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # Pictures: data, live curves, learning curves, samples, inpainting, the two estimator
    # plots and the samples png of the `bihm train` run.
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) >= 8, f"only {len(pictures)} pictures"
    text = "".join(o.get("text", "") for o in outputs)
    assert "2 log Z" in text and "ESS/K of the p* weights" in text
    assert "IProgress not found" not in text  # ipywidgets is in the notebook extra
    assert "recomputed now" in text  # the `bihm train` checkpoint was loaded and validated
    assert (tmp_path / "work" / "bihm_train" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "work" / "playground_model.pt").is_file()
    assert repository_files() == before, "the notebook wrote into the repository"
