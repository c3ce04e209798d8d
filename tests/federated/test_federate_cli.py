"""`kiln federate`'s bad options: one line naming the value and the fix, exit 2, before Ray."""

from __future__ import annotations

import pytest

from kiln.cli import main

CASES = [
    (["--data", "sklearn:digits", "--partition", "dirichlet:0"], "alpha must be greater than 0"),
    (["--data", "sklearn:digits", "--partition", "dirichlet:-0.5"], 'Got "dirichlet:-0.5"'),
    (["--data", "sklearn:digits", "--partition", "shards:0"], "at least 1"),
    (["--data", "sklearn:digits", "--fraction", "0"], 'Got "0.0" for --fraction'),
    (["--data", "sklearn:digits", "--fraction", "1.5"], 'Got "1.5" for --fraction'),
    (["--data", "sklearn:digits", "--dp-noise", "1.0"], "without --dp-clip"),
    (["--data", "sklearn:digits", "--dp-clip", "0", "--dp-noise", "1"], "for --dp-clip"),
    (["--data", "sklearn:digits", "--strategy", "fedx"], 'Got "fedx" for --strategy'),
    (["--data", "sklearn:digits", "--strategy", "fedprox:-1"], "MU must be 0 or more"),
    (["--data", "sklearn:digits", "--clients", "0"], "--clients must be at least 1"),
    (["--data", "sklearn:digits", "--clients", "3", "--min-clients", "4"], "--min-clients"),
    (["--data", "sklearn:digits", "--optimizer", "lion"], 'Got "lion" for --optimizer'),
    (["--data", "digits"], "give a URI"),
    (["--data", "sklearn:nope"], "sklearn:nope"),
    ([], "Give --data URI (or --resume RUN)"),
    (["--resume", "no-such-run"], 'Got "no-such-run" for --resume'),
]


@pytest.mark.parametrize("args,fragment", CASES)
def test_bad_options_are_one_line_with_exit_2(args, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["federate", *args])
    assert exited.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert fragment in lines[0] and lines[0].startswith("kiln: ")
