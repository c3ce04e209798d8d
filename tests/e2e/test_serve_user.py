"""`kiln serve` as a user runs it: train, create a key, serve with auth on (the default), then
predict, feedback, metrics, explain and the console, now and again after the key cache has
expired twice over, and stop it with Ctrl-C.

Issue 29: the Registry actor died once `kiln serve` dropped its handle, and every keyed
request answered 503 one key-cache period after the start; no in-process test could see it,
because the tests held a handle that the real command drops.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from kiln.serving.schemas import ServeArgs
from tests.conftest import free_port
from tests.e2e.kiln_process import KilnServe, kiln, kiln_env, kiln_json

KEY_CACHE_S = ServeArgs.model_fields["auth_cache_ttl_s"].default
"""How long a replica trusts the registry's verdict on a key (5 s)."""


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Kiln home with `dgm` (digits MLP, defaults) trained by `kiln train`, and a key."""
    home = tmp_path_factory.mktemp("e2e-home")
    env = kiln_env(home, free_port())
    trained = kiln_json(
        env, "train", "--data", "sklearn:digits", "--model", "mlp", "--register", "dgm"
    )
    assert trained["version"] == 1
    made = kiln_json(env, "keys", "create", "--scope", "predict:*", "--scope", "feedback:*")
    return {"home": home, "secret": made["secret"]}


@pytest.fixture
def served(trained_home: dict[str, Any], tmp_path: Path) -> Iterator[KilnServe]:
    env = kiln_env(trained_home["home"], free_port())
    server = KilnServe(env, ["dgm"], tmp_path / "serve.log").start()
    try:
        yield server
    finally:
        server.kill()


def digits_rows(count: int, offset: int = 0) -> tuple[list[list[float]], list[int]]:
    data = load_digits()
    rows = slice(offset, offset + count)
    return data.data[rows].tolist(), data.target[rows].tolist()


def check_every_route(client: httpx.Client, secret: str, offset: int) -> None:
    """Each route a user calls answers as it should, with the key on every request."""
    rows, labels = digits_rows(16, offset)
    auth = {"Authorization": f"Bearer {secret}"}

    predicted = client.post("/v1/models/dgm:predict", json={"instances": rows}, headers=auth)
    assert predicted.status_code == 200, predicted.text
    body = predicted.json()
    assert np.mean(np.array(body["predictions"]) == np.array(labels)) >= 0.75
    assert len(body["ids"]) == len(rows)

    fed = client.post(
        "/v1/models/dgm:feedback", json={"ids": body["ids"], "labels": labels}, headers=auth
    )
    assert fed.status_code == 200, fed.text
    assert fed.json() == {"accepted": len(rows), "unknown_ids": []}

    metrics = client.get("/v1/models/dgm/metrics", params={"window": "1h"}, headers=auth)
    assert metrics.status_code == 200, metrics.text

    explained = client.post("/v1/models/dgm:explain", json={"instances": rows[:2]}, headers=auth)
    assert explained.status_code == 200, explained.text
    assert len(explained.json()["explanations"]) == 2

    for page in (
        "/ui/fragments/models",
        "/ui/fragments/models/dgm",
        "/ui/fragments/models/dgm/versions/1",
        "/ui/fragments/models/dgm/monitor",
    ):
        shown = client.get(page, headers=auth)
        assert shown.status_code == 200, f"{page}: {shown.status_code} {shown.text[:300]}"
        assert "dgm" in shown.text

    refused = client.post("/v1/models/dgm:predict", json={"instances": rows})
    assert refused.status_code == 401


def predict_until(client: httpx.Client, secret: str, until: float) -> int:
    """Light traffic (about 4 requests/s) until the monotonic time `until`; every answer must
    be 200. Returns the number of requests."""
    rows, _ = digits_rows(1)
    sent = 0
    while time.monotonic() < until:
        answer = client.post(
            "/v1/models/dgm:predict",
            json={"instances": rows},
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert answer.status_code == 200, f"after {sent} requests: {answer.text}"
        sent += 1
        time.sleep(0.25)  # pacing of the traffic, not a wait for a condition
    return sent


def test_keyed_routes_answer_now_and_after_the_key_cache_expired(served, trained_home):
    secret = trained_home["secret"]
    with httpx.Client(base_url=served.url, timeout=60) as client:
        check_every_route(client, secret, offset=0)
        # Twice the key cache's lifetime, with traffic: the cached verdict expires and every
        # later request asks the registry again.
        predict_until(client, secret, time.monotonic() + 2 * KEY_CACHE_S + 1)
        check_every_route(client, secret, offset=100)
        # A key created while the server runs works too (the registry reads the same file).
        new = kiln_json(served.env, "keys", "create", "--scope", "predict:dgm")["secret"]
        answer = client.post(
            "/v1/models/dgm:predict",
            json={"instances": digits_rows(1)[0]},
            headers={"Authorization": f"Bearer {new}"},
        )
        assert answer.status_code == 200, answer.text
    assert served.interrupt() == 0
    assert served.survivors() == []


@pytest.mark.slow
def test_serve_answers_after_two_minutes_of_light_traffic(served, trained_home):
    secret = trained_home["secret"]
    with httpx.Client(base_url=served.url, timeout=60) as client:
        sent = predict_until(client, secret, time.monotonic() + 120)
        assert sent > 200
        check_every_route(client, secret, offset=200)
    assert served.interrupt() == 0
    assert served.survivors() == []


@pytest.mark.slow  # the keyed test above ends with the same check; this one names it alone
def test_ctrl_c_leaves_no_ray_process(served):
    assert len(served.ray_processes) >= 3  # GCS, raylet, replica at least
    assert served.interrupt() == 0
    assert served.survivors() == []
    assert "stopping" in served.log()


@pytest.mark.slow
def test_sigterm_stops_serve_as_ctrl_c_does(served):
    """A service manager's stop (SIGTERM) shuts Serve and Ray down in order."""
    served.record_processes()
    assert served.process is not None
    served.process.terminate()
    assert served.process.wait(timeout=60) == 0
    assert served.survivors() == []
    assert "stopping" in served.log()


@pytest.mark.slow
def test_ctrl_c_stops_serve_started_with_sigint_ignored(trained_home, tmp_path):
    """A script's background job inherits SIGINT ignored; `kill -INT` still stops kiln serve
    (it waited for the sender's SIGKILL, 60 s later, in a benchmark run that way)."""
    env = kiln_env(trained_home["home"], free_port())
    server = KilnServe(env, ["dgm"], tmp_path / "serve.log", sigint_ignored=True).start()
    try:
        assert server.interrupt(timeout_s=45) == 0
        assert server.survivors() == []
    finally:
        server.kill()


def test_a_busy_port_is_one_line_before_ray_starts(trained_home):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = kiln_env(trained_home["home"], busy.getsockname()[1])
        done = kiln(env, "serve", "dgm")
    assert done.returncode == 2
    assert "cannot listen on 127.0.0.1" in done.stderr and "--port" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_model_name_is_one_line_and_starts_nothing(trained_home):
    env = kiln_env(trained_home["home"], free_port())
    done = kiln(env, "serve", "nosuch")
    assert done.returncode == 2
    assert "no model named nosuch is registered" in done.stderr
    assert "Traceback" not in done.stderr
