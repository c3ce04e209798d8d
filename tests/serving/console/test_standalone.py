"""`kiln ui`: the console over the registry and storage alone, no model deployed. The app is
the one the command runs (serving/console/standalone.py), served by uvicorn on loopback;
the command itself starts in its own process in the slow test."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest
import ray
import uvicorn

from kiln.runtime import free_port
from tests.conftest import wait_for


def serve_in_thread(app) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: server.started, timeout_s=30)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def ui_with_keys(trained_digits, registry_session):
    from kiln.serving.console.standalone import build_console_app

    yield from serve_in_thread(build_console_app(registry_session, auth=True))


@pytest.fixture(scope="module")
def ui_without_keys(trained_digits, registry_session):
    from kiln.serving.console.standalone import build_console_app

    yield from serve_in_thread(build_console_app(registry_session, auth=False))


def test_the_standalone_console_asks_for_keys_like_the_served_one(ui_with_keys, registry_session):
    assert httpx.get(f"{ui_with_keys}/ui/fragments/models", timeout=30).status_code == 401
    secret = ray.get(registry_session.create_key.remote(["predict:digits-mlp"], None))["secret"]
    headers = {"Authorization": f"Bearer {secret}"}
    page = httpx.get(f"{ui_with_keys}/ui/fragments/models", headers=headers, timeout=30)
    assert page.status_code == 200 and 'href="/ui/models/digits-mlp"' in page.text
    assert httpx.get(f"{ui_with_keys}/", timeout=30, follow_redirects=True).url.path == "/ui"


def test_without_keys_every_page_is_open_and_the_shell_says_so(ui_without_keys, trained_digits):
    shell = httpx.get(f"{ui_without_keys}/ui", timeout=30).text
    assert 'data-auth="off"' in shell
    version = trained_digits.record.version
    page = httpx.get(
        f"{ui_without_keys}/ui/fragments/models/digits-mlp/versions/{version}", timeout=60
    )
    assert page.status_code == 200 and trained_digits.record.artifacts["spec.json"] in page.text
    # Monitoring reads the prediction log from storage: no deployment is needed to show it.
    monitor = httpx.get(f"{ui_without_keys}/ui/fragments/models/digits-mlp/monitor", timeout=60)
    assert monitor.status_code == 200 and 'id="total-requests"' in monitor.text


def test_the_standalone_console_explains_on_its_own_thread(ui_without_keys, trained_digits):
    version = trained_digits.record.version
    answer = httpx.post(
        f"{ui_without_keys}/ui/api/models/digits-mlp/versions/{version}/explain",
        json={"row": 1, "method": "integrated_gradients"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert found["prediction"] in trained_digits.record.spec["classes"]
    assert found["target"] == found["prediction"]  # the predicted class is explained
    assert len(found["attributions"]) == 20


@pytest.mark.slow
def test_kiln_ui_serves_the_console_until_stopped(tmp_path):
    port = free_port()
    env = {**os.environ, "KILN_HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "ui", "--port", str(port), "--no-auth"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/ui", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_for(answers, timeout_s=120, interval_s=1)
        page = httpx.get(f"{url}/ui/fragments/models", timeout=30)
        assert page.status_code == 200 and 'id="empty"' in page.text  # a fresh home
        script = httpx.get(f"{url}/ui/static/vendor/chart.umd.min.js", timeout=30)
        assert script.status_code == 200 and len(script.content) > 100_000
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    assert process.returncode is not None and "Traceback" not in output, output
