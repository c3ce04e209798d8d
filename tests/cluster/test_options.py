"""The client's table of `kiln` options equals the CLI's real options (no Ray needed)."""

import json
import subprocess
import sys

import pytest
import typer

from kiln.cli import app
from kiln.client import command_args
from kiln.options import COMMAND_OPTIONS
from kiln.training.errors import KilnError


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
    assert set(COMMAND_OPTIONS) == {"train", "tune", "serve", "compress", "federate"}
    with pytest.raises(KilnError, match='Got "max_batch" for kiln serve.*max_batch_size'):
        command_args("serve", {"max_batch": 8})
    assert command_args("tune", {"refit": False, "trials": 4}) == ["--no-refit", "--trials", "4"]


def test_the_client_imports_nothing_from_the_cli():
    probe = (
        "import json, sys\n"
        "from kiln.client import command_args\n"
        "command_args('train', {'epochs': 3})\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
        ).stdout
    )
    assert not [m for m in loaded if m == "kiln.cli" or m.startswith(("kiln.cli.", "typer"))]


def tune_options(**changes):
    from kiln.requests import SweepRequest, option_names

    base = dict.fromkeys(option_names(SweepRequest.from_options))
    base.update(
        data="sklearn:iris", model="mlp", trials=4, scheduler="asha", search="random",
        lr="1e-4:1e-1", solver="auto", epochs=5, workers_per_trial=1, metric="val_loss",
        grid_points=4, base_batch_size=32, hidden="128,64", test_fraction=0.2,
        val_fraction=0.15, seed=0, refit=True, missing="impute", min_category_count=1,
    )  # fmt: skip
    base.update(changes)
    return base


def test_tune_checks_val_fraction_before_it_reads_anything_else():
    from kiln.requests import SweepRequest

    bad = tune_options(val_fraction=0.0, space="/no/such/space.yaml", scheduler="nope")
    with pytest.raises(KilnError, match='Got "0.0" for --val-fraction.*e.g. 0.15'):
        SweepRequest.from_options(**bad)
    made = SweepRequest.from_options(**tune_options(features="a, b"))
    assert made.source.features == ("a", "b") and made.name == "sklearn-iris-mlp"
    assert made.sweep.space.lr.low == 1e-4 and made.source.val_fraction == 0.15


def test_output_prints_one_json_line_or_the_rendered_text(capsys):
    from kiln.cli.common import output

    output({"a": 1.5}, True, lambda _: "never")
    assert json.loads(capsys.readouterr().out) == {"a": 1.5}
    output({"a": 1.5}, False, lambda shown: f"a is {shown['a']}")
    assert capsys.readouterr().out == "a is 1.5\n"
