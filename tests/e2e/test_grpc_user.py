"""`kiln serve` over gRPC as a user calls it: the stock `tritonclient.grpc` client against the
command run as a subprocess, keys on (the default). Server and model readiness, metadata,
infer with binary tensors (tritonclient's own) and with typed contents (a raw stub), refusals
with the right codes (no key, a bad key, a key without the model's scope, a bad shape, an
unknown model), the prediction log row (feedback by the ids the answer gives) and the
request counter in Ray's Prometheus export, a revoked key refused once the replica's key
cache has expired, and the same over TLS (`--tls-self-signed`). Each runs against the native
gRPC front (serving/native/, where built) and against grpc.aio in the replica.
"""

from __future__ import annotations

import json
import queue
import re
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton
from sklearn.datasets import load_digits
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from kiln.serving.direct import NATIVE_FRONT
from kiln.serving.schemas import ServeArgs
from tests.conftest import free_port, wait_for
from tests.e2e.kiln_process import KilnServe, KilnServeTls, kiln, kiln_env, kiln_json

pytestmark = pytest.mark.slow

KEY_CACHE_S = ServeArgs.model_fields["auth_cache_ttl_s"].default


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`dgm` (digits MLP) trained by `kiln train`; a predict key, one for another model only."""
    home = tmp_path_factory.mktemp("grpc-home")
    env = kiln_env(home, free_port())
    kiln_json(env, "train", "--data", "sklearn:digits", "--model", "mlp", "--register", "dgm")
    made = kiln_json(env, "keys", "create", "--scope", "predict:*", "--scope", "feedback:*")
    other = kiln_json(env, "keys", "create", "--scope", "predict:other")
    return {"home": home, "secret": made["secret"], "other": other["secret"]}


def fronts(server: KilnServe) -> list[psutil.Process]:
    """The native gRPC fronts among `kiln serve`'s descendants (one a replica)."""
    assert server.process is not None
    return [
        p
        for p in psutil.Process(server.process.pid).children(recursive=True)
        if p.name() == NATIVE_FRONT.name
    ]


@pytest.fixture(scope="module", params=["native", "python"])
def served(
    request: pytest.FixtureRequest,
    trained_home: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[KilnServe]:
    """`kiln serve dgm` with gRPC answered by the native front (serving/native/) and, again, by
    grpc.aio in the replica (KILN_GRPC_FRONT=python): every test here runs against both."""
    if request.param == "native" and not NATIVE_FRONT.is_file():
        pytest.skip("the native gRPC front is not built (make native)")
    env = kiln_env(
        trained_home["home"],
        free_port(),
        KILN_GRPC_PORT=str(free_port()),
        KILN_GRPC_FRONT=request.param,
    )
    log = tmp_path_factory.mktemp("grpc-serve") / "serve.log"
    server = KilnServe(env, ["dgm"], log).start()
    try:
        assert len(fronts(server)) == (1 if request.param == "native" else 0)
        yield server
        # Ctrl-C stops everything kiln serve started, the front with its replica.
        assert server.interrupt() == 0
        assert wait_for(lambda: server.survivors() == [], 30), server.survivors()
    finally:
        server.kill()


def grpc_address(server: KilnServe) -> str:
    return f"127.0.0.1:{server.env['KILN_GRPC_PORT']}"


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def digits(count: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    rows = slice(offset, offset + count)
    return data.data[rows].astype(np.float32), data.target[rows]


def infer(
    client: triton.InferenceServerClient, model: str, x: np.ndarray, headers: dict[str, str]
) -> triton.InferResult:
    tensor = triton.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], headers=headers)


def refusal(call: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()), str(caught.value.message())


