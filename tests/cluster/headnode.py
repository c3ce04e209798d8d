"""A real Ray head started with `ray start --head` for job-submission tests, and stopped again.

Its own temp dir, ports and token keep it apart from the test session's Ray and from any other
Ray on the machine. It is stopped by signalling its own process group, not with `ray stop`,
which kills every Ray process of the user on the machine (another checkout's tests included).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port, wait_for

BIN = Path(sys.executable).parent


@dataclass
class Head:
    address: str
    """The Jobs API (dashboard) URL."""
    gcs_address: str
    token_path: Path
    env: dict[str, str]
    """The environment the head runs with (its jobs inherit it)."""


def head_env(token_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KILN_"))}
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        OMP_NUM_THREADS="1",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1",
    )
    return env


def dashboard_up(address: str, token: str) -> bool:
    try:
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.get(f"{address}/api/jobs/", headers=headers, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def ray_head(num_cpus: int = 4) -> Iterator[Head]:
    # A short temp dir: Ray's socket paths must fit in 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="kh", dir="/tmp"))
    token_path = temp_dir / "auth_token"
    token = secrets.token_hex(16)
    token_path.write_text(token)
    port, dashboard_port = free_port(), free_port()
    env = head_env(token_path)
    process = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            # Loopback only, and no default port another Ray on the machine may hold.
            "--node-ip-address=127.0.0.1",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: stopped as a whole below
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        if not wait_for(lambda: dashboard_up(address, token), timeout_s=60, interval_s=0.5):
            process.kill()
            raise RuntimeError(f"ray start --head did not come up: {process.stderr.read()!r}")
        yield Head(address, f"127.0.0.1:{port}", token_path, env)
    finally:
        stop_head(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_head(process: subprocess.Popen) -> None:
    """SIGTERM to the group (Ray's processes exit gracefully on it), then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        # poll() reaps `ray start` itself: a zombie would keep the group "alive".
        if wait_for(lambda: process.poll() is not None and not group_alive(process.pid), 5):
            break
    process.wait(timeout=10)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
