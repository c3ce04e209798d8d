"""Two models served on a cluster by `kiln serve --address`, a canary with `kiln deploy`, then
`kiln promote`: every command a subprocess, as an operator types them.

On a cluster `kiln serve` returns once the application answers, so nothing of the command
stays alive: the served app must keep working from the detached actors alone, past the
replicas' key cache.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sklearn.datasets import load_iris

from tests.cluster.headnode import Head, ray_head
from tests.conftest import free_port
from tests.e2e.kiln_process import kiln, kiln_env, kiln_json
from tests.e2e.test_serve_user import KEY_CACHE_S

pytestmark = [pytest.mark.slow, pytest.mark.multinode]


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    with ray_head() as started:
        yield started


@pytest.fixture(scope="module")
def operator_env(head: Head, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home: Path = tmp_path_factory.mktemp("canary-home")
    env = kiln_env(home, free_port())
    env.update(
        RAY_ADDRESS=head.gcs_address,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(head.token_path),
        PATH=head.env["PATH"],
    )
    return env


def versions_answering(url: str, secret: str, model: str, count: int) -> Counter:
    """Which version answered each of `count` requests for the bare name (all must be 200)."""
    rows = load_iris().data[:1].tolist()
    seen: Counter = Counter()
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(count):
            answer = client.post(
                f"/v1/models/{model}:predict",
                json={"instances": rows},
                headers={"Authorization": f"Bearer {secret}"},
            )
            assert answer.status_code == 200, answer.text
            seen[answer.json()["model_version"]] += 1
    return seen


def test_two_models_canary_then_promote(operator_env):
    env = operator_env
    url = f"http://127.0.0.1:{env['KILN_HTTP_PORT']}"
    for model in ("iris-a", "iris-a", "iris-b"):
        trained = kiln_json(
            env, "train", "--data", "sklearn:iris", "--model", "logistic", "--register", model
        )
        assert trained["model"] == model
    secret = kiln_json(env, "keys", "create", "--scope", "predict:*")["secret"]

    served = kiln(env, "serve", "iris-a@1", "iris-b", "--port", env["KILN_HTTP_PORT"])
    assert served.returncode == 0, served.stderr
    assert versions_answering(url, secret, "iris-b", 3) == Counter({1: 3})
    assert versions_answering(url, secret, "iris-a", 3) == Counter({1: 3})

    deployed = kiln(env, "deploy", "iris-a", "--version", "2", "--canary-weight", "50")
    assert deployed.returncode == 0, deployed.stderr
    split = versions_answering(url, secret, "iris-a", 40)
    assert set(split) == {1, 2}, split

    # Past the key cache, twice over: the command that deployed is long gone.
    deadline = time.monotonic() + 2 * KEY_CACHE_S + 1
    while time.monotonic() < deadline:
        versions_answering(url, secret, "iris-b", 1)
        time.sleep(0.5)  # pacing of the traffic

    promoted = kiln(env, "promote", "iris-a")
    assert promoted.returncode == 0, promoted.stderr
    assert versions_answering(url, secret, "iris-a", 10) == Counter({2: 10})
    assert versions_answering(url, secret, "iris-b", 3) == Counter({1: 3})
