"""Open Inference Protocol V2 with Triton's own client, rate limits, and live traffic changes.

Runs last among the serving tests: it redeploys the shared app in place several times.
"""

from collections import Counter

import httpx
import numpy as np
import pytest
import ray
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from kiln.actors.registry import read_verified_files
from tests.conftest import wait_for
from tests.serving.load import Load

ROW = [0.0] * 64


@pytest.fixture(scope="module")
def two_versions(trained_digits, settings_session, registry_session):
    """Version 1 (trained) and a second version with the same weights, registered for real."""
    first = trained_digits.record
    files = read_verified_files(settings_session.storage_uri, first)
    second = ray.get(
        registry_session.register.remote(
            "digits-mlp", files, first.spec, first.metrics, first.lineage
        )
    )
    return first, second


@pytest.fixture(scope="module")
def served_v2(two_versions, settings_session):
    from kiln.serving_control import deploy_models

    first, _ = two_versions
    return deploy_models(settings_session, [first.ref], auth=False)


def test_triton_client_metadata_and_infer_json_and_binary(served_v2, two_versions):
    first, _ = two_versions
    client = triton.InferenceServerClient(served_v2.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits-mlp")
    meta = client.get_model_metadata("digits-mlp")
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}]
    x = np.random.default_rng(0).uniform(0, 16, size=(5, 64)).astype(np.float32)
    for binary in (True, False):
        tensor = triton.InferInput("features", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        outputs = [
            triton.InferRequestedOutput(n, binary_data=binary)
            for n in ("predictions", "probabilities")
        ]
        result = client.infer("digits-mlp", [tensor], outputs=outputs)
        probabilities = result.as_numpy("probabilities")
        assert probabilities.shape == (5, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
        assert result.as_numpy("predictions").tolist() == probabilities.argmax(axis=1).tolist()
        assert result.get_response()["model_version"] == str(first.version)


def test_v2_nested_int64_data_and_versions(served_v2, two_versions):
    first, _ = two_versions
    body = {
        "inputs": [
            {
                "name": "features",
                "shape": [2, 64],
                "datatype": "INT64",
                "data": [[1] * 64, [2] * 64],
            }
        ]
    }
    response = httpx.post(
        f"{served_v2}/v2/models/digits-mlp/versions/{first.version}/infer", json=body
    )
    assert response.status_code == 200
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["predictions"]["shape"] == [2] and outputs["probabilities"]["shape"] == [2, 10]


@pytest.mark.parametrize(
    "tensor,status,fragment",
    [
        (
            {"name": "features", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63},
            422,
            "[N, 64]",
        ),
        (
            {"name": "features", "shape": [2, 64], "datatype": "FP32", "data": ROW},
            422,
            "shape needs 128",
        ),
        (
            {"name": "features", "shape": [1, 64], "datatype": "BYTES", "data": ROW},
            422,
            "not supported",
        ),
        (
            {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW},
            422,
            "unknown input",
        ),
        (
            {"name": "features", "shape": [1, 64], "datatype": "FP32", "data": ["x"] * 64},
            422,
            "numbers",
        ),
    ],
)
def test_v2_bad_tensors_are_4xx_with_an_error(served_v2, tensor, status, fragment):
    response = httpx.post(f"{served_v2}/v2/models/digits-mlp/infer", json={"inputs": [tensor]})
    assert response.status_code == status and fragment in response.json()["error"]


def test_v2_unknown_model_and_bad_json(served_v2):
    client = triton.InferenceServerClient(served_v2.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match="not served"):
        client.get_model_metadata("nope")
    response = httpx.post(f"{served_v2}/v2/models/digits-mlp/infer", content=b"{oops")
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]


def test_rate_limit_answers_429_with_retry_after(two_versions, settings_session, registry_session):
    from kiln.serving_control import deploy_models

    url = deploy_models(
        settings_session, [two_versions[0].ref], auth=True, rate_limit_per_s=0.5, rate_limit_burst=2
    )
    key = ray.get(registry_session.create_key.remote(["predict:digits-mlp"], None))
    headers = {"Authorization": f"Bearer {key['secret']}"}
    codes = [
        httpx.post(
            f"{url}/v1/models/digits-mlp:predict", json={"instances": [ROW]}, headers=headers
        ).status_code
        for _ in range(3)
    ]
    assert codes[:2] == [200, 200] and codes[2] == 429
    limited = httpx.post(
        f"{url}/v1/models/digits-mlp:predict", json={"instances": [ROW]}, headers=headers
    )
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert "rate limit" in limited.json()["error"]


@pytest.mark.slow
def test_canary_promote_and_rollback_fail_no_request(
    two_versions, settings_session, registry_session
):
    from kiln.serving_control import deploy_canary, deploy_models, promote, rollback

    first, second = two_versions
    url = deploy_models(settings_session, [first.ref], auth=False)

    def only(version: int, load: Load) -> bool:
        mark = len(load.results)
        wait_for(lambda: len(load.results) >= mark + 20, timeout_s=30)
        return {v for _, v, _ in load.results[mark + 5 :]} == {version}

    with Load(url, [ROW], threads=2) as load:
        assert wait_for(lambda: only(first.version, load), timeout_s=60)
        deploy_canary(settings_session, "digits-mlp", second.version, weight=50)
        mark = len(load.results)
        assert wait_for(
            lambda: {v for _, v, _ in load.results[mark:]} >= {first.version, second.version},
            timeout_s=60,
        )
        sticky = {
            httpx.post(
                f"{url}/v1/models/digits-mlp:predict",
                json={"instances": [ROW]},
                headers={"x-kiln-session": "user-42"},
            ).json()["model_version"]
            for _ in range(15)
        }
        assert len(sticky) == 1  # one caller stays on one side of the split
        promote(settings_session, "digits-mlp")
        assert wait_for(lambda: only(second.version, load), timeout_s=60)
        rollback(settings_session, "digits-mlp")
        assert wait_for(lambda: only(first.version, load), timeout_s=60)
    statuses = Counter(status for status, _, _ in load.results)
    assert statuses[200] == len(load.results) > 100, statuses  # zero failed requests
    assert (
        ray.get(registry_session.resolve.remote("digits-mlp@production")).version == first.version
    )
    assert ray.get(registry_session.resolve.remote("digits-mlp@previous")).version == first.version
    # Registry aliases of the served version answer over HTTP, whatever name was deployed.
    for alias in ("production", "previous"):
        r = httpx.post(f"{url}/v1/models/digits-mlp@{alias}:predict", json={"instances": [ROW]})
        assert r.status_code == 200 and r.json()["model_version"] == first.version
