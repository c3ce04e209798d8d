"""CLI contract: bad values give one line naming the value and the fix, no traceback."""

import subprocess
import sys

import pytest

CASES = [
    (["train", "--data", "sklearn:nope"], "sklearn:nope"),
    (["train", "--data", "sklearn:iris", "--workers", "-3"], "--workers must be at least 1"),
    (["train", "--data", "sklearn:iris", "--workers", "abc"], 'Got "abc" for --workers'),
    (["train", "--data", "sklearn:iris", "--lr", "-1"], "--lr must be greater than 0"),
    (["train", "--data", "sklearn:iris", "--model", "xgb"], 'Got "xgb" for --model'),
    (["train", "--data", "/does/not/exist.parquet"], "does not exist"),
    (["train", "--data", "sklearn:iris", "--register", "Bad/Name"], "model name"),
    (["models", "show", "no-such-model"], "no model named no-such-model"),
    (["frobnicate"], "No such command"),
]


def run_kiln(args, tmp_path):
    env = {"KILN_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize("args,fragment", CASES)
def test_bad_input_is_one_line_with_nonzero_exit(args, fragment, tmp_path):
    result = run_kiln(args, tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0] and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_kiln(["train", "--data", "sklearn:nope", "--debug"], tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr
