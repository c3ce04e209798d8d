"""`kiln demo --json` end to end in its own process: the acceptance figures of the slice."""

import json
import subprocess
import sys

import pytest

from tests.conftest import free_port, wait_for


def raylet_pids() -> set[int]:
    """Raylets of this virtualenv's Ray only: other checkouts on the machine run their own."""
    pattern = f"{sys.prefix}/.*ray/core/src/ray/raylet/raylet"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.mark.slow
def test_demo_trains_serves_and_matches_accuracy(tmp_path):
    before = raylet_pids()
    port = free_port()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kiln.cli",
            "demo",
            "--json",
            "--port",
            str(port),
            "--home",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) >= {
        "test_accuracy",
        "served_accuracy",
        "num_workers",
        "model",
        "version",
        "p50_ms",
        "p99_ms",
        "elapsed_s",
    }
    assert summary["test_accuracy"] >= 0.96
    assert summary["served_accuracy"] == summary["test_accuracy"]
    assert summary["num_workers"] == 2 and summary["num_requests"] == 360
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    # Clean shutdown: the demo's raylet is gone (the test session's own Ray may still run).
    assert wait_for(lambda: raylet_pids() <= before, timeout_s=30)
