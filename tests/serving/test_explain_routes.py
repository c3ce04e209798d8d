"""`:explain` through FastAPI's routes over real replicas loaded from a registry (no Ray, no
Serve): the answer's shape and numbers, the limits, the keys, and both backends."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from safetensors.numpy import save as save_safetensors

from kiln.actors.registry import RegistryService
from kiln.actors.replica import ModelReplica
from kiln.serving.app import api
from kiln.serving.explain import MAX_EXPLAIN_INSTANCES, Explainers, ThreadExplainers
from kiln.serving.host import ModelHost, Served
from kiln.serving.routes.explain import get_explainers
from kiln.serving.routing import Router
from kiln.serving.schemas import ServeArgs
from kiln.training.artifacts import model_from_files
from kiln.training.drift import REFERENCE_FILE
from kiln.training.explain import GAUSSIAN_SAMPLE, REFERENCE_SAMPLE, TRAINING_MEAN, training_mean
from kiln.training.export import ONNX_FILE, onnx_bytes
from kiln.training.tabular import Encoding
from tests.conftest import TINY_SPEC, tiny_model_files
from tests.serving.test_routes import client_for, key_with, no_overrides_left  # noqa: F401
from tests.serving.test_tabular_serving import (
    CHURN,
    CHURN_WEIGHT,
    CUSTOMERS,
    PRICE,
    linear_files,
)

ROWS = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0], [3.0, 0.0, -2.0, 1.0]]
REFERENCE_ROWS = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """tiny (an MLP, with a training sample), churn (a table logistic) and price (a regressor);
    churn also as ONNX Runtime serves it (model.onnx added as `kiln export` adds it)."""
    home = tmp_path_factory.mktemp("explain")
    root = str(home / "store")
    service = RegistryService(str(home / "registry.db"), root, recover=False)
    reference = save_safetensors({"sample": REFERENCE_ROWS})
    tiny = {**tiny_model_files(), REFERENCE_FILE: reference}
    records = {
        "tiny": service.register("tiny", tiny, TINY_SPEC, {}, {}),
        "churn": service.register("churn", linear_files(CHURN, CHURN_WEIGHT), CHURN, {}, {}),
        "price": service.register(
            "price", linear_files(PRICE, np.array([[1.0, 10.0]], dtype=np.float32)), PRICE, {}, {}
        ),
    }
    yield records, root, service
    service.close()


@pytest.fixture(scope="module")
def replicas(store):
    records, root, _ = store
    return {name: ModelReplica(r, root, gpu="off") for name, r in records.items()}


@pytest.fixture(scope="module")
def onnx_replicas(store, replicas):
    """churn also as ONNX Runtime serves it: "churn-onnx" (an export takes seconds)."""
    _, root, service = store
    churn_files = linear_files(CHURN, CHURN_WEIGHT)
    service.add_artifact("churn", 1, ONNX_FILE, onnx_bytes(*model_from_files(churn_files)))
    record = service.resolve("churn@1")
    onnx = ModelReplica(record, root, gpu="off", backend="onnxruntime")
    return {**replicas, "churn-onnx": onnx}


def client_of(replicas: dict[str, ModelReplica], root: str | None, monkeypatch, auth=None):
    monkeypatch.setattr("kiln.serving.host.INLINE_FORWARD_S", float("inf"))
    host = ModelHost(ServeArgs(models=["tiny"]), registry=None)
    router = Router()
    for name in replicas:
        router.add(name, default=True)  # served under its own name, whatever the version
    host.served = Served(dict(replicas), router)
    explainers = ThreadExplainers(lambda: root)

    async def the_explainers() -> Explainers:
        return explainers

    client = client_for(host, auth)
    api.dependency_overrides[get_explainers] = the_explainers
    return client


@pytest.fixture
def client(store, replicas, monkeypatch):
    return client_of(replicas, store[1], monkeypatch)


@pytest.fixture
def onnx_client(store, onnx_replicas, monkeypatch):
    return client_of(onnx_replicas, store[1], monkeypatch)


def explain(client, model: str, instances: list, **extra):
    return client.post(f"/v1/models/{model}:explain", json={"instances": instances, **extra})


def error_of(reply, status: int = 422) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert list(body) == ["error"]
    return body["error"]


def test_an_explanation_answers_the_predictions_and_complete_attributions(client, replicas):
    reply = explain(client, "tiny", ROWS)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    replica = replicas["tiny"]
    outputs = replica.forward(np.asarray(ROWS, dtype=np.float32))
    assert body["predictions"] == replica.predict(np.asarray(ROWS, np.float32))["predictions"]
    assert (body["model"], body["model_version"], body["inputs"]) == (
        "tiny",
        1,
        ["x0", "x1", "x2", "x3"],
    )
    assert "features" not in body
    mean_output = replica.forward(training_mean(TINY_SPEC)[None])[0]
    for row, explanation in enumerate(body["explanations"]):
        assert set(explanation) == {
            "attributions",
            "method",
            "baseline",
            "target",
            "convergence_delta",
        }
        assert explanation["method"] == "integrated_gradients"
        assert explanation["baseline"] == TRAINING_MEAN
        target = explanation["target"]
        assert target == body["predictions"][row]  # the predicted class by default
        change = outputs[row, target] - mean_output[target]
        assert sum(explanation["attributions"]) == pytest.approx(change, rel=0.01, abs=1e-5)
        assert abs(explanation["convergence_delta"]) <= 0.01 * abs(change) + 1e-5


def test_a_target_class_and_each_method(client):
    ig = explain(client, "tiny", ROWS[:1], target=2).json()["explanations"][0]
    assert ig["target"] == 2
    ablation = explain(client, "tiny", ROWS[:1], target=2, method="feature_ablation").json()
    assert ablation["explanations"][0]["convergence_delta"] is None
    shap = explain(client, "tiny", ROWS[:1], target=2, method="gradient_shap", n_steps=20).json()
    # tiny was registered with a training sample: GradientSHAP draws from it.
    assert shap["explanations"][0]["baseline"] == REFERENCE_SAMPLE
    assert ig["attributions"] != ablation["explanations"][0]["attributions"]


def test_gradient_shap_without_a_reference_falls_back_and_says_so(client):
    reply = explain(client, "price", [[1.0, 2.0]], method="gradient_shap")
    assert reply.status_code == 200, reply.text
    explanation = reply.json()["explanations"][0]
    assert explanation["baseline"] == GAUSSIAN_SAMPLE
    assert explanation["target"] is None


def test_a_table_model_is_explained_per_input_with_category_slots(client):
    reply = explain(client, "churn", CUSTOMERS, target="yes")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["predictions"] == ["no", "yes"]
    assert body["inputs"] == ["age", "income", "city", "plan"]
    assert body["features"][8:10] == ["plan=basic", "plan=pro"]
    encoding = Encoding.from_spec(CHURN)
    z = encoding.expand(encoding.rows_to_inputs(CUSTOMERS))
    expected = CHURN_WEIGHT[1] * (z - training_mean(CHURN))  # the logistic layer, std 1
    for row, explanation in enumerate(body["explanations"]):
        features = np.asarray(explanation["feature_attributions"])
        np.testing.assert_allclose(features, expected[row], rtol=1e-4, atol=1e-6)
        plan = features[8:12].sum()
        assert explanation["attributions"][3] == pytest.approx(plan, rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_an_onnx_runtime_version_is_explained_with_its_torch_weights(onnx_client):
    client = onnx_client
    torch_body = explain(client, "churn", CUSTOMERS).json()
    onnx_reply = explain(client, "churn-onnx", CUSTOMERS)
    assert onnx_reply.status_code == 200, onnx_reply.text
    onnx_body = onnx_reply.json()
    assert onnx_body["predictions"] == torch_body["predictions"]
    for a, b in zip(onnx_body["explanations"], torch_body["explanations"], strict=True):
        np.testing.assert_allclose(a["attributions"], b["attributions"], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_an_onnx_runtime_version_without_a_store_is_a_clear_422(onnx_replicas, monkeypatch):
    client = client_of({"churn-onnx": onnx_replicas["churn-onnx"]}, None, monkeypatch)
    message = error_of(explain(client, "churn-onnx", CUSTOMERS))
    assert "--backend torch" in message


@pytest.mark.parametrize(
    "extra,fragment",
    [
        ({"n_steps": 201}, "n_steps"),
        ({"n_steps": 0}, "n_steps"),
        ({"n_steps": "many"}, "n_steps"),
        ({"method": "lime"}, "method"),
        ({"target": 11}, "not a class of this model"),
        ({"target": "3"}, "not a class of this model"),
        ({"target": [1]}, "target"),
        ({"steps": 10}, "steps"),
    ],
)
def test_bad_requests_are_422_naming_the_field(client, extra, fragment):
    assert fragment in error_of(explain(client, "tiny", ROWS[:1], **extra))


def test_the_limits_are_64_instances_and_200_steps(client):
    # (16 rows: more go through Serve's batch queue, which needs a Serve replica)
    assert explain(client, "tiny", ROWS[:1] * 16, n_steps=200).status_code == 200
    message = error_of(explain(client, "tiny", ROWS[:1] * (MAX_EXPLAIN_INSTANCES + 1)))
    assert "at most 64" in message


def test_instances_are_checked_as_predict_checks_them(client):
    assert "shape" in error_of(explain(client, "tiny", [[1.0, 2.0]]))
    assert "unknown input" in error_of(explain(client, "churn", [{"town": "lima"}]))
    assert "regressor" in error_of(explain(client, "price", [[1.0, 2.0]], target=1))
    assert error_of(explain(client, "ghost", ROWS), 404)


def test_explain_takes_the_scopes_predict_takes(replicas, store, monkeypatch):
    def status(scope: str | None) -> int:
        auth = key_with(scope) if scope else None
        client = client_of(replicas, store[1], monkeypatch, auth)
        headers = {"Authorization": "Bearer kiln_0123456789ab_abcdefghijklmnop"}
        reply = client.post(
            "/v1/models/tiny:explain", json={"instances": ROWS[:1]}, headers=headers
        )
        return reply.status_code

    no_key = client_of(replicas, store[1], monkeypatch, key_with("predict:tiny"))
    assert no_key.post("/v1/models/tiny:explain", json={"instances": ROWS[:1]}).status_code == 401
    assert status("predict:tiny") == 200
    assert status("predict:*") == 200
    assert status("predict:churn") == 403
    assert status("feedback:tiny") == 403


def test_the_explained_model_is_a_copy_the_replica_keeps_serving_with(client, replicas):
    before = {k: v.clone() for k, v in replicas["tiny"].model.state_dict().items()}
    assert explain(client, "tiny", ROWS, method="gradient_shap").status_code == 200
    after = replicas["tiny"].model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in replicas["tiny"].model.parameters())


def test_past_the_queue_bound_a_caller_is_told_to_retry(store, replicas, monkeypatch):
    from tests.conftest import wait_for

    client = client_of(replicas, store[1], monkeypatch)
    explainers = ThreadExplainers(lambda: store[1], max_waiting=1)

    async def these() -> Explainers:
        return explainers

    api.dependency_overrides[get_explainers] = these
    gate = threading.Event()
    explainers.executor.submit(gate.wait)  # the one worker thread is busy
    answers: list[int] = []

    def ask() -> None:
        answers.append(explain(client, "tiny", ROWS[:1]).status_code)

    waiting = [threading.Thread(target=ask) for _ in range(2)]
    try:
        for count, thread in enumerate(waiting, start=1):
            thread.start()
            assert wait_for(lambda c=count: explainers.pending == c, timeout_s=30)
        refused = explain(client, "tiny", ROWS[:1])
        assert "queued" in error_of(refused, 429)
    finally:
        gate.set()
        for thread in waiting:
            thread.join(timeout=60)
    assert answers == [200, 200]
