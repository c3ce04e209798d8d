"""One spelling per concept across commands (issue 34): the name of the version a command
registers is `--register` everywhere (old spellings hidden, for a release), and every command
that prints a result takes `--json`. Walks the typer app: a new command is checked too."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import typer.main

from kiln.cli import app
from tests.cluster.test_compare import home, kiln, no_ray, slo, wide_console  # noqa: F401

# Commands that register a version under a name the caller may choose.
REGISTERING = {"train", "tune", "compress", "federate", "models import"}
# The old spellings of --register, kept hidden for one release.
OLD_REGISTER = {"compress": "--register-as", "federate": "--name", "models import": "--name"}
# Commands that print no result of their own, and why.
NO_RESULT = {
    "jobs logs": "streams the job's own output",
    "ui": "a server: it logs its address and runs until stopped",
    "keys new-master": "prints a new master key once, for the operator to store (h4-security)",
}


def commands() -> Iterator[tuple[str, Any]]:
    def walk(command: Any, path: list[str]) -> Iterator[tuple[str, Any]]:
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            yield " ".join(path), command
            return
        for name, sub in subcommands.items():
            yield from walk(sub, [*path, name])

    yield from walk(typer.main.get_command(app), [])


def visible_flags(command: Any) -> set[str]:
    return {o for p in command.params if not getattr(p, "hidden", False) for o in p.opts}


def hidden_flags(command: Any) -> set[str]:
    return {o for p in command.params if getattr(p, "hidden", False) for o in p.opts}


def test_the_walk_finds_every_command_group() -> None:
    found = dict(commands())
    assert {"train", "serve", "models import", "data drop", "jobs stop"} <= set(found)


def test_every_registering_command_spells_it_register() -> None:
    found = dict(commands())
    for name in REGISTERING:
        assert "--register" in visible_flags(found[name]), name
    for name, command in found.items():
        flags = visible_flags(command)
        assert "--register-as" not in flags, name
        if name in REGISTERING:
            assert "--name" not in flags, f"{name}: the registered name is --register"
    for name, old in OLD_REGISTER.items():
        assert old in hidden_flags(found[name]), f"{name} {old}: kept hidden for a release"


def test_every_command_that_prints_a_result_takes_json() -> None:
    missing = [
        name
        for name, command in commands()
        if name not in NO_RESULT and "--json" not in visible_flags(command)
    ]
    assert missing == []


def test_an_old_spelling_still_works_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.cli.aliases import renamed

    assert renamed(None, "mine", "--register", "--register-as") == "mine"
    assert "--register-as is now --register" in capsys.readouterr().err
    assert renamed("new", None, "--register", "--register-as") == "new"
    # federate's default is not a value the caller gave
    assert renamed("federated", "old", "--register", "--name", default="federated") == "old"


def test_both_spellings_with_different_values_is_one_line() -> None:
    from kiln.cli.aliases import renamed
    from kiln.training.errors import KilnError

    with pytest.raises(KilnError, match="they are one option now"):
        renamed("a", "b", "--register", "--register-as")


def test_serve_dry_run_prints_its_choice_as_json(capsys, home, no_ray):  # noqa: F811
    code, out, err = kiln(
        capsys, *slo("--target-rps", "200", "--dry-run", "--json"), "--home", home
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # nothing but the JSON on stdout
    choice = json.loads(lines[0])
    assert (choice["dry_run"], choice["chosen"], choice["backend"]) == (True, "m@2", "torch")
    assert choice["replicas"] >= 1
    assert {c["ref"] for c in choice["candidates"]} == {"m@1", "m@2", "m@3"}
    assert choice["unprofiled"] == ["m@4"]


def test_serve_emit_config_prints_the_path_as_json(capsys, home, tmp_path, no_ray):  # noqa: F811
    path = tmp_path / "serve.yaml"
    args = ["serve", "m@1", "--emit-config", str(path), "--json", "--home", home]
    code, out, err = kiln(capsys, *args)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"config": str(path)}
    assert path.exists()
