"""`kiln tune` refuses bad ranges and options with one line, before Ray starts."""

import pytest

from kiln.cli import main

CASES = [
    (["--lr", "1e-1:1e-4"], 'Got "1e-1:1e-4" for --lr. LOW must not exceed HIGH, e.g. --lr'),
    (["--lr", "-1e-3:1e-1"], 'Got "-1e-3:1e-1" for --lr. Both ends must be greater than 0'),
    (["--l2", "1:1e-3"], 'Got "1:1e-3" for --l2. LOW must not exceed HIGH'),
    (["--scheduler", "median"], 'Got "median" for --scheduler. Choose one of: asha'),
    (["--search", "bayes"], 'Got "bayes" for --search. Choose one of: random, grid, optuna'),
    (["--trials", "0"], "--trials must be at least 1"),
    (["--space", "/no/such/space.yaml"], 'Got "/no/such/space.yaml" for --space'),
    (["--val-fraction", "0"], "A sweep ranks trials on validation rows"),
    (["--optimizer", "adam,lbfgs"], 'Got "lbfgs" for --optimizer'),
]


@pytest.mark.parametrize("args,fragment", CASES)
def test_bad_sweep_input_is_one_line(args, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["tune", "--data", "sklearn:iris", "--model", "logistic", *args])
    assert exited.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("kiln: ") and fragment in lines[0], lines[0]


def test_resume_of_an_unknown_sweep_lists_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    with pytest.raises(SystemExit):
        main(["tune", "--resume", "sweep-nope"])
    assert 'Got "sweep-nope" for --resume' in capsys.readouterr().err


def test_a_yaml_space_is_read_and_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    space = tmp_path / "space.yaml"
    space.write_text("lr: 1e-2:1e-3\nl2: 0,1e-4:1\n")
    with pytest.raises(SystemExit):
        main(["tune", "--data", "sklearn:iris", "--space", str(space)])
    assert 'Got "1e-2:1e-3" for --lr. LOW must not exceed HIGH' in capsys.readouterr().err
