"""docs/configuration.md, generated from the config schema in pipeline/config.py.

Every key of a training config, with its type, its default and the docstring written under
its field, one table per section. The docstrings live beside the fields (the schema is the
single source), so the reference is made from them and a test checks that the committed
page is up to date:

    python -m pipeline.config_reference > docs/configuration.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from typing import Any

from pipeline import config as config_module
from pipeline.config import Config

HEADER = """# Configuration reference

A training config is a YAML file (`configs/*.yaml`, or any path) read by `bihm train
--config` and checked on load: an unknown key or a bad value stops with a one-line error
naming the key. `--set KEY=VALUE` overrides any value (`--set optim.lr=3e-4`). A run folder
keeps the resolved config as `config.yaml`; `--resume` reads it back, and settings changed
with `--resume --set` take effect from the first resumed step.

This page is generated from `pipeline/config.py` (`python -m pipeline.config_reference >
docs/configuration.md`); a test checks that it is up to date.
"""


def field_docs(cls: type) -> dict[str, str]:
    """The string literal written under each field of a dataclass, by field name."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, after in zip(body, [*body[1:], None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _type_name(tp: Any) -> str:
    text = str(tp).replace("typing.", "")
    for name in ("int", "float", "str", "bool"):
        text = text.replace(f"<class '{name}'>", name)
    text = text.replace("NoneType", "None").replace("Literal", "one of ")
    return text.replace("|", "or")


def _default(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return "(section)"
    return "null" if value is None else repr(value).replace("'", "")


def _section(prefix: str, cls: type, instance: Any) -> list[str]:
    hints = typing.get_type_hints(cls, vars(config_module))
    docs = field_docs(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((f"{prefix}{f.name}.", type(value), value))
            continue
        doc = docs.get(f.name, "").replace("|", "\\|")
        rows.append(
            f"| `{prefix}{f.name}` | {_type_name(hints[f.name])} | `{_default(value)}` | {doc} |"
        )
    out: list[str] = []
    if rows:
        title = prefix.rstrip(".") or "top level"
        out += [f"## `{title}`" if prefix else "## Top level", ""]
        cls_doc = inspect.getdoc(cls)
        if cls_doc and not cls_doc.startswith(f"{cls.__name__}("):
            out += [" ".join(cls_doc.split()), ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |", *rows, ""]
    for nested_prefix, nested_cls, nested_value in nested:
        out += _section(nested_prefix, nested_cls, nested_value)
    return out


def reference() -> str:
    """The whole page, as Markdown."""
    return HEADER + "\n" + "\n".join(_section("", Config, Config())).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
