"""CLI contract: bad values give one line naming the value and the fix, no traceback."""

import subprocess
import sys

import pytest
from ray.exceptions import RayTaskError

from kiln.cli import main, user_error
from kiln.training.errors import KilnError

CASES = [
    (["train", "--data", "sklearn:nope"], "sklearn:nope"),
    (["train", "--data", "sklearn:iris", "--workers", "-3"], "--workers must be at least 1"),
    (["train", "--data", "sklearn:iris", "--workers", "abc"], 'Got "abc" for --workers'),
    (["train", "--data", "sklearn:iris", "--lr", "-1"], "--lr must be greater than 0"),
    (["train", "--data", "sklearn:iris", "--model", "xgb"], 'Got "xgb" for --model'),
    (
        ["train", "--data", "sklearn:iris", "--model", "mlp", "--solver", "exact"],
        'Got "--solver exact" for --model mlp. The exact solver fits linear and ridge',
    ),
    (["tune", "--data", "sklearn:iris", "--model", "cnn", "--solver", "lbfgs"], "for --model cnn"),
    (["train", "--data", "/does/not/exist.parquet"], "does not exist"),
    (["train", "--data", "sklearn:iris", "--register", "Bad/Name"], "model name"),
    (["models", "show", "no-such-model"], "no model named no-such-model"),
    (["models", "alias", "m", "abc", "production"], 'Got "abc" for version'),
    (["models", "alias", "Bad/Name", "1", "production"], "model name"),
    (["models", "alias", "no-such-model", "1", "production"], "no model named no-such-model"),
    (["models", "delete", "m@production"], "Name one version by number, e.g. m@3"),
    (["models", "archive", "no-such-model@2"], "no model named no-such-model"),
    (["keys", "create", "--scope", "read"], 'Got "read" for --scope'),
    (["keys", "create", "--scope", "admin", "--expires", "7x"], 'Got "7x" for --expires'),
    (["keys", "create"], "Missing option '--scope'"),
    (["keys", "revoke", "nope"], 'Got "nope" for ID: no API key with id nope'),
    (["models", "list", "no-such-model"], "no model named no-such-model"),
    (["keys", "list", "--key", "not-a-key"], "the API key given is malformed"),
    (["audit", "--limit", "0"], "--limit must be at least 1"),
    (["frobnicate"], "No such command"),
    (["compress", "nosuch", "--quantize", "int8"], "no model named nosuch"),
    (["compress", "m@1"], "Nothing to do"),
    (["compress", "m@1", "--quantize", "int4"], 'Got "int4" for --quantize'),
    (["compress", "m@1", "--prune", "1.5"], 'Got "1.5" for --prune'),
    (["compress", "m@1", "--prune", "0"], 'Got "0.0" for --prune'),
    (["compress", "m@1", "--distill", "--student", "cnn:8"], 'Got "cnn:8" for --student'),
    (["compress", "m@1", "--distill"], "--distill needs a student"),
    (["compress", "m@1", "--student", "mlp:8"], "without --distill"),
    (["compress", "m@1", "--distill", "--student", "mlp:8", "--alpha", "2"], "for --alpha"),
    (["retrain", "m", "--since", "yesterday"], "for --since"),
    (["retrain", "m", "--feedback-weight", "0"], 'Got "0.0" for --feedback-weight'),
    (["retrain", "m", "--canary-weight", "150"], 'Got "150" for --canary-weight'),
    (["monitor", "m", "--window", "soon"], "for --window"),
    (["autopilot", "status"], "Give the model: kiln autopilot status NAME"),
    (["autopilot", "m", "--min-feedback", "1"], 'Got "1" for --min-feedback'),
    (["autopilot", "m", "extra"], 'Got "m" as an action'),
    (["train"], "Give --data URI|NAME"),
    (["train", "--resume", "no-such-run"], 'Got "no-such-run" for --resume'),
    (["train", "--data", "sklearn:iris", "--val-fraction", "1.5"], 'Got "1.5" for --val-fraction'),
    (["train", "--data", "sklearn:iris", "--patience", "-1"], 'Got "-1" for --patience'),
    (["train", "--data", "sklearn:iris", "--eval-data", "/nope.csv"], "does not exist"),
    (["train", "--data", "sklearn:iris", "--missing", "drop"], 'Got "drop" for --missing'),
    (
        ["train", "--data", "sklearn:iris", "--min-category-count", "0"],
        'Got "0" for --min-category-count. Use 1 or more.',
    ),
    (["train", "--data", "sklearn:iris", "--categorical", "zip"], 'Got "zip" in --categorical'),
    (["train", "--data", "sklearn:iris", "--label", "nope"], 'Got "nope" for --label'),
    (["tune", "--data", "sklearn:iris", "--missing", "drop"], 'Got "drop" for --missing'),
    (["data", "ls"], "needs a running Ray cluster"),
    (["data", "load", "sklearn:iris", "--name", "Bad Name"], 'Got "Bad Name" for --name'),
    (["ui", "--port", "0"], 'Got "0" for --port'),
    (["ui", "--port", "70000"], 'Got "70000" for --port'),
    (["ui", "--host", "203.0.113.9"], "cannot listen on 203.0.113.9"),
]


