"""`kiln train` as a user runs it: a process of its own on its own embedded Ray."""

import json
import subprocess
import sys

import numpy as np
from sklearn.linear_model import Ridge

from kiln.actors.shards import load_dataset
from kiln.actors.sources import SourceSpec


def kiln(home, *args):
    env = {"KILN_HOME": str(home), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cli_ridge_matches_sklearn_and_is_profiled_in_the_command(tmp_path, ray_local):
    """The exact ridge from the command line at its defaults equals scikit-learn's Ridge with
    the same λ on the same standardised split, and the version leaves the command with its
    latency profile (measured in the driver of the embedded Ray, one torch thread)."""
    found = kiln(tmp_path, "train", "--data", "sklearn:diabetes", "--model", "ridge")
    assert found["solver"] == "exact" and found["converged"] is True
    assert found["grad_sync"] == "none"  # no minibatches, nothing to average
    data = load_dataset(SourceSpec(uri="sklearn:diabetes", val_fraction=0.0), 1)
    try:
        _, x, y = data.train.read_arrays()
        _, x_test, y_test = data.test.read_arrays()
    finally:
        data.release()
    mean, std = x.mean(0), x.std(0)
    ridge = Ridge(alpha=1.0).fit((x - mean) / std, y)  # λ = 1, Kiln's default for ridge
    expected = ridge.score((x_test - mean) / std, y_test)
    assert abs(found["metrics"]["r2"] - expected) <= 1e-4
    rows = kiln(tmp_path, "models", "compare", found["model"])
    profile = rows[0]["profiles"]["torch"]
    assert profile["threads"] == 1 and 0 < profile["b1_p50_ms"] < 1000
    assert np.isfinite(profile["rows_per_s_b64"])