def requests_counted(server: KilnServe, status: str) -> float:
    """ray_kiln_requests_total for dgm with `status`, from the embedded Ray's Prometheus
    export (its port is on the raylet's command line)."""
    server.record_processes()
    port = None
    for pid in server.ray_processes:
        try:
            found = re.search(
                r"--metrics[-_]export[-_]port[= ](\d+)", " ".join(psutil.Process(pid).cmdline())
            )
        except psutil.NoSuchProcess:
            continue
        if found:
            port = int(found.group(1))
            break
    assert port is not None, "no metrics export port on any Ray process"
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("ray_kiln_requests_total{") and 'model="dgm"' in line:
            if f'status="{status}"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_tritonclient_grpc_readiness_metadata_and_binary_infer(served, trained_home):
    client = triton.InferenceServerClient(grpc_address(served))
    auth = bearer(trained_home["secret"])
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("dgm", headers=auth)
    meta = client.get_model_metadata("dgm", headers=auth, as_json=True)
    assert meta["name"] == "dgm" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert [o["name"] for o in meta["outputs"]] == ["predictions", "probabilities"]
    # Triton's ModelConfig: what GET /v2/models/dgm/config says, as the proto.
    config = client.get_model_config("dgm", headers=auth, as_json=True)["config"]
    over_http = httpx.get(
        f"{served.url}/v2/models/dgm/config",
        headers={"Authorization": f"Bearer {trained_home['secret']}"},
        timeout=30,
    ).json()
    assert config["name"] == "dgm" and config["max_batch_size"] == over_http["max_batch_size"]
    assert config["input"] == [{"name": "features", "data_type": "TYPE_FP32", "dims": ["64"]}]
    assert over_http["input"] == [{"name": "features", "data_type": "TYPE_FP32", "dims": [64]}]
    assert [o["name"] for o in config["output"]] == ["predictions", "probabilities"]
    batching = json.loads(config["parameters"]["batching"]["string_value"])
    assert batching == over_http["parameters"]["batching"]

    x, y = digits(64)
    result = infer(client, "dgm", x, auth)
    predictions = result.as_numpy("predictions")
    assert predictions.shape == (64,)
    assert np.mean(predictions == y) >= 0.75
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (64, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), predictions)

    # The same rows over HTTP V1 answer the same predictions.
    with httpx.Client(base_url=served.url, timeout=60) as http:
        answer = http.post(
            "/v1/models/dgm:predict",
            json={"instances": x.tolist()},
            headers={"Authorization": f"Bearer {trained_home['secret']}"},
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == predictions.tolist()


def test_a_replica_serves_grpc_on_the_serving_host_only(served, trained_home):
    """Serve 2.60 binds a replica's gRPC ingress on every interface; Kiln's replica rebinds it
    to the HTTP host (127.0.0.1 by default), and so does its native front. Every port a replica
    (or its front) listens on is tried as an inference server: the loopback ones must include
    the one that answers, and none on a wildcard address may answer (those are Ray's own
    core-worker ports, UNIMPLEMENTED)."""
    served.record_processes()
    replicas = [
        pid
        for pid in served.ray_processes
        if psutil.pid_exists(pid) and "ServeReplica" in " ".join(psutil.Process(pid).cmdline())
    ]
    assert replicas, "no replica process found under kiln serve"
    replicas += [front.pid for front in fronts(served)]
    listening = [
        c.laddr
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in replicas
    ]

    def answers(port: int) -> bool:
        try:
            return bool(triton.InferenceServerClient(f"127.0.0.1:{port}").is_server_live())
        except InferenceServerException:
            return False

    wildcard = {"0.0.0.0", "::"}
    inner = [a.port for a in listening if a.ip not in wildcard and answers(a.port)]
    exposed = [a.port for a in listening if a.ip in wildcard and answers(a.port)]
    assert inner, f"no replica port on loopback answers gRPC: {listening}"
    assert exposed == [], f"a replica answers gRPC on every interface: {exposed}"


def test_typed_contents_answer_as_raw_ones_do(served, trained_home):
    x, _ = digits(8, offset=200)
    channel = grpc.insecure_channel(grpc_address(served))
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name="dgm", model_version="1", id="typed-1")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[8, 64])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    request.outputs.add(name="predictions")
    typed = stub.ModelInfer(request, metadata=list(bearer(trained_home["secret"]).items()))
    assert typed.id == "typed-1"
    assert [o.name for o in typed.outputs] == ["predictions"]
    client = triton.InferenceServerClient(grpc_address(served))
    raw = infer(client, "dgm", x, bearer(trained_home["secret"]))
    np.testing.assert_array_equal(
        np.frombuffer(typed.raw_output_contents[0], dtype="<i8"), raw.as_numpy("predictions")
    )
    channel.close()


