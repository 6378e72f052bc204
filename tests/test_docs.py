"""The README and docs/: short README, links that resolve, commands that parse, and a
configuration reference that matches the schema."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh|console)?\n(.*?)^```", text, flags=re.S | re.M)


def bihm_commands(text: str) -> list[str]:
    """Every `bihm ...` invocation in the page's fenced blocks: continuation lines joined,
    comments, a leading `$ ` and environment assignments (`VAR=value bihm ...`) removed,
    and optional parts written `[--flag value]` kept as given."""
    commands = []
    for block in fenced_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if not re.match(r"^([A-Za-z_][A-Za-z0-9_]*=\S+ +)*(\.venv/bin/)?bihm\b", line):
                continue  # not a bihm command (YAML, other tools, output)
            # An optional part written [--flag value] is parsed as if given.
            words = shlex.split(re.sub(r"\[(--[^\]]*)\]", r"\1", line), comments=True)
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                words.pop(0)
            if words and words[0] in ("bihm", ".venv/bin/bihm"):
                commands.append(shlex.join(words[1:]))
    return commands


def test_readme_is_short_and_links_to_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^(https?:|mailto:)", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path) if path else page
        assert file.exists(), f"{page.name}: link to {target}"
        if anchor and file.suffix == ".md":
            slugs = {
                re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^#{1,4} (.+)$", file.read_text(), flags=re.M)
            }
            assert anchor in slugs, f"{page.name}: no heading #{anchor} in {file.name}"


def test_every_bihm_command_shown_parses():
    """`bihm ...` as the pages show it parses with the real parser (flags, choices, types);
    a placeholder like <id> stands for a value and parses as one."""
    from pipeline.cli import build_parser

    parser = build_parser()
    seen = 0
    for page in PAGES:
        for command in bihm_commands(page.read_text()):
            seen += 1
            try:
                parser.parse_args(shlex.split(command))
            except SystemExit:
                pytest.fail(f"{page.name}: `bihm {command}` does not parse")
    assert seen >= 30, seen


def test_the_command_extraction_sees_continuations_and_env():
    text = (
        "```bash\nBIHM_DATA_SOURCE=x bihm eval --checkpoint c \\\n"
        "    --split test [--devices 2]  # c\n```\n"
    )
    assert bihm_commands(text) == ["eval --checkpoint c --split test --devices 2"]


def test_configuration_reference_is_up_to_date():
    from pipeline.config_reference import reference

    assert (ROOT / "docs" / "configuration.md").read_text() == reference(), (
        "regenerate: python -m pipeline.config_reference > docs/configuration.md"
    )
    # Every key is described.
    assert not re.search(r"\| +\|$", reference(), flags=re.M)


def test_committed_run_configs_name_no_absolute_path():
    """A run folder landed under results/ names its data and run folder relative to where
    the run started, never by a path of the machine it ran on."""
    import yaml

    configs = sorted((ROOT / "results").rglob("config.yaml"))
    assert configs
    for path in configs:
        cfg = yaml.safe_load(path.read_text())
        for key, value in [("run_dir", cfg.get("run_dir")), *cfg.get("data", {}).items()]:
            if isinstance(value, str) and key.endswith("dir"):
                assert not value.startswith("/"), f"{path.relative_to(ROOT)}: {key} = {value}"
