"""`ray up cluster_configs/local.yaml` for real, against 127.0.0.1 over SSH (slow).

cluster_configs/loopback_sshd.sh installs openssh-server and rsync when missing (apt), makes
user kiln-rayup and runs sshd on loopback only, with key auth. The cluster runs as that user:
its `ray stop` (in the start commands and in `ray down`) cannot touch this user's Ray
processes, the test session's own Ray included.

The config is local.yaml with only what a user edits changed (head 127.0.0.1 with no workers,
that user and key, a token file) plus what sharing one machine needs: free ports instead of
Ray's defaults, and pip's own index for torch (this machine reaches package registries, not
download.pytorch.org). Everything else (file_mounts, rsync_exclude, setup_commands, the venv
activated in ~/.bashrc) is the YAML as shipped. Then a Kiln training job goes in through
the Jobs API, a second job reads the model back from the cluster's registry, and `ray down`
must leave no Ray process of that user behind.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.jobs import last_json_line
from tests.cluster.headnode import dashboard_up
from tests.conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
USER = "kiln-rayup"
TORCH_INDEX = " --index-url https://download.pytorch.org/whl/cpu"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def can_run() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "needs root: it installs openssh-server and rsync and creates user kiln-rayup"
    if not shutil.which("apt-get") and not os.path.exists("/usr/sbin/sshd"):
        return "needs openssh-server, or apt-get to install it"
    return None


@pytest.fixture
def sshd() -> Iterator[tuple[Path, int]]:
    why = can_run()
    if why:
        pytest.skip(why)
    work = Path(tempfile.mkdtemp(prefix="kru", dir="/tmp"))
    script = ROOT / "cluster_configs" / "loopback_sshd.sh"
    try:
        subprocess.run(["bash", str(script), "start", str(work)], check=True, timeout=600)
        yield work, int((work / "port").read_text())
    finally:
        subprocess.run(["bash", str(script), "stop", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def relay_command(port: int) -> str:
    """A ProxyCommand reaching sshd on a port other than 22 (Ray always dials 22)."""
    return f"{sys.executable} {ROOT / 'tests' / 'cluster' / 'tcp_relay.py'} 127.0.0.1 {port}"


def loopback_config(work: Path, port: int, token_path: Path) -> tuple[dict[str, Any], int]:
    cfg = yaml.safe_load((ROOT / "cluster_configs" / "local.yaml").read_text())
    cfg["cluster_name"] = f"kiln-rayup-{secrets.token_hex(3)}"
    cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    cfg["min_workers"] = cfg["max_workers"] = 0
    cfg["auth"] = {"ssh_user": USER, "ssh_private_key": str(work / "id_ed25519")}
    if port != 22:
        cfg["auth"]["ssh_proxy_command"] = relay_command(port)
    # The same two mounts as shipped, with absolute local sides.
    assert set(cfg["file_mounts"]) == {"~/kiln", "~/.ray/auth_token"}, cfg["file_mounts"]
    cfg["file_mounts"] = {"~/kiln": str(ROOT), "~/.ray/auth_token": str(token_path)}
    torch_lines = [c for c in cfg["setup_commands"] if TORCH_INDEX in c]
    assert len(torch_lines) == 1, cfg["setup_commands"]
    cfg["setup_commands"] = [c.replace(TORCH_INDEX, "") for c in cfg["setup_commands"]]
    gcs, dashboard = free_port(), free_port()
    head = [c for c in cfg["head_start_ray_commands"] if "ray start --head" in c]
    assert len(head) == 1 and "--port=6379" in head[0] and "--dashboard-port=8265" in head[0]
    extra = (
        f" --num-cpus=4 --dashboard-agent-listen-port={free_port()}"
        f" --dashboard-agent-grpc-port={free_port()} --metrics-export-port={free_port()}"
        f" --ray-client-server-port={free_port()}"
    )
    cfg["head_start_ray_commands"] = [
        c.replace("--port=6379", f"--port={gcs}").replace(
            "--dashboard-port=8265", f"--dashboard-port={dashboard}"
        )
        + (extra if c is head[0] else "")
        for c in cfg["head_start_ray_commands"]
    ]
    return cfg, dashboard


def ray_cli(*args: str, timeout_s: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KILN_"))}
    return subprocess.run(
        [str(BIN / "ray"), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**env, "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"},
    )


def kiln(token_path: Path, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KILN_"))}
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        env={**env, "RAY_AUTH_TOKEN_PATH": str(token_path)},
    )


def ray_processes_of(user: str) -> list[str]:
    uid = pwd.getpwnam(user).pw_uid
    found = subprocess.run(["pgrep", "-a", "-U", str(uid)], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if "ray" in line or "gcs_server" in line]


def test_ray_up_local_yaml_over_loopback_ssh(sshd, tmp_path):
    work, port = sshd
    token_path = work / "auth_token"
    token = secrets.token_hex(16)
    token_path.write_text(token)
    cfg, dashboard_port = loopback_config(work, port, token_path)
    config_path = work / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    address = f"http://127.0.0.1:{dashboard_port}"
    up = ray_cli("up", "-y", "--no-config-cache", str(config_path), timeout_s=900)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert wait_for(lambda: dashboard_up(address, token), timeout_s=60, interval_s=0.5)
        # The cluster runs as its own user, from the venv the setup commands made.
        assert any("gcs_server" in p for p in ray_processes_of(USER)), ray_processes_of(USER)

        name = f"rayup-iris-{secrets.token_hex(3)}"
        train = kiln(
            token_path,
            "submit",
            "--address",
            address,
            "--wait",
            "--env",
            "OMP_NUM_THREADS=1",
            "--",
            "kiln",
            "train",
            "--data",
            "sklearn:iris",
            "--model",
            "logistic",
            "--solver",
            "adam",
            "--workers",
            "2",
            "--epochs",
            "20",
            "--lr",
            "0.3",
            "--register",
            name,
            "--json",
        )
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        result = last_json_line(train.stdout)
        assert result is not None, train.stdout[-3000:] + train.stderr[-3000:]
        assert result["model"] == name and result["version"] == 1, result
        assert result["num_workers"] == 2 and result["metrics"]["accuracy"] >= 0.85, result

        # A second job reads the model back from the cluster's registry (the job's KILN_HOME
        # is the cluster user's ~/.kiln: it only exists over there).
        show = kiln(token_path, "submit", "--address", address, "--wait", "--", "kiln",
                    "models", "show", name, "--json")  # fmt: skip
        assert show.returncode == 0, show.stdout[-3000:] + show.stderr[-3000:]
        record = last_json_line(show.stdout)
        assert record is not None and record["name"] == name and record["version"] == 1, record
        assert record["metrics"]["accuracy"] == pytest.approx(result["metrics"]["accuracy"])
        home = Path(pwd.getpwnam(USER).pw_dir)
        assert (home / ".kiln").is_dir(), "the job's registry is not in the cluster user's home"

        listed = kiln(token_path, "jobs", "list", "--address", address, "--json")
        assert listed.returncode == 0, listed.stderr
        assert [j["status"] for j in json.loads(listed.stdout)] == ["SUCCEEDED", "SUCCEEDED"]
    finally:
        down = ray_cli("down", "-y", str(config_path), timeout_s=300)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    # `ray down` without `ray` on the remote login shell's PATH reports success and stops
    # nothing: only the absence of the cluster user's Ray processes shows it worked.
    assert wait_for(lambda: not ray_processes_of(USER), timeout_s=60), ray_processes_of(USER)
    assert not dashboard_up(address, token)