def test_a_stream_answers_every_request_and_names_the_refused_one(served, trained_home):
    """ModelStreamInfer with tritonclient's stream: each request answered as ModelInfer
    answers it (by id), a bad one as an error on the stream, which goes on."""
    client = triton.InferenceServerClient(grpc_address(served))
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(
        callback=lambda result, error: answers.put((result, error)),
        headers=bearer(trained_home["secret"]),
    )
    x, y = digits(8, offset=100)
    try:
        for i in range(8):
            tensor = triton.InferInput("features", [1, 64], "FP32")
            tensor.set_data_from_numpy(x[i : i + 1])
            client.async_stream_infer("dgm", [tensor], request_id=f"row-{i}")
            if i == 3:
                bad = triton.InferInput("features", [1, 10], "FP32")
                bad.set_data_from_numpy(x[:1, :10].copy())
                client.async_stream_infer("dgm", [bad], request_id="bad")
        got: dict[str, int] = {}
        errors: list[str] = []
        for _ in range(9):
            result, error = answers.get(timeout=120)
            if error is not None:
                errors.append(str(error.message()))
            else:
                response = result.get_response()
                got[response.id] = int(result.as_numpy("predictions")[0])
    finally:
        client.stop_stream()
    assert errors == ["shape must be [N, 64]; got [1, 10]"]
    alone = infer(client, "dgm", x, bearer(trained_home["secret"])).as_numpy("predictions")
    assert got == {f"row-{i}": int(alone[i]) for i in range(8)}
    assert np.mean(alone == y) >= 0.75


def test_refusals_have_the_right_codes(served, trained_home):
    client = triton.InferenceServerClient(grpc_address(served))
    x, _ = digits(2)
    auth = bearer(trained_home["secret"])

    status, message = refusal(lambda: infer(client, "dgm", x, {}))
    assert status == "StatusCode.UNAUTHENTICATED" and "missing API key" in message
    status, message = refusal(lambda: infer(client, "dgm", x, bearer("kiln_0000_nope")))
    assert status == "StatusCode.UNAUTHENTICATED"
    status, message = refusal(lambda: infer(client, "dgm", x, bearer(trained_home["other"])))
    assert status == "StatusCode.PERMISSION_DENIED" and "lacks scope predict:dgm" in message
    status, _ = refusal(lambda: client.get_model_metadata("dgm", headers=bearer("kiln_0_x")))
    assert status == "StatusCode.UNAUTHENTICATED"
    status, _ = refusal(lambda: client.get_model_config("dgm", headers=bearer("kiln_0_x")))
    assert status == "StatusCode.UNAUTHENTICATED"
    status, _ = refusal(lambda: client.get_model_config("nosuch", headers=auth))
    assert status == "StatusCode.NOT_FOUND"

    status, message = refusal(lambda: infer(client, "dgm", x[:, :10].copy(), auth))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert message == "shape must be [N, 64]; got [2, 10]"
    status, message = refusal(lambda: infer(client, "nosuch", x, auth))
    assert status == "StatusCode.NOT_FOUND" and "'nosuch' is not served here" in message
    status, _ = refusal(lambda: client.is_model_ready("nosuch", headers=auth))
    assert status == "StatusCode.NOT_FOUND"


