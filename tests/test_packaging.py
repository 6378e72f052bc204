"""The install files agree, and only one Lightning package is present."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])


def conda_pip_requirements() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml must have exactly one pip: section"
    return {req for req in pip_sections[0] if req != "-e ."}


def test_environment_yml_matches_pyproject():
    assert conda_pip_requirements() == pyproject_requirements()


def test_torch_is_pinned_to_the_offline_wheel():
    assert "torch==2.13.0" in pyproject_requirements()


def test_only_pytorch_lightning_is_installed():
    """Ray's Lightning integration uses `lightning` whenever it is importable; a
    pytorch_lightning.Trainer then rejects RayDDPStrategy. So `lightning` must be absent."""
    assert importlib.util.find_spec("pytorch_lightning") is not None
    assert importlib.util.find_spec("lightning") is None


def test_project_imports_one_lightning_package():
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("bihm", "data_shards", "pipeline", "cluster", "benchmarks", "tests")
        for path in (ROOT / folder).rglob("*.py")
        # The package `lightning` itself; `lightning_utilities` (a dependency of
        # pytorch_lightning) is another package.
        if any(
            re.match(r"(import|from) lightning(\.|\s|$)", line.strip())
            for line in path.read_text().splitlines()
        )
    ]
    assert offenders == []