@pytest.mark.parametrize("args,fragment", CASES)
def test_bad_input_is_one_line_with_nonzero_exit(args, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert fragment in lines[0] and lines[0].startswith("kiln: ")


def run_kiln(args, tmp_path):
    env = {"KILN_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_the_installed_entry_point_prints_one_line_and_no_traceback(tmp_path):
    result = run_kiln(["train", "--data", "sklearn:nope"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert 'Got "sklearn:nope" for --data' in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_kiln(["train", "--data", "sklearn:nope", "--debug"], tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


class ExtensionError(KilnError):
    """A Kiln error type defined outside training/ (here: in a test module)."""


def test_a_kiln_error_is_recognised_by_type_wherever_its_class_is_defined():
    raised = ExtensionError('Got "x" for --thing. Use y.')
    assert user_error(raised) is raised
    try:
        try:
            raise raised
        except ExtensionError as exc:
            raise RuntimeError("while loading") from exc
    except RuntimeError as outer:
        assert user_error(outer) is raised
    assert user_error(RuntimeError("a bug")) is None


def test_an_error_wrapped_by_ray_is_unwrapped_to_the_kiln_error():
    raised = ExtensionError('Got "x" for --thing. Use y.')
    # What ray.get raises for a KilnError raised in an actor or task: a RayTaskError whose
    # class also derives from ExtensionError, with the remote traceback in its text.
    wrapped = RayTaskError("load", "Traceback (most recent call last): ...", raised)
    wrapper = wrapped.as_instanceof_cause()
    assert isinstance(wrapper, ExtensionError) and wrapper is not raised
    assert user_error(wrapper) is raised
    assert user_error(wrapped) is raised
    assert user_error(RayTaskError("f", "tb", ValueError("a bug"))) is None


def test_the_cli_prints_a_kiln_error_defined_anywhere_as_one_line(monkeypatch, capsys):
    import kiln.cli

    def fail(*_: object, **__: object) -> None:
        raise RuntimeError("wrapped") from ExtensionError('Got "x" for --thing. Use y.')

    monkeypatch.setattr(kiln.cli, "app", fail)
    with pytest.raises(SystemExit) as exited:
        main(["anything"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == 'kiln: Got "x" for --thing. Use y.'


def test_hostile_files_get_one_line_too(tmp_path, monkeypatch, capsys):
    """A search space of YAML aliases and a Parquet footer declaring 10**15 rows: one line,
    exit 2, no traceback, no hang (tests/tuning/test_space.py, tests/actors/test_sources.py)."""
    from tests.actors.test_sources import declaring_rows
    from tests.tuning.test_space import LAUGHS

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "laughs.yaml").write_text(LAUGHS)
    declaring_rows(tmp_path / "huge.parquet", 10**15)
    for args, fragment in (
        (["tune", "--data", "sklearn:iris", "--space", str(tmp_path / "laughs.yaml")], "aliases"),
        (["train", "--data", str(tmp_path / "huge.parquet"), "--label", "y"], "declares"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and fragment in lines[0] and lines[0].startswith("kiln: "), lines
