"""The routes with their dependencies overridden: a real model host, no Ray, no Serve."""

import numpy as np
import pytest
from fastapi.testclient import TestClient

from kiln.actors.keys import KeyCheck
from kiln.actors.registry import RegistryService
from kiln.actors.replica import ModelReplica
from kiln.serving.app import api
from kiln.serving.auth import BearerAuth
from kiln.serving.dependencies import get_auth, get_host
from kiln.serving.host import ModelHost, Served
from kiln.serving.ratelimit import RateLimiter
from kiln.serving.routing import Router
from kiln.serving.schemas import ServeArgs
from tests.conftest import TINY_SPEC, tiny_model_files

SECRET = "kiln_0123456789ab_abcdefghijklmnop"
ROWS = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0]]


@pytest.fixture(scope="module")
def tiny_replica(tmp_path_factory) -> ModelReplica:
    home = tmp_path_factory.mktemp("routes")
    service = RegistryService(str(home / "registry.db"), str(home / "store"), recover=False)
    record = service.register("m", tiny_model_files(), TINY_SPEC, {"accuracy": 0.5}, {})
    service.close()
    return ModelReplica(record, str(home / "store"))


@pytest.fixture
def host(tiny_replica, monkeypatch) -> ModelHost:
    # Every pass runs inline: Serve's batch queue needs a replica context (the Serve tests).
    monkeypatch.setattr("kiln.serving.host.INLINE_FORWARD_S", float("inf"))
    served = ModelHost(ServeArgs(models=["m"]), registry=None)
    router = Router()
    router.add(tiny_replica.record.ref, "production", default=True)
    served.served = Served({tiny_replica.record.ref: tiny_replica}, router)
    return served


def client_for(host: ModelHost, auth: BearerAuth | None = None) -> TestClient:
    async def the_host() -> ModelHost:
        return host

    async def the_auth() -> BearerAuth | None:
        return auth

    api.dependency_overrides[get_host] = the_host
    api.dependency_overrides[get_auth] = the_auth
    return TestClient(api)


@pytest.fixture(autouse=True)
def no_overrides_left():
    yield
    api.dependency_overrides.clear()


def key_with(*scopes: str) -> BearerAuth:
    async def verify(secret: str) -> KeyCheck:
        return KeyCheck(ok=True, reason="ok", key_id="0123456789ab", scopes=scopes)

    return BearerAuth(verify)


def test_predict_answers_with_the_hosted_model(host, tiny_replica):
    reply = client_for(host).post("/v1/models/m@production:predict", json={"instances": ROWS})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = tiny_replica.predict(np.asarray(ROWS, dtype=np.float32))["predictions"]
    assert body["predictions"] == expected
    assert (body["model"], body["model_version"], len(body["ids"])) == ("m", 1, 2)


def test_the_model_config_lists_inputs_and_outputs_as_triton_does(host):
    config = client_for(host).get("/v2/models/m/config").json()
    assert config["input"] == [{"name": "features", "data_type": "TYPE_FP32", "dims": [4]}]
    assert [(o["name"], o["dims"]) for o in config["output"]] == [
        ("predictions", []),
        ("probabilities", [3]),
    ]
    assert config["max_batch_size"] == config["parameters"]["batching"]["max_batch_size"]


def test_host_errors_answer_with_their_status_and_an_error_body(host):
    client = client_for(host)
    missing = client.get("/v1/models/ghost")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": "model 'ghost' is not served here; served: m, m@1, m@production"
    }
    short = client.post("/v1/models/m:predict", json={"instances": [[1.0, 2.0]]})
    assert short.status_code == 422 and "instance 0 has 2 values" in short.json()["error"]
    v2_bad = client.post(
        "/v2/models/m/infer",
        json={"inputs": [{"name": "features", "shape": [1, 4], "datatype": "BOOL", "data": [1]}]},
    )
    assert v2_bad.status_code == 422 and "datatype 'BOOL'" in v2_bad.json()["error"]


def test_ready_is_503_until_a_model_is_loaded():
    empty = ModelHost(ServeArgs(models=["m"]), registry=None)
    reply = client_for(empty).get("/v2/health/ready")
    assert (reply.status_code, reply.json()) == (503, {"error": "no model is loaded yet"})


def test_the_authorized_dependency_refuses_before_the_route_runs(host):
    client = client_for(host, key_with("predict:other"))
    anonymous = client.get("/v1/models/m")
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == 'Bearer realm="kiln"'
    # Refused before the lookup: an unknown model is 401/403 too, not 404.
    assert client.get("/v1/models/ghost").status_code == 401
    headers = {"Authorization": f"Bearer {SECRET}"}
    denied = client.post("/v1/models/m:predict", json={"instances": ROWS}, headers=headers)
    assert denied.status_code == 403 and "lacks scope predict:m" in denied.json()["error"]
    assert client.get("/v1/models", headers=headers).json() == {
        "models": [],
        "object": "list",
        "data": [],
    }
    allowed = client_for(host, key_with("predict:m"))
    assert allowed.get("/v1/models/m", headers=headers).json()["aliases"] == ["production"]
    assert [m["name"] for m in allowed.get("/v1/models", headers=headers).json()["models"]] == ["m"]


def test_a_key_past_its_rate_gets_429_with_retry_after(host):
    host.limiter = RateLimiter(rate_per_s=0.01, burst=1)
    client = client_for(host, key_with("predict:m"))
    headers = {"Authorization": f"Bearer {SECRET}"}
    assert client.get("/v1/models/m", headers=headers).status_code == 200
    limited = client.get("/v1/models/m", headers=headers)
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) in (100, 101)


def test_a_request_waiting_in_the_batch_queue_keeps_its_version_across_a_reconfigure(
    tiny_replica,
):
    """A promote or rollback swaps the routing table while requests wait in a batch queue:
    each still runs on the version it was routed to (a KeyError and a 500 before)."""
    import asyncio

    host = ModelHost(ServeArgs(models=["m"], batch_wait_timeout_s=0.5), registry=None)
    router = Router()
    router.add(tiny_replica.record.ref, "production", default=True)
    host.served = Served({tiny_replica.record.ref: tiny_replica}, router)
    host.more_requests_coming = lambda queued: True  # the batch waits its 0.5 s
    x = np.asarray(ROWS, dtype=np.float32)

    async def main() -> np.ndarray:
        waiting = asyncio.ensure_future(host.forward(tiny_replica.record.ref, x))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # in the queue, waiting for its batch
        host.served = Served({}, Router())  # the version is no longer routed to
        return await asyncio.wait_for(waiting, 10)

    assert np.array_equal(asyncio.run(main()), tiny_replica.forward(x))