def test_prediction_log_and_metrics_see_grpc_requests(served, trained_home):
    client = triton.InferenceServerClient(grpc_address(served))
    auth = bearer(trained_home["secret"])
    ok_before = requests_counted(served, "200")
    bad_before = requests_counted(served, "422")
    x, y = digits(16, offset=300)
    result = infer(client, "dgm", x, auth)
    ids = result.get_response().parameters["prediction_ids"].string_param.split(",")
    assert len(ids) == 16
    refusal(lambda: infer(client, "dgm", x[:, :3].copy(), auth))

    # The feedback store finds the ids in the prediction log once it is flushed (every second).
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=served.url, timeout=60) as http:
        while True:
            fed = http.post(
                "/v1/models/dgm:feedback",
                json={"ids": ids, "labels": y.tolist()},
                headers={"Authorization": f"Bearer {trained_home['secret']}"},
            )
            assert fed.status_code == 200, fed.text
            if fed.json()["accepted"] == 16 or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert fed.json() == {"accepted": 16, "unknown_ids": []}

    # The request counter is handed to Ray once a second; the export follows.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ok, bad = requests_counted(served, "200"), requests_counted(served, "422")
        if ok >= ok_before + 1 and bad >= bad_before + 1:
            break
        time.sleep(1)
    assert ok >= ok_before + 1, (ok_before, ok)
    assert bad >= bad_before + 1, (bad_before, bad)


def test_a_revoked_key_is_refused_once_the_key_cache_expired(served, trained_home):
    made = kiln_json(served.env, "keys", "create", "--scope", "predict:dgm")
    client = triton.InferenceServerClient(grpc_address(served))
    x, _ = digits(1)
    assert infer(client, "dgm", x, bearer(made["secret"])).as_numpy("predictions").shape == (1,)
    done = kiln(served.env, "keys", "revoke", made["id"])
    assert done.returncode == 0, done.stderr
    revoked_at = time.monotonic()
    deadline = revoked_at + 3 * KEY_CACHE_S + 10
    status = ""
    while time.monotonic() < deadline:
        try:
            infer(client, "dgm", x, bearer(made["secret"]))
        except InferenceServerException as exc:
            status = str(exc.status())
            break
        time.sleep(0.5)
    assert status == "StatusCode.UNAUTHENTICATED"
    # Past the cache, still refused (not a stale cache slot turning back).
    time.sleep(KEY_CACHE_S + 1)  # pacing past the TTL; the assertion is on the answer
    status, message = refusal(lambda: infer(client, "dgm", x, bearer(made["secret"])))
    assert status == "StatusCode.UNAUTHENTICATED" and "revoked" in message


def test_a_busy_grpc_port_is_one_line_before_ray_starts(trained_home):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = kiln_env(trained_home["home"], free_port(), KILN_GRPC_PORT=str(busy.getsockname()[1]))
        done = kiln(env, "serve", "dgm")
    assert done.returncode == 2
    assert "cannot listen on 127.0.0.1" in done.stderr and "--grpc-port" in done.stderr
    assert "Traceback" not in done.stderr


def test_grpc_over_tls_with_tritonclient(trained_home, tmp_path):
    env = kiln_env(trained_home["home"], free_port(), KILN_GRPC_PORT=str(free_port()))
    server = KilnServeTls(env, ["dgm", "--tls-self-signed"], tmp_path / "serve.log").start()
    try:
        assert "gRPC (Open Inference Protocol V2, TLS)" in server.log()
        client = triton.InferenceServerClient(
            grpc_address(server), ssl=True, root_certificates=str(server.ca)
        )
        auth = bearer(trained_home["secret"])
        assert client.is_model_ready("dgm", headers=auth)
        x, y = digits(32)
        assert np.mean(infer(client, "dgm", x, auth).as_numpy("predictions") == y) >= 0.75
        status, _ = refusal(lambda: infer(client, "dgm", x, {}))
        assert status == "StatusCode.UNAUTHENTICATED"
        # Plain text on the TLS port gets no answer.
        plain = triton.InferenceServerClient(grpc_address(server))
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=5)
        assert server.interrupt() == 0
        assert server.survivors() == []
    finally:
        server.kill()
