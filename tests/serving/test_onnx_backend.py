"""The ONNX Runtime backend answers exactly as the torch backend does, V1 and V2, good and bad
requests alike; a tampered model.onnx is refused at load.

Two halves: the routes over real replicas of both backends through FastAPI's TestClient (no
Ray), for a table model, a regressor and a trained MLP; then `kiln export`'s own path on real
Ray and the same version served by two Serve applications side by side (one per backend), over
real HTTP on loopback.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest
import ray

from kiln.actors.registry import RegistryService, artifact_path, read_verified_files
from kiln.actors.replica import ModelReplica
from kiln.serving.host import ModelHost, Served
from kiln.serving.routing import Router
from kiln.serving.schemas import ServeArgs
from kiln.training.artifacts import model_to_files
from kiln.training.errors import CorruptArtifactError, KilnError
from kiln.training.export import ONNX_FILE, onnx_bytes
from tests.serving.test_routes import client_for, no_overrides_left  # noqa: F401
from tests.serving.test_tabular_serving import (
    CHURN,
    CHURN_WEIGHT,
    CUSTOMERS,
    PRICE,
    linear_files,
)
from tests.training.test_export import trained_digits_export

BACKENDS = ("torch", "onnxruntime")
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- no Ray


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[RegistryService, str]:
    """churn (a table logistic), price (a regressor) and digits (a trained MLP), each with
    model.onnx added by the registry as `kiln export` adds it; plus digits' int8 variant."""
    home = tmp_path_factory.mktemp("onnx-backend")
    service = RegistryService(str(home / "registry.db"), str(home / "store"), recover=False)
    model, spec, _, _, fp32, int8 = trained_digits_export()
    files = {
        "churn": (linear_files(CHURN, CHURN_WEIGHT), CHURN),
        "price": (linear_files(PRICE, np.array([[1.0, 10.0]], dtype=np.float32)), PRICE),
        "digits": (model_to_files(model, spec), spec),
    }
    for name, (artifacts, model_spec) in files.items():
        record = service.register(name, artifacts, model_spec, {}, {})
        exported = fp32 if name == "digits" else onnx_bytes(*rebuilt(artifacts))
        service.add_artifact(name, record.version, ONNX_FILE, exported)
    variant = {**spec, "onnx_quantized": "int8"}
    service.register(
        "digits",
        {**model_to_files(model, variant), ONNX_FILE: int8},
        variant,
        {},
        {"parent": "digits@1"},
    )
    yield service, str(home / "store")
    service.close()


def rebuilt(files: dict[str, bytes]) -> tuple[Any, dict]:
    from kiln.training.artifacts import model_from_files

    return model_from_files(files)


@pytest.fixture(scope="module")
def replicas(store) -> dict[str, dict[str, ModelReplica]]:
    """backend -> model name -> its replica, every model version 1."""
    service, root = store
    records = [service.resolve(f"{name}@1") for name in ("churn", "price", "digits")]
    return {
        backend: {r.name: ModelReplica(r, root, gpu="off", backend=backend) for r in records}
        for backend in BACKENDS
    }


def client_of(replicas: dict[str, ModelReplica], monkeypatch) -> Any:
    monkeypatch.setattr("kiln.serving.host.INLINE_FORWARD_S", float("inf"))
    host = ModelHost(ServeArgs(models=list(replicas), max_instances=50), registry=None)
    router = Router()
    for replica in replicas.values():
        router.add(replica.record.ref, default=True)
    host.served = Served({r.record.ref: r for r in replicas.values()}, router)
    return client_for(host)


def digits_rows(n: int) -> list[list[float]]:
    return trained_digits_export()[2][:n].tolist()


