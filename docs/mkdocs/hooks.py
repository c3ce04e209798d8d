"""MkDocs hooks: the reference pages generated at build time, and the repository's plots.

The site is built from docs/ (`mkdocs build -f docs/mkdocs/mkdocs.yml`); three pages are not
files there but generated here on every build, so they cannot drift from the code:

- `reference/cli.md`: every `kiln` command and option with its help, walked from the click
  command tree that typer builds from `kiln.cli.app` (hidden commands and options left out);
- `reference/http.md`: every route of the served FastAPI app, from the same OpenAPI document
  that `GET /openapi.json` serves (built from `kiln.serving.app.api` without starting Ray), and
  `reference/openapi.json` beside it;
- the plots under `benchmarks/results/` become `assets/benchmarks/...` in the site, and a page's
  `../benchmarks/results/X.png` link (right on GitHub) is pointed at them.
"""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
ASSETS = "assets/benchmarks"
RESULTS_LINK = re.compile(r"\]\(\.\./benchmarks/results/")

# ------------------------------------------------------------------------------------- CLI


def cli_markdown() -> str:
    """The CLI reference: one section per command, its usage, help and options table."""
    import typer.main

    from kiln.cli import app

    root = typer.main.get_command(app)
    lines = [
        "# CLI reference",
        "",
        "Generated from the `kiln` command tree on every build of this site: every command",
        "and option, with the help `kiln COMMAND --help` prints. How the commands fit",
        "together, their errors and figures: [Commands](../commands.md).",
        "",
    ]
    for path, command in walk_commands(root, "kiln"):
        lines += command_section(path, command)
    return "\n".join(lines) + "\n"


def walk_commands(command: Any, path: str) -> list[tuple[str, Any]]:
    """(path, command) for the command and every visible subcommand, depth first, by name."""
    found = [(path, command)]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        if not getattr(sub, "hidden", False):
            found += walk_commands(sub, f"{path} {name}")
    return found


def command_section(path: str, command: Any) -> list[str]:
    import typer._click as click

    ctx = click.Context(command, info_name=path)
    pieces = " ".join(command.collect_usage_pieces(ctx))
    level = "##" if path.count(" ") <= 1 else "###"  # kiln, kiln train: ##; kiln data load: ###
    lines = [f"{level} `{path}`", "", f"```\n{path} {pieces}\n```", ""]
    if command.help:
        lines += [clean(command.help), ""]
    if getattr(command, "commands", None):
        subs = [n for n, s in sorted(command.commands.items()) if not getattr(s, "hidden", False)]
        lines += ["Commands: " + ", ".join(f"`{path} {n}`" for n in subs) + ".", ""]
    rows = [param_row(p, ctx) for p in command.params if not getattr(p, "hidden", False)]
    rows = [r for r in rows if r]
    if rows:
        lines += ["| option | help |", "|---|---|", *rows, ""]
    return lines


def param_row(param: Any, ctx: Any) -> str | None:
    """One table row: `--name <type>` (or an argument) and the help with its default and
    `[required]`, as `--help` shows them."""
    record = param.get_help_record(ctx)
    if record is None:
        return None
    opts, help_text = record
    return f"| `{opts}` | {cell(help_text)} |"


def clean(text: str) -> str:
    """Typer help as Markdown: click's `\\b` no-rewrap markers dropped."""
    return "\n".join(line for line in text.splitlines() if line.strip() != "\b").strip()


def cell(text: str) -> str:
    """Text for one Markdown table cell: one line, pipes escaped."""
    return " ".join(clean(text).split()).replace("|", "\\|")


# ------------------------------------------------------------------------------------ HTTP


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document the served app answers at /openapi.json (no Ray started)."""
    from kiln.serving.app import api

    return api.openapi()


def http_markdown(spec: dict[str, Any]) -> str:
    """Every route: parameters, request body and responses; then every schema's fields."""
    lines = [
        "# HTTP API reference",
        "",
        "Generated on every build of this site from the OpenAPI document a served application",
        "answers at `GET /openapi.json` ([download this build's](openapi.json)). What the",
        "routes do, keys, limits and examples: [HTTP API](../http-api.md) and",
        "[OpenAI API](../openai.md).",
        "",
    ]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            lines += operation_section(method, path, operation)
    lines += ["## Schemas", ""]
    for name, schema in sorted(spec.get("components", {}).get("schemas", {}).items()):
        lines += schema_section(name, schema)
    return "\n".join(lines) + "\n"


def operation_section(method: str, path: str, operation: dict[str, Any]) -> list[str]:
    lines = [f"## `{method.upper()} {path}`", ""]
    if operation.get("summary"):
        lines += [f"**{operation['summary']}**", ""]
    if operation.get("description"):
        lines += [operation["description"].strip(), ""]
    params = operation.get("parameters", [])
    if params:
        lines += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
        for p in params:
            lines.append(
                f"| `{p['name']}` | {p['in']} | {type_of(p.get('schema', {}))} | "
                f"{'yes' if p.get('required') else 'no'} | {cell(p.get('description', ''))} |"
            )
        lines.append("")
    body = operation.get("requestBody", {}).get("content", {})
    if body:
        lines += ["Request body:", ""]
        for media, content in body.items():
            lines.append(f"- `{media}`: {type_of(content.get('schema', {}))}")
        lines.append("")
    lines += ["| status | meaning | body |", "|---|---|---|"]
    for status, response in operation.get("responses", {}).items():
        schemas = [type_of(c.get("schema", {})) for c in response.get("content", {}).values()]
        lines.append(
            f"| {status} | {cell(response.get('description', ''))} | {', '.join(schemas)} |"
        )
    return [*lines, ""]


def schema_section(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", ""]
    if schema.get("description"):
        lines += [schema["description"].strip(), ""]
    properties = schema.get("properties", {})
    if properties:
        required = set(schema.get("required", []))
        lines += ["| field | type | required | description |", "|---|---|---|---|"]
        for field, spec in properties.items():
            lines.append(
                f"| `{field}` | {type_of(spec)} | {'yes' if field in required else 'no'} | "
                f"{cell(spec.get('description', ''))} |"
            )
        lines.append("")
    return lines


def type_of(schema: dict[str, Any]) -> str:
    """A JSON schema as a short type: a link for a named schema, `array of X`, `A or B`."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(type_of(s) for s in schema[key])
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {type_of(schema.get('items', {}))}"
    if kind == "object" and schema.get("properties"):
        return "object (" + ", ".join(f"`{k}`" for k in schema["properties"]) + ")"
    return str(kind)


# ----------------------------------------------------------------------------- MkDocs hooks


def on_files(files: Any, config: Any) -> Any:
    """Add the generated reference pages and the benchmark plots to the site's files."""
    from mkdocs.structure.files import File

    spec = openapi_document()
    generated = {
        "reference/cli.md": cli_markdown(),
        "reference/http.md": http_markdown(spec),
        "reference/openapi.json": json.dumps(spec, indent=1),
    }
    for uri, content in generated.items():
        files.append(File.generated(config, uri, content=content))
    for plot in sorted(RESULTS.rglob("*.png")):
        uri = f"{ASSETS}/{plot.relative_to(RESULTS).as_posix()}"
        files.append(File.generated(config, uri, abs_src_path=str(plot)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Point `../benchmarks/results/` links (right from docs/ on GitHub) at the site's copies."""
    here = posixpath.dirname(page.file.src_uri)
    target = posixpath.relpath(ASSETS, here or ".")
    return RESULTS_LINK.sub(f"]({target}/", markdown)
