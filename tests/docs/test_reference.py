"""The generated reference pages of the documentation site (docs/mkdocs/hooks.py) list every
command, option and route, and README's links lead somewhere. No MkDocs and no Ray needed:
`make docs` builds the site itself with --strict."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType, SimpleNamespace

import typer._click as click
import typer.main

REPO = Path(__file__).resolve().parents[2]


def load_hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kiln_docs_hooks", REPO / "docs/mkdocs/hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_lists_every_command_and_option():
    from kiln.cli import app

    hooks = load_hooks()
    page = hooks.cli_markdown()
    root = typer.main.get_command(app)
    missing = []
    for path, command in hooks.walk_commands(root, "kiln"):
        sections = page.split(f"`{path}`\n\n```\n{path} ", 1)
        if len(sections) != 2:
            missing.append(path)
            continue
        section = sections[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            record = param.get_help_record(click.Context(command, info_name=path))
            if record is not None and f"| `{record[0]}` |" not in section:
                missing.append(f"{path} {record[0]}")
    assert missing == []
    assert page.count("\n## `kiln ") >= 20  # every top-level command has a section


def test_hidden_commands_stay_out_of_the_reference():
    hooks = load_hooks()
    shown, old = SimpleNamespace(hidden=False), SimpleNamespace(hidden=True)
    group = SimpleNamespace(commands={"shown": shown, "old": old})
    assert [path for path, _ in hooks.walk_commands(group, "kiln")] == ["kiln", "kiln shown"]


def test_http_reference_lists_every_route_and_schema():
    from kiln.serving.app import api

    hooks = load_hooks()
    spec = api.openapi()
    page = hooks.http_markdown(spec)
    for path, operations in spec["paths"].items():
        for method in operations:
            assert f"## `{method.upper()} {path}`" in page
    for name in spec["components"]["schemas"]:
        assert f"### {name}\n" in page
    # A schema named in a table links to its section on the same page.
    assert "[PredictResponse](#predictresponse)" in page


def test_readme_links_lead_to_files_that_exist():
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not t.startswith(("http://", "https://", "mailto:"))]
    assert local, "README links no page"
    assert [t for t in local if not (REPO / t).exists()] == []
    assert len(readme.splitlines()) <= 160  # what a newcomer reads first; the rest is in docs/
