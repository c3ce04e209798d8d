"""`kiln ui --tls-self-signed` and `kiln demo --tls-self-signed` as a user runs them: each
prints its certificate's fingerprint, answers over HTTPS to a client that trusts that
certificate, and gives plain HTTP (or a client without it) no page. The console's frontend
ends with Ctrl-C; the demo queries its own model over HTTPS and matches its test accuracy."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from kiln.tls import fingerprint
from tests.conftest import free_port, wait_for
from tests.e2e.kiln_process import KILN, kiln, kiln_env

pytestmark = pytest.mark.slow


def printed_fingerprint(text: str) -> str:
    found = re.search(r"SHA-256 fingerprint ([0-9A-F:]{95})", text)
    assert found, text[-2000:]
    return found.group(1)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_console_over_tls_and_not_in_clear(tmp_path: Path) -> None:
    port = free_port()
    env = kiln_env(tmp_path, free_port())
    log_path = tmp_path / "ui.log"
    with log_path.open("w") as log:
        ui = subprocess.Popen(
            [*KILN, "ui", "--no-auth", "--tls-self-signed", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cert = tmp_path / "tls" / "self-signed.crt"
    base = f"https://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/ui/", verify=str(cert), timeout=5).status_code == 200
        except (httpx.HTTPError, OSError):
            return False

    try:
        assert wait_for(up, 180), log_path.read_text()[-3000:]
        assert printed_fingerprint(log_path.read_text()) == fingerprint(cert)
        page = httpx.get(f"{base}/ui/fragments/models", verify=str(cert), timeout=30)
        assert page.status_code == 200
        with pytest.raises(httpx.ConnectError):  # the certificate is not trusted without it
            httpx.get(f"{base}/ui/", timeout=10)
        try:
            plain = httpx.get(f"http://127.0.0.1:{port}/ui/", timeout=10)
            assert plain.status_code != 200
        except httpx.HTTPError:
            pass  # HAProxy closes a connection that does not start a TLS handshake
    finally:
        ui.send_signal(signal.SIGINT)
        try:
            ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            ui.kill()
    assert ui.returncode is not None
    assert wait_for(lambda: not listening(port), 30), "the TLS frontend outlived kiln ui"


def test_demo_queries_itself_over_tls(tmp_path: Path) -> None:
    port = free_port()
    env = kiln_env(tmp_path, port)
    done = kiln(
        env,
        "demo",
        "--json",
        "--tls-self-signed",
        "--epochs",
        "5",
        "--port",
        str(port),
        "--home",
        str(tmp_path),
        timeout_s=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["url"] == f"https://127.0.0.1:{port}"
    assert summary["num_requests"] > 0
    assert summary["served_accuracy"] == summary["test_accuracy"]  # answers came over TLS
    cert = tmp_path / "tls" / "self-signed.crt"
    assert printed_fingerprint(done.stdout + done.stderr) == fingerprint(cert)
    assert wait_for(lambda: not listening(port), 30), "the TLS frontend outlived kiln demo"
