"""A sweep whose driver is killed resumes without re-running the trials that had finished."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from kiln.cli import main
from kiln.tuning.tuner import CHECKPOINT_EVERY
from tests.conftest import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.slow]
EPOCHS = 40


def trial_statuses(storage: Path) -> dict[str, str]:
    """trial_id -> status, from the newest experiment state Tune saved."""
    states = sorted(storage.glob("sweeps/sweep-*/experiment_state-*.json"))
    if not states:
        return {}
    try:
        raw = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return {}  # caught mid-write: ask again
    trials = [json.loads(entry[0]) for entry in raw["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def result_lines(storage: Path) -> dict[str, int]:
    found = {}
    for path in storage.glob("sweeps/sweep-*/run_trial_*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            found[lines[-1]["trial_id"]] = len(lines)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (its embedded Ray), by pid."""
    family = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def test_resume_after_a_killed_driver_skips_finished_trials(
    ray_local, tmp_path, monkeypatch, capsys
):
    home, storage = tmp_path / "home", tmp_path / "home" / "storage"
    env = {**os.environ, "KILN_HOME": str(home), "KILN_NUM_CPUS": "1", "OMP_NUM_THREADS": "1"}
    # Tune snapshots its state every 2 s by default; a 10-epoch trial lasted about that long on
    # a slow machine and 0.3 s on a fast one, where one snapshot showed all 3 done. Twice a
    # second, with 40-epoch trials, keeps the kill between finished and pending ones.
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "0.5"
    env.pop("RAY_ADDRESS", None)
    args = ["tune", "--data", "sklearn:digits", "--model", "mlp", "--trials", "3"]
    args += ["--epochs", str(EPOCHS), "--scheduler", "none", "--json"]
    # One CPU: trials run one after another, so the kill lands between finished and pending ones.
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(
            lambda: list(trial_statuses(storage).values()).count("TERMINATED") >= 1,
            timeout_s=240,
        ), trial_statuses(storage)
    finally:
        kill_tree(proc)
    before = trial_statuses(storage)
    finished = {t for t, status in before.items() if status == "TERMINATED"}
    lines_before = result_lines(storage)
    assert 1 <= len(finished) < 3, before

    sweep_id = next((home / "sweeps").glob("*.json")).stem
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    main(["tune", "--resume", sweep_id, "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert result["num_trials"] == 3 and result["trial_epochs"] == 3 * EPOCHS
    after = result_lines(storage)
    assert all(after[t] == lines_before[t] for t in finished)  # not one more epoch reported
    assert set(trial_statuses(storage).values()) == {"TERMINATED"}
    # Checkpoints were all kept while the sweep ran (a snapshot may name any of them); once it
    # is done each trial keeps only its last.
    for trial_dir in storage.glob("sweeps/sweep-*/run_trial_*"):
        names = [p.name for p in trial_dir.glob("checkpoint_*")]
        assert names == [f"checkpoint_{EPOCHS // CHECKPOINT_EVERY - 1:06d}"], trial_dir
