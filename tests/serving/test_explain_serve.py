"""`:explain` on real Ray Serve over real HTTP, with API keys: the digits MLP's attributions are
complete, the scopes are predict's, and predict answers correctly while explanations run."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import ray

from kiln.actors.shards import load_shards
from kiln.actors.sources import SourceSpec
from kiln.training.drift import REFERENCE_FILE
from kiln.training.explain import GAUSSIAN_SAMPLE, REFERENCE_SAMPLE

pytestmark = pytest.mark.slow  # a Serve deployment of its own


@pytest.fixture(scope="module")
def served(trained_digits, settings_session, registry_session):
    from kiln.serving_control import deploy_models

    return deploy_models(settings_session, ["digits-mlp"], auth=True)


@pytest.fixture(scope="module")
def secret(registry_session) -> str:
    return ray.get(registry_session.create_key.remote(["predict:digits-mlp"], None))["secret"]


@pytest.fixture(scope="module")
def rows(ray_local) -> np.ndarray:
    test = load_shards(SourceSpec(uri="sklearn:digits"), "test", 1)
    try:
        _, x, _ = test.read_arrays()
    finally:
        test.release()
    return x


def post(url: str, verb: str, body: dict, secret: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.post(f"{url}/v1/models/digits-mlp:{verb}", json=body, headers=headers, timeout=60)


def test_served_explanations_are_complete_and_answer_the_predictions(served, secret, rows):
    x = rows[:8].tolist()
    reply = post(served, "explain", {"instances": x}, secret)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    predicted = post(served, "predict", {"instances": x}, secret).json()["predictions"]
    assert body["predictions"] == predicted
    assert len(body["inputs"]) == 64
    for explanation, label in zip(body["explanations"], predicted, strict=True):
        assert explanation["target"] == label and len(explanation["attributions"]) == 64
        change = sum(explanation["attributions"]) - explanation["convergence_delta"]
        assert abs(explanation["convergence_delta"]) <= 0.01 * abs(change)


def test_gradient_shap_draws_from_what_the_version_stores(served, secret, rows, trained_digits):
    reply = post(
        served, "explain", {"instances": rows[:2].tolist(), "method": "gradient_shap"}, secret
    )
    assert reply.status_code == 200, reply.text
    stored = REFERENCE_FILE in trained_digits.record.artifacts
    expected = REFERENCE_SAMPLE if stored else GAUSSIAN_SAMPLE
    assert {e["baseline"] for e in reply.json()["explanations"]} == {expected}


def test_explain_takes_predict_scopes(served, registry_session, rows):
    body = {"instances": rows[:1].tolist()}
    assert post(served, "explain", body, None).status_code == 401
    other = ray.get(registry_session.create_key.remote(["predict:other"], None))["secret"]
    assert post(served, "explain", body, other).status_code == 403
    assert post(served, "explain", {**body, "n_steps": 500}, other).status_code == 403


def test_predict_answers_correctly_while_explanations_run(served, secret, rows):
    expected = post(served, "predict", {"instances": rows[:4].tolist()}, secret).json()
    stop = threading.Event()
    answers: list[tuple[int, list | None]] = []

    def predict_until_stopped() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                r = client.post(
                    f"{served}/v1/models/digits-mlp:predict",
                    json={"instances": rows[:4].tolist()},
                    headers={"Authorization": f"Bearer {secret}"},
                )
                answers.append((r.status_code, r.json().get("predictions")))

    clients = [threading.Thread(target=predict_until_stopped) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        heavy = {"instances": rows[:64].tolist(), "n_steps": 200}
        explained = [post(served, "explain", heavy, secret) for _ in range(2)]
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=60)
    assert [r.status_code for r in explained] == [200, 200]
    assert answers and all(a == (200, expected["predictions"]) for a in answers)
