"""The Serve application over real HTTP on loopback: predictions and every bad input."""

import httpx
import numpy as np
import pytest

from kiln.actors.shards import load_shards
from kiln.actors.sources import SourceSpec


@pytest.fixture(scope="module")
def served_digits(trained_digits, settings_session, registry_session):
    from kiln.serving_control import deploy_models

    # Keys are tested in test_http_auth.py; here every request is about the payload. The
    # trained version is pinned: other modules register more digits-mlp versions in the same
    # session registry, and the bare name would serve the newest of them.
    return deploy_models(settings_session, [trained_digits.record.ref], auth=False)


@pytest.fixture(scope="module")
def digits_test_rows(ray_local):
    test = load_shards(SourceSpec(uri="sklearn:digits"), "test", 1)
    try:
        _, x, y = test.read_arrays()
    finally:
        test.release()
    return x, y


def predict(url: str, body=None, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/digits-mlp:predict", json=body, timeout=30, **kwargs)


def test_served_predictions_match_the_evaluated_accuracy(
    served_digits, digits_test_rows, trained_digits
):
    x, y = digits_test_rows
    response = predict(served_digits, {"instances": x.tolist()})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "digits-mlp" and body["model_version"] == trained_digits.record.version
    assert len(body["ids"]) == len(x) == len(set(body["ids"]))
    accuracy = np.mean(np.asarray(body["predictions"]) == y)
    assert accuracy == pytest.approx(trained_digits.test_metrics["accuracy"])


def test_probabilities_on_request(served_digits, digits_test_rows):
    x, _ = digits_test_rows
    body = predict(served_digits, {"instances": x[:3].tolist(), "return": "probabilities"}).json()
    probs = np.asarray(body["probabilities"])
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert probs.argmax(axis=1).tolist() == body["predictions"]


def test_version_and_model_listing(served_digits, trained_digits):
    version = trained_digits.record.version
    assert (
        httpx.post(
            f"{served_digits}/v1/models/digits-mlp@{version}:predict",
            json={"instances": [[0.0] * 64]},
        ).status_code
        == 200
    )
    listing = httpx.get(f"{served_digits}/v1/models").json()["models"]
    assert [(m["name"], m["version"], m["num_features"]) for m in listing] == [
        ("digits-mlp", version, 64)
    ]


@pytest.mark.parametrize(
    "content,status,fragment",
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"instances": [[1, 2, 3]]}', 422, "has 3 values; this model takes 64 (f0, f1"),
        (b'{"instances": [[' + b",".join([b"1"] * 63) + b", 1e999]]}", 422, "infinite"),
        (b'{"instances": [[' + b",".join([b"1"] * 63) + b', "x"]]}', 422, '"f63" takes a number'),
        (b'{"instances": [{"f0": 1, "colour": 2}]}', 422, 'unknown input "colour"'),
        (b'{"instances": []}', 422, "empty"),
        (b'{"rows": []}', 422, "instances"),
        (b"[1, 2]", 422, "dictionary"),
    ],
)
def test_bad_bodies_get_a_4xx_with_an_error(served_digits, content, status, fragment):
    response = predict(served_digits, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert fragment in response.json()["error"]


def test_null_and_nan_are_missing_values_imputed_with_the_training_mean(
    served_digits, trained_digits
):
    """A model trained with its inputs recorded imputes a missing value (null, NaN, or a key
    left out of an object) with the training mean, as it would a missing cell in training."""
    means = trained_digits.record.spec["mean"]
    row = [1.0] * 64
    expected = predict(served_digits, {"instances": [row[:10] + [means[10]] + row[11:]]})
    holes = b'{"instances": [[' + b",".join([b"1"] * 10 + [b"null"] + [b"1"] * 53) + b"]]}"
    nan = b'{"instances": [[' + b",".join([b"1"] * 10 + [b"NaN"] + [b"1"] * 53) + b"]]}"
    named = {"instances": [{f"f{i}": 1.0 for i in range(64) if i != 10}]}
    for reply in (
        predict(served_digits, content=holes, headers={"content-type": "application/json"}),
        predict(served_digits, content=nan, headers={"content-type": "application/json"}),
        predict(served_digits, named),
    ):
        assert reply.status_code == 200, reply.text
        assert reply.json()["predictions"] == expected.json()["predictions"]


def test_unknown_model_is_404(served_digits):
    response = httpx.post(
        f"{served_digits}/v1/models/nope:predict", json={"instances": [[0.0] * 64]}
    )
    assert response.status_code == 404
    assert "nope" in response.json()["error"]


def test_oversized_body_is_413(served_digits):
    response = predict(served_digits, content=b"[" + b"0," * (5 * 1024 * 1024) + b"0]")
    assert response.status_code == 413
    assert "limit" in response.json()["error"]


def test_openapi_describes_the_predict_schemas(served_digits):
    spec = httpx.get(f"{served_digits}/openapi.json").json()
    operation = spec["paths"]["/v1/models/{name}:predict"]["post"]
    assert "instances" in str(operation["requestBody"])
    assert {"200", "400", "404", "413", "422"} <= set(operation["responses"])