def binary_v2(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A V2 request with `features` as a binary tensor after the JSON header."""
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = json.dumps(
        {
            "id": "b",
            "inputs": [
                {
                    "name": "features",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
        }
    ).encode()
    return header + raw, {"inference-header-content-length": str(len(header))}


def v2_tensor(name: str, datatype: str, data: list, shape: list[int] | None = None) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data), 1], "data": data}


V1 = "POST_V1"
REQUESTS: list[tuple[str, str, Any]] = [
    # (method, path, body): every one is sent to both backends.
    (V1, "churn", {"instances": CUSTOMERS, "return": "probabilities"}),
    (V1, "churn", {"instances": [{"city": "oslo", "plan": "pro"}, {}, {"age": None}]}),
    (V1, "churn", {"instances": [[31, None, "lima", "basic"]], "return": "probabilities"}),
    (V1, "churn", {"instances": [{"town": "lima"}]}),
    (V1, "churn", {"instances": [{"age": "31"}]}),
    (V1, "churn", {"instances": []}),
    (V1, "price", {"instances": [[1.0, 2.0], [3.5, None], [-4.0, 1e3]]}),
    (V1, "price", {"instances": [[1.0, 2.0, 3.0]]}),
    (V1, "digits", {"instances": digits_rows(16), "return": "probabilities"}),  # inline: ≤ 16
    (V1, "digits", {"instances": [[0.0] * 63 + [None]]}),
    (V1, "digits", {"instances": [[1.0] * 10]}),
    (V1, "nope", {"instances": [[1.0]]}),
    ("GET", "/v1/models/churn", None),
    ("GET", "/v1/models/digits", None),
    ("GET", "/v2/models/churn", None),
    ("GET", "/v2/models/digits", None),
    ("GET", "/v2/models/price/ready", None),
    (
        "POST",
        "/v2/models/churn/infer",
        {
            "id": "c",
            "inputs": [
                v2_tensor("age", "FP32", [31.0, 58.0]),
                v2_tensor("income", "FP32", [52000.0, 91000.5]),
                v2_tensor("city", "BYTES", ["lima", "paris"]),
                v2_tensor("plan", "BYTES", ["basic", "pro"]),
            ],
        },
    ),
    (
        "POST",
        "/v2/models/digits/infer",
        {
            "id": "d",
            "inputs": [
                {"name": "features", "shape": [5, 64], "datatype": "FP32", "data": digits_rows(5)}
            ],
        },
    ),
    (
        "POST",
        "/v2/models/price/infer",
        {"id": "p", "inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32"}]},
    ),
    (
        "POST",
        "/v2/models/digits/infer",
        {"id": "e", "inputs": [v2_tensor("features", "FP32", [0.0] * 63, [1, 63])]},
    ),
]


def send(client: Any, method: str, path: str, body: Any) -> httpx.Response:
    if method == V1:
        return client.post(f"/v1/models/{path}:predict", json=body)
    if method == "GET":
        return client.get(path)
    return client.post(path, json=body)


def without_backend(body: Any) -> Any:
    """A reply with what differs by design left out: the backend's name, random ids, and the
    batching each backend chose from its own timed latency profile."""
    if isinstance(body, dict):
        drop = ("platform", "backend", "ids", "parameters", "batching")  # parameters: V2's ids
        return {k: v for k, v in body.items() if k not in drop}
    return body


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal JSON, floats within 1e-4 (relative past 1: a regressor's values)."""
    if isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= TOLERANCE * max(1.0, abs(a)), f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: {a} != {b}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_both_backends_answer_every_request_alike(replicas, monkeypatch):
    answers = {}
    for backend in BACKENDS:
        client = client_of(replicas[backend], monkeypatch)
        answers[backend] = [send(client, *request) for request in REQUESTS]
        body, headers = binary_v2(np.asarray(digits_rows(7), dtype=np.float32))
        answers[backend].append(
            client.post("/v2/models/digits/infer", content=body, headers=headers)
        )
    statuses = [r.status_code for r in answers["torch"]]
    assert statuses == [r.status_code for r in answers["onnxruntime"]]
    v1, metadata, v2 = (
        [200, 200, 200, 422, 422, 422, 200, 422, 200, 200, 422, 404],
        [200] * 5,
        [200, 200, 422, 422, 200],
    )
    assert statuses == v1 + metadata + v2
    for request, torch_reply, onnx_reply in zip(
        REQUESTS + [("binary", "digits", None)],
        answers["torch"],
        answers["onnxruntime"],
        strict=True,
    ):
        torch_body, onnx_body = torch_reply.json(), onnx_reply.json()
        if torch_reply.status_code != 200:
            assert list(torch_body) == ["error"] and torch_body == onnx_body, request
        assert_same(without_backend(torch_body), without_backend(onnx_body), str(request[:2]))


def test_metadata_names_each_backend(replicas, monkeypatch):
    for backend, platform in (("torch", "kiln-pytorch"), ("onnxruntime", "onnxruntime_onnx")):
        client = client_of(replicas[backend], monkeypatch)
        assert client.get("/v2/models/digits").json()["platform"] == platform
        assert client.get("/v1/models/digits").json()["backend"] == backend


def test_the_forward_pass_gives_the_same_shape_and_dtype(replicas):
    x = np.asarray(digits_rows(9), dtype=np.float32)
    torch_out = replicas["torch"]["digits"].forward(x)
    onnx_out = replicas["onnxruntime"]["digits"].forward(x)
    assert torch_out.shape == onnx_out.shape == (9, 10)
    assert torch_out.dtype == onnx_out.dtype == np.float32
    np.testing.assert_allclose(onnx_out, torch_out, atol=TOLERANCE)


def test_auto_threads_and_the_int8_variant(store):
    service, root = store
    exported, variant = service.resolve("digits@1"), service.resolve("digits@2")
    auto = ModelReplica(exported, root, gpu="off", backend="auto", num_cpus=2.5)
    assert auto.backend == "onnxruntime" and auto.platform == "onnxruntime_onnx"
    assert auto.onnx is not None and auto.onnx.num_threads == 2
    assert auto.onnx.providers == ["CPUExecutionProvider"]
    assert ModelReplica(variant, root, gpu="off", backend="auto").backend == "onnxruntime"
    with pytest.raises(KilnError, match="digits@2 is an ONNX int8 variant.*--backend onnxruntime"):
        ModelReplica(variant, root, gpu="off", backend="torch")
    plain = service.register("plain", *rebuilt_files(service, root, "price@1"), {}, {})
    with pytest.raises(KilnError, match="run `kiln export plain@1 --format onnx` first"):
        ModelReplica(plain, root, gpu="off", backend="onnxruntime")
    assert ModelReplica(plain, root, gpu="off", backend="auto").backend == "torch"


def rebuilt_files(service: RegistryService, root: str, ref: str) -> tuple[dict, dict]:
    record = service.resolve(ref)
    files = read_verified_files(root, record)
    return {k: v for k, v in files.items() if k != ONNX_FILE}, record.spec


def test_a_tampered_model_onnx_is_refused_at_load(store):
    service, root = store
    record = service.resolve("price@1")
    path = f"{root}/{artifact_path('price', 1, ONNX_FILE)}"
    with open(path, "rb") as src:
        original = src.read()
    price_of_a_different_weight = linear_files(PRICE, np.array([[2.0, 10.0]], dtype=np.float32))
    try:
        with open(path, "wb") as out:  # a valid ONNX model, just not the one exported
            out.write(onnx_bytes(*rebuilt(price_of_a_different_weight)))
        for backend in ("onnxruntime", "auto", "torch"):  # every file is verified, always
            with pytest.raises(CorruptArtifactError, match="model.onnx failed its checksum"):
                ModelReplica(record, root, gpu="off", backend=backend)
    finally:
        with open(path, "wb") as out:
            out.write(original)
    ModelReplica(record, root, gpu="off", backend="onnxruntime")


# ----------------------------------------------------------------------------- real Ray


@pytest.fixture(scope="module")
def exported_on_ray(trained_digits, settings_session, registry_session):
    """A copy of the shared digits MLP, exported by `kiln export`'s own code on real Ray."""
    from kiln.exporting import ExportRequest, export_version

    first = trained_digits.record
    files = read_verified_files(settings_session.storage_uri, first)
    copy = ray.get(
        registry_session.register.remote(
            "digits-onnx", files, first.spec, first.metrics, {**first.lineage, "parent": None}
        )
    )
    done = export_version(settings_session, ExportRequest(ref=copy.ref), registry_session)
    return copy, done


def test_export_adds_a_checked_model_onnx_to_the_version(exported_on_ray, registry_session):
    copy, done = exported_on_ray
    assert done.record.ref == copy.ref == done.parent.ref
    assert set(done.record.artifacts) == set(copy.artifacts) | {ONNX_FILE}
    assert ray.get(registry_session.resolve.remote(copy.ref)).artifacts == done.record.artifacts
    assert done.check["rows"] == copy.lineage["test_rows"] > 300
    assert done.check["max_abs_diff"] <= 1e-4 and done.check["agreement"] == 1.0
    assert done.metrics is None  # the version's own metrics stand
    audit = ray.get(registry_session.audit.remote(action="export"))
    assert any(e["target"] == copy.ref and e["detail"]["check"] == done.check for e in audit)


def test_a_second_fp32_export_is_refused_with_the_file_s_sha256(
    exported_on_ray, settings_session, registry_session
):
    from kiln.client import Kiln
    from kiln.exporting import ExportRequest, export_version

    copy, done = exported_on_ray
    sha = done.record.artifacts[ONNX_FILE]
    expected = f"{copy.ref} is already exported: its model.onnx has sha256 {sha}"
    with pytest.raises(KilnError, match=expected):
        export_version(settings_session, ExportRequest(ref=copy.ref), registry_session)
    with Kiln(settings=settings_session) as client, pytest.raises(KilnError, match=expected):
        client.export(copy.ref)  # the Python client, through the Registry actor
    with Kiln(settings=settings_session) as client, pytest.raises(KilnError, match="--format"):
        client.export(copy.ref, format="tflite")


def test_int8_export_registers_a_variant_served_by_onnx_runtime(
    exported_on_ray, settings_session, registry_session
):
    from kiln.exporting import ExportRequest, export_version

    copy, _ = exported_on_ray
    done = export_version(
        settings_session, ExportRequest(ref=copy.ref, quantize="int8"), registry_session
    )
    variant = done.record
    assert variant.name == copy.name and variant.version == copy.version + 1
    assert variant.spec == {**copy.spec, "onnx_quantized": "int8"}
    assert variant.lineage["parent"] == copy.ref
    (step,) = variant.lineage["compression"]
    assert step["method"] == "onnx-dynamic-int8" and step["library"].startswith("onnxruntime 1.")
    assert step["first_layer"] == done.check["first_layer"] in ("int8", "fp32")
    assert variant.lineage["dataset_uri"] == "sklearn:digits"
    assert variant.artifacts["model.safetensors"] == copy.artifacts["model.safetensors"]
    assert variant.artifacts[ONNX_FILE] == step["onnx_sha256"] != copy.artifacts.get(ONNX_FILE)
    assert set(variant.metrics) == {"accuracy", "precision", "recall", "macro_f1"}
    assert variant.metrics["accuracy"] == pytest.approx(copy.metrics["accuracy"], abs=0.01)
    assert done.check["agreement"] >= 0.995
    replica = ModelReplica(variant, settings_session.storage_uri, gpu="off", backend="auto")
    assert replica.backend == "onnxruntime"


@pytest.fixture(scope="module")
def side_by_side(exported_on_ray, settings_session):
    """The exported version served twice: `kiln` at / with torch, `kiln-onnx` at /onnx with
    ONNX Runtime."""
    from ray import serve

    from kiln.serving.app import build_app
    from kiln.serving_control import deploy_models

    copy, _ = exported_on_ray
    # Serve's ingress: it routes /onnx to the second app (a direct ingress answers the first).
    settings = settings_session.with_overrides(kiln_ingress="serve")
    base = deploy_models(settings, [copy.ref], auth=False, backend="torch")
    args = {"models": [copy.ref], "auth": False, "backend": "onnxruntime"}
    serve.run(build_app(args), name="kiln-onnx", route_prefix="/onnx")
    yield {"torch": base, "onnxruntime": f"{base}/onnx"}
    serve.delete("kiln-onnx")


@pytest.mark.slow  # two Serve apps (about 15 s); the same requests run without Ray above
def test_both_backends_served_side_by_side_answer_alike(side_by_side, exported_on_ray):
    copy, _ = exported_on_ray
    name = copy.name
    rows = digits_rows(30)
    requests = [
        ("POST", f"/v1/models/{name}:predict", {"instances": rows, "return": "probabilities"}),
        ("POST", f"/v1/models/{name}:predict", {"instances": [[1.0] * 63]}),
        ("POST", f"/v1/models/{name}:predict", {"instances": [[1.0] * 63 + ["x"]]}),
        ("GET", f"/v1/models/{name}", None),
        ("GET", f"/v2/models/{name}", None),
        (
            "POST",
            f"/v2/models/{name}/infer",
            {"id": "r", "inputs": [v2_tensor("features", "FP32", rows[:4], [4, 64])]},
        ),
        (
            "POST",
            f"/v2/models/{name}/infer",
            {"inputs": [v2_tensor("features", "BYTES", rows[0], [1, 64])]},
        ),
        ("GET", "/v2/models/nope", None),
    ]
    replies: dict[str, list[httpx.Response]] = {}
    for backend, url in side_by_side.items():
        replies[backend] = [
            httpx.request(method, url + path, json=body, timeout=30)
            for method, path, body in requests
        ]
    statuses = [r.status_code for r in replies["torch"]]
    assert statuses == [200, 422, 422, 200, 200, 200, 422, 404]
    assert statuses == [r.status_code for r in replies["onnxruntime"]]
    for request, a, b in zip(requests, replies["torch"], replies["onnxruntime"], strict=True):
        assert_same(without_backend(a.json()), without_backend(b.json()), request[1])
    assert replies["torch"][4].json()["platform"] == "kiln-pytorch"
    assert replies["onnxruntime"][4].json()["platform"] == "onnxruntime_onnx"
    assert replies["onnxruntime"][3].json()["backend"] == "onnxruntime"
    for backend in ("torch", "onnxruntime"):  # each timed its own runtime's forward pass
        batching = replies[backend][3].json()["batching"]
        assert batching["source"].startswith("profile"), (backend, batching)
        assert all(ms > 0 for ms in batching["profile_ms"].values()), (backend, batching)


def test_deploy_refuses_a_backend_that_cannot_run_the_version(trained_digits, settings_session):
    from kiln.serving_control import deploy_models

    ref = trained_digits.record.ref
    with pytest.raises(KilnError, match=f"run `kiln export {ref} --format onnx` first"):
        deploy_models(settings_session, [ref], auth=False, backend="onnxruntime")
