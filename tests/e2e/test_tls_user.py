"""`kiln serve --tls-self-signed` as a user runs it: the printed fingerprint is the certificate's,
httpx, curl and the stock tritonclient (ssl=True) get predictions over TLS with that
certificate as their CA, and plain HTTP to the port gets no model answer."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from kiln.tls import fingerprint
from tests.conftest import free_port
from tests.e2e.kiln_process import KilnServeTls, kiln_env, kiln_json

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KilnServeTls, str]]:
    home = tmp_path_factory.mktemp("tls-home")
    env = kiln_env(home, free_port())
    kiln_json(env, "train", "--data", "sklearn:digits", "--model", "logistic", "--register", "dg")
    secret = kiln_json(env, "keys", "create", "--scope", "predict:*")["secret"]
    server = KilnServeTls(env, ["dg", "--tls-self-signed"], home / "serve.log").start()
    try:
        yield server, secret
    finally:
        server.kill()


def rows() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.data[:32].astype(np.float32), data.target[:32]


def test_fingerprint_printed_is_the_certificates(served: tuple[KilnServeTls, str]) -> None:
    server, _ = served
    printed = re.search(r"SHA-256 fingerprint ([0-9A-F:]+)", server.log())
    assert printed is not None, server.log()
    assert printed.group(1) == fingerprint(server.ca)


def test_httpx_predicts_over_tls(served: tuple[KilnServeTls, str]) -> None:
    server, secret = served
    x, y = rows()
    verify = ssl.create_default_context(cafile=str(server.ca))
    reply = httpx.post(
        f"{server.url}/v1/models/dg:predict",
        json={"instances": x.tolist()},
        headers={"Authorization": f"Bearer {secret}"},
        verify=verify,
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert np.mean(np.array(reply.json()["predictions"]) == y) >= 0.8


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_cacert(served: tuple[KilnServeTls, str]) -> None:
    server, secret = served
    done = subprocess.run(
        [
            "curl", "-sS", "--fail", "--cacert", str(server.ca),
            "-H", f"Authorization: Bearer {secret}",
            f"{server.url}/v1/models/dg",
        ],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"name":"dg"' in done.stdout.replace(" ", "")


def test_tritonclient_with_ssl(served: tuple[KilnServeTls, str]) -> None:
    import tritonclient.http as triton

    server, secret = served
    x, y = rows()
    client = triton.InferenceServerClient(
        server.url.removeprefix("https://"), ssl=True, ssl_options={"ca_certs": str(server.ca)}
    )
    try:
        tensor = triton.InferInput("features", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("dg", [tensor], headers={"Authorization": f"Bearer {secret}"})
        predictions = result.as_numpy("predictions")
        assert predictions is not None and np.mean(predictions == y) >= 0.8
    finally:
        client.close()


def test_plain_http_gets_no_model_answer(served: tuple[KilnServeTls, str]) -> None:
    server, secret = served
    x, _ = rows()
    plain = server.url.replace("https://", "http://")
    try:
        reply = httpx.post(
            f"{plain}/v1/models/dg:predict",
            json={"instances": x.tolist()},
            headers={"Authorization": f"Bearer {secret}"},
            timeout=10,
        )
    except httpx.HTTPError:
        return
    assert "predictions" not in reply.text


def test_a_client_without_the_ca_refuses_the_certificate(served: tuple[KilnServeTls, str]) -> None:
    server, _ = served
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{server.url}/v1/models", timeout=10)
