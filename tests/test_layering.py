"""The import rule: each package imports only the packages below it.

    bihm          the model, its objectives, estimators and Lightning modules
    data_shards   the data: shards, streams, data modules
    pipeline      configs, training, evaluation, tuning, the `bihm` command
    cluster, benchmarks

Every module's imports are read with `ast`, wherever they sit (top level, inside a
function, under `if TYPE_CHECKING:`), and so are `importlib.import_module("...")` and
`__import__("...")` calls with a literal name.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"bihm": 0, "data_shards": 1, "pipeline": 2, "cluster": 3, "benchmarks": 3}

# The known exceptions, each an import of one module by one file, with the reason.
ALLOWED = {
    # The `bihm` command's front door registers the sub-commands of every package.
    ("pipeline/cli.py", "benchmarks.cli"): "the `bihm bench` sub-command",
    ("pipeline/cli.py", "cluster.submit"): "the `bihm submit` sub-command",
    # A Ray job ships the folders of all the project's packages; imported for its path.
    ("cluster/submit.py", "benchmarks"): "ray_runtime_env's py_modules",
}


def _dynamic_import_name(node: ast.Call) -> str | None:
    """The literal module name of importlib.import_module("...") or __import__("...")."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports(source: str, filename: str = "<module>") -> list[tuple[int, str]]:
    """(line, module) of every absolute import in `source`, wherever it is."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and (name := _dynamic_import_name(node)):
            found.append((node.lineno, name))
    return sorted(found)


def upward_imports(root: Path) -> list[tuple[str, int, str]]:
    """(file, line, module) of every import of a package that is not below the file's own."""
    found = []
    for package, layer in LAYERS.items():
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for line, module in imports(path.read_text(), rel):
                target = module.split(".")[0]
                if target in LAYERS and target != package and LAYERS[target] >= layer:
                    found.append((rel, line, module))
    return sorted(found)


def test_each_package_imports_only_the_packages_below_it():
    found = upward_imports(ROOT)
    violations = [
        f"{rel}:{line} imports {module} ({rel.split('/')[0]} is not above {module.split('.')[0]})"
        for rel, line, module in found
        if (rel, module) not in ALLOWED
    ]
    assert violations == [], "\n".join(violations)
    # An exception that no longer happens is dropped from the list, not kept as a loophole.
    stale = set(ALLOWED) - {(rel, module) for rel, _, module in found}
    assert stale == set(), stale


def test_the_check_finds_upward_imports_anywhere_in_a_module(tmp_path):
    """The checker itself, on a planted tree: an import at the top, in a function, under
    TYPE_CHECKING and through importlib are all found; downward ones are not."""
    files = {
        "bihm/low.py": """
            import torch
            from bihm.rng import uniform
            from data_shards.stream import train_loader

            def later():
                import pipeline.config

            if TYPE_CHECKING:
                from cluster import submit

            importlib.import_module("benchmarks.bench")
        """,
        "data_shards/mid.py": """
            from bihm.model import BiHM
            from . import shards
            __import__("pipeline")
        """,
        "benchmarks/top.py": """
            from bihm import BiHM
            from data_shards import prepare
            from pipeline.config import load_config
            from cluster.submit import register
        """,
    }
    for rel, source in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(source))
    assert upward_imports(tmp_path) == [
        ("benchmarks/top.py", 5, "cluster.submit"),
        ("bihm/low.py", 4, "data_shards.stream"),
        ("bihm/low.py", 7, "pipeline.config"),
        ("bihm/low.py", 10, "cluster"),
        ("bihm/low.py", 12, "benchmarks.bench"),
        ("data_shards/mid.py", 4, "pipeline"),
    ]
