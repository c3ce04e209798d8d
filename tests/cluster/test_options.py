"""The client's table of `kiln` options equals the CLI's real options (no Ray needed)."""

import json
import subprocess
import sys

import pytest
import typer

from cluster.cli import app
from cluster.client import command_args
from cluster.options import COMMAND_OPTIONS
from training.errors import KilnError


def real_options(command: str) -> set[str]:
    group = typer.main.get_command(app)
    found = group.commands[command]  # type: ignore[attr-defined]
    return {o for p in found.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}


@pytest.mark.parametrize("command", sorted(COMMAND_OPTIONS))
def test_the_table_lists_exactly_the_commands_options(command):
    real = real_options(command)
    table = COMMAND_OPTIONS[command]
    assert (sorted(real - table), sorted(table - real)) == ([], []), (
        f"cluster/options.py is out of date for kiln {command}: (missing, extra)"
    )


def test_the_client_submits_only_commands_in_the_table():
    assert set(COMMAND_OPTIONS) == {"train", "tune", "serve"}
    with pytest.raises(KilnError, match='Got "max_batch" for kiln serve.*max_batch_size'):
        command_args("serve", {"max_batch": 8})
    assert command_args("tune", {"refit": False, "trials": 4}) == ["--no-refit", "--trials", "4"]


def test_the_client_imports_nothing_from_the_cli():
    probe = (
        "import json, sys\n"
        "from cluster.client import command_args\n"
        "command_args('train', {'epochs': 3})\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
        ).stdout
    )
    assert not [m for m in loaded if m == "cluster.cli" or m.startswith(("cluster.cli.", "typer"))]
