"""Serving models trained on tables: named V1 instances, V2 inputs per column (JSON and binary),
string and boolean classes. Real replicas loaded from a registry, the routes through FastAPI's
TestClient; no Ray, no Serve."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
import tritonclient.http as triton

from kiln.actors.registry import RegistryService
from kiln.actors.replica import ModelReplica
from kiln.serving import v2
from kiln.serving.host import ModelHost, Served
from kiln.serving.routing import Router
from kiln.serving.schemas import ServeArgs
from kiln.training.artifacts import model_to_files
from kiln.training.evaluate import softmax
from kiln.training.models import build_model, set_standardization
from kiln.training.tabular import Encoding
from tests.conftest import TINY_SPEC, tiny_model_files
from tests.serving.test_routes import client_for, no_overrides_left  # noqa: F401

CITIES = ["lima", "paris", "tokyo"]
CHURN_INPUTS = [
    {
        "name": "age",
        "kind": "numeric",
        "type": "int64",
        "impute": 41.2,
        "indicator": True,
        "missing_count": 12,
    },
    {"name": "income", "kind": "numeric", "type": "double", "impute": 50000.0},
    {
        "name": "city",
        "kind": "categorical",
        "type": "string",
        "categories": CITIES,
        "counts": [10, 10, 10],
    },
    {
        "name": "plan",
        "kind": "categorical",
        "type": "string",
        "categories": ["basic", "pro"],
        "counts": [20, 10],
    },
]
# Features: age 0, age missing 1, income 2, city 3-7 (lima, paris, tokyo, other, missing),
# plan 8-11 (basic, pro, other, missing).
CHURN = {
    "kind": "logistic",
    "task": "classification",
    "num_features": 12,
    "classes": ["no", "yes"],
    "inputs": CHURN_INPUTS,
    "label": {"name": "churn", "type": "string"},
    "mean": [0.0] * 12,
    "std": [1.0] * 12,
}
CHURN_WEIGHT = np.zeros((2, 12), dtype=np.float32)
CHURN_WEIGHT[0, 8] = 4.0  # basic: no
CHURN_WEIGHT[1, 9] = 4.0  # pro: yes
CHURN_WEIGHT[1, 0] = 0.01  # the rest only moves the probabilities
CHURN_WEIGHT[1, 1] = 0.5
CHURN_WEIGHT[1, 2] = 1e-6
CHURN_WEIGHT[1, 4] = 0.3

RENEWAL = {  # boolean classes, a boolean and an integer categorical input
    "kind": "logistic",
    "task": "classification",
    "num_features": 10,
    "classes": [False, True],
    "inputs": [
        {
            "name": "vip",
            "kind": "categorical",
            "type": "bool",
            "categories": ["false", "true"],
            "counts": [5, 5],
        },
        {
            "name": "tier",
            "kind": "categorical",
            "type": "int64",
            "categories": ["1", "2", "3"],
            "counts": [5, 5, 5],
        },
        {"name": "score", "kind": "numeric", "type": "float", "impute": 0.5},
    ],
    "label": {"name": "renewed", "type": "bool"},
    "mean": [0.0] * 10,
    "std": [1.0] * 10,
}
# Features: vip 0-3 (false, true, other, missing), tier 4-8, score 9.
RENEWAL_WEIGHT = np.zeros((2, 10), dtype=np.float32)
RENEWAL_WEIGHT[0, 0] = 3.0
RENEWAL_WEIGHT[1, 1] = 3.0
RENEWAL_WEIGHT[1, 5] = 0.5  # tier 2

PRICE = {  # all numeric, a regressor: predicts a + 10 b
    "kind": "linear",
    "task": "regression",
    "num_features": 2,
    "inputs": [
        {"name": "a", "kind": "numeric", "type": "double", "impute": 1.0},
        {"name": "b", "kind": "numeric", "type": "double", "impute": 2.0},
    ],
    "mean": [0.0, 0.0],
    "std": [1.0, 1.0],
}


def linear_files(spec: dict, weight: np.ndarray) -> dict[str, bytes]:
    model = build_model(spec)
    set_standardization(model, spec)
    with torch.no_grad():
        model.body.weight.copy_(torch.from_numpy(weight))
        model.body.bias.zero_()
    return model_to_files(model, spec)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> dict[str, ModelReplica]:
    home = tmp_path_factory.mktemp("tables")
    service = RegistryService(str(home / "registry.db"), str(home / "store"), recover=False)
    files = {
        "churn": (linear_files(CHURN, CHURN_WEIGHT), CHURN),
        "renewal": (linear_files(RENEWAL, RENEWAL_WEIGHT), RENEWAL),
        "price": (linear_files(PRICE, np.array([[1.0, 10.0]], dtype=np.float32)), PRICE),
        "old": (tiny_model_files(), TINY_SPEC),
    }
    records = {name: service.register(name, f, spec, {}, {}) for name, (f, spec) in files.items()}
    service.close()
    return {name: ModelReplica(record, str(home / "store")) for name, record in records.items()}


@pytest.fixture
def client(replicas, monkeypatch):
    monkeypatch.setattr("kiln.serving.host.INLINE_FORWARD_S", float("inf"))
    host = ModelHost(ServeArgs(models=list(replicas), max_instances=50), registry=None)
    router = Router()
    for replica in replicas.values():
        router.add(replica.record.ref, default=True)
    host.served = Served({r.record.ref: r for r in replicas.values()}, router)
    return client_for(host)


def reference_probabilities(instances: list) -> np.ndarray:
    """The churn model in numpy: Encoding.expand, then the logistic layer."""
    raw = Encoding.from_spec(CHURN).rows_to_inputs(instances)
    return softmax(Encoding.from_spec(CHURN).expand(raw) @ CHURN_WEIGHT.T)


def predict(client, model: str, instances: list, **extra):
    return client.post(f"/v1/models/{model}:predict", json={"instances": instances, **extra})


def error_of(reply, status: int = 422) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert list(body) == ["error"]
    return body["error"]


# ---------------------------------------------------------------------------------- V1


CUSTOMERS = [
    {"age": 31, "income": 52000, "city": "lima", "plan": "basic"},
    {"age": 58, "income": 91000.5, "city": "paris", "plan": "pro"},
]


def test_v1_named_instances_answer_the_class_labels(client):
    reply = predict(client, "churn", CUSTOMERS, **{"return": "probabilities"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["predictions"] == ["no", "yes"]
    np.testing.assert_allclose(body["probabilities"], reference_probabilities(CUSTOMERS), 1e-5)


def test_v1_an_unseen_or_missing_value_still_answers(client):
    instances = [
        {"age": 31, "income": 52000, "city": "oslo", "plan": "pro"},  # unseen city: other
        {"income": 52000, "city": "lima", "plan": "basic"},  # no age: imputed, indicator on
        {"age": None, "income": None, "city": "", "plan": "pro"},
        {},
    ]
    reply = predict(client, "churn", instances, **{"return": "probabilities"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"][:3] == ["yes", "no", "yes"]
    np.testing.assert_allclose(
        reply.json()["probabilities"], reference_probabilities(instances), 1e-5
    )
    # The missing age is the training mean and flags its indicator: not the same as age 0.
    zero_age = predict(client, "churn", [{**instances[1], "age": 0}], **{"return": "probabilities"})
    assert zero_age.json()["probabilities"] != reply.json()["probabilities"][1]


def test_v1_rows_in_input_order_answer_as_the_objects_do(client):
    rows = [[31, 52000, "lima", "basic"], [58, 91000.5, "paris", "pro"], [None, 1, None, "pro"]]
    reply = predict(client, "churn", rows)
    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"] == ["no", "yes", "yes"]
    mixed = predict(client, "churn", [CUSTOMERS[0], rows[1]])
    assert mixed.json()["predictions"] == ["no", "yes"]


@pytest.mark.parametrize(
    "instance,fragment",
    [
        (
            {"age": 31, "plann": "pro"},
            'instance 0 has unknown input "plann"; this model takes: age, income, city, plan',
        ),
        ({"age": "31"}, "instance 0: \"age\" takes a number; got '31'"),
        ({"age": True}, '"age" takes a number; got True'),
        ({"city": 7}, '"city" takes a string; got 7'),
        ({"city": {"name": "lima"}}, '"city" takes a string'),
        ({"income": 1e39}, 'instance 0: "income" is infinite or too large for a 32-bit float'),
        ({"income": 10**400}, "too large"),
        ([31, 52000, "lima"], "instance 0 has 3 values; this model takes 4 (age, income, city"),
        ("lima", "instance 0 must be an object of features or a list of values"),
    ],
)
def test_v1_a_value_that_does_not_fit_is_a_422_naming_it(client, instance, fragment):
    assert fragment in error_of(predict(client, "churn", [instance]))


def test_v1_infinity_and_bad_counts_are_422(client):
    content = b'{"instances": [{"age": 1e999}]}'
    reply = client.post("/v1/models/churn:predict", content=content)
    assert '"age" is infinite' in error_of(reply)
    assert "instances is empty" in error_of(predict(client, "churn", []))
    assert "at most 50 per request" in error_of(predict(client, "churn", [{}] * 51))
    deep = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "nested deeper than 64" in error_of(
        client.post("/v1/models/churn:predict", content=deep), 400
    )


def test_v1_boolean_classes_answer_json_booleans(client):
    reply = predict(client, "renewal", [{"vip": True, "tier": 2}, {"vip": "false", "tier": "2"}])
    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"] == [True, False]


def test_v1_an_all_numeric_model_imputes_null_and_nan(client):
    reply = predict(client, "price", [[1.0, 3.0], [1.0, None], {"a": 5}])
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(reply.json()["predictions"], [31.0, 21.0, 25.0], rtol=1e-6)
    nan = client.post("/v1/models/price:predict", content=b'{"instances": [[NaN, 1]]}')
    np.testing.assert_allclose(nan.json()["predictions"], [11.0], rtol=1e-6)
    assert "infinite or too large" in error_of(
        client.post("/v1/models/price:predict", content=b'{"instances": [[1e999, 1]]}')
    )


def test_v1_a_model_without_inputs_keeps_its_rows_of_numbers(client, replicas):
    rows = [[0.1, 0.2, 0.3, 0.4], [1, -1, 0.5, 2]]
    reply = predict(client, "old", rows)
    expected = replicas["old"].predict(np.asarray(rows, dtype=np.float32))["predictions"]
    assert reply.status_code == 200 and reply.json()["predictions"] == expected
    # As before: lax numbers (as list[list[float]] read them), then the shape, then finiteness;
    # but JSON booleans are not numbers (issue 19).
    assert predict(client, "old", [[1, "0.2", 0, 1]]).status_code == 200
    assert "holds a boolean" in error_of(predict(client, "old", [[True, "0.2", 0, 1]]))
    assert "instance 0 has 2 values" in error_of(predict(client, "old", [[1, 2]]))
    assert "instances must have shape [N, 4]" in error_of(predict(client, "old", [[1] * 4, [1]]))
    assert error_of(predict(client, "old", [[1, 2, 3, "x"]])).startswith(
        "instances.0.3: Input should be a valid number"
    )
    assert "instances.0.1: Input should be a valid number" in error_of(
        predict(client, "old", [[1, None, 3, 4]])
    )
    nan = client.post("/v1/models/old:predict", content=b'{"instances": [[1, 2, 3, NaN]]}')
    assert "instance 0 holds NaN or Inf" in error_of(nan)
    assert "takes rows of 4 numbers" in error_of(predict(client, "old", [{"a": 1}]))
    assert "shape [N, 4] with N >= 1" in error_of(predict(client, "old", []))


def test_v1_metadata_lists_the_inputs_and_the_label(client):
    info = client.get("/v1/models/churn").json()
    assert info["num_features"] == 12 and info["classes"] == ["no", "yes"]
    assert info["label"] == {"name": "churn", "type": "string"}
    assert info["inputs"] == [
        {"name": "age", "kind": "numeric", "type": "int64", "categories": None},
        {"name": "income", "kind": "numeric", "type": "double", "categories": None},
        {"name": "city", "kind": "categorical", "type": "string", "categories": CITIES},
        {"name": "plan", "kind": "categorical", "type": "string", "categories": ["basic", "pro"]},
    ]
    old = client.get("/v1/models/old").json()
    assert (old["inputs"], old["label"], old["num_features"]) == (None, None, 4)


def test_the_openapi_document_describes_rows_and_objects():
    from kiln.serving.app import api

    operation = api.openapi()["paths"]["/v1/models/{name}:predict"]["post"]
    instances = operation["requestBody"]["content"]["application/json"]["schema"]["properties"][
        "instances"
    ]
    row, named = instances["items"]["anyOf"]
    assert row["type"] == "array" and named["type"] == "object"
    assert set(row["items"]["type"]) == {"number", "string", "boolean", "null"}


# ---------------------------------------------------------------------------------- V2


def test_v2_metadata_lists_one_input_per_column_of_a_table_with_categories(client):
    meta = client.get("/v2/models/churn").json()
    assert meta["inputs"] == [
        {"name": "age", "datatype": "FP32", "shape": [-1, 1]},
        {"name": "income", "datatype": "FP32", "shape": [-1, 1]},
        {"name": "city", "datatype": "BYTES", "shape": [-1, 1]},
        {"name": "plan", "datatype": "BYTES", "shape": [-1, 1]},
    ]
    assert meta["outputs"] == [
        {"name": "predictions", "datatype": "BYTES", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ]
    renewal = client.get("/v2/models/renewal").json()
    assert [(i["name"], i["datatype"]) for i in renewal["inputs"]] == [
        ("vip", "BOOL"),
        ("tier", "INT64"),
        ("score", "FP32"),
    ]
    assert renewal["outputs"][0]["datatype"] == "BOOL"
    # All numeric, with inputs or without: one `features` tensor, as before.
    assert client.get("/v2/models/price").json()["inputs"] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, 2]}
    ]
    assert client.get("/v2/models/old").json()["inputs"] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, 4]}
    ]


def column(name: str, datatype: str, data: list, shape: list | None = None) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


def infer(client, model: str, inputs: list, **extra):
    return client.post(f"/v2/models/{model}/infer", json={"inputs": inputs, **extra})


def test_v2_json_inputs_by_name_answer_string_classes(client):
    inputs = [
        column("age", "FP32", [[31], [58]], [2, 1]),
        column("income", "INT64", [52000, 91000]),
        column("city", "BYTES", ["lima", "paris"]),
        column("plan", "BYTES", [["basic"], ["pro"]], [2, 1]),
    ]
    reply = infer(client, "churn", inputs)
    assert reply.status_code == 200, reply.text
    predictions, probabilities = reply.json()["outputs"]
    assert predictions == {
        "name": "predictions",
        "datatype": "BYTES",
        "shape": [2],
        "data": ["no", "yes"],
    }
    instances = [
        {"age": 31, "income": 52000, "city": "lima", "plan": "basic"},
        {"age": 58, "income": 91000, "city": "paris", "plan": "pro"},
    ]
    np.testing.assert_allclose(
        np.reshape(probabilities["data"], (2, 2)), reference_probabilities(instances), 1e-5
    )


def test_v2_an_input_not_sent_is_missing_in_every_row(client):
    reply = infer(client, "churn", [column("plan", "BYTES", ["pro", "basic", ""])])
    assert reply.status_code == 200, reply.text
    probabilities = np.reshape(reply.json()["outputs"][1]["data"], (3, 2))
    expected = reference_probabilities([{"plan": "pro"}, {"plan": "basic"}, {}])
    np.testing.assert_allclose(probabilities, expected, 1e-5)
    nulls = infer(
        client, "churn", [column("age", "FP64", [None, 40]), column("city", "BYTES", [None, "x"])]
    )
    assert nulls.status_code == 200, nulls.text
    np.testing.assert_allclose(
        np.reshape(nulls.json()["outputs"][1]["data"], (2, 2)),
        reference_probabilities([{}, {"age": 40, "city": "x"}]),
        1e-5,
    )


def test_v2_binary_bytes_inputs_and_outputs_with_tritons_client(client):
    age = triton.InferInput("age", [3, 1], "FP32")
    age.set_data_from_numpy(np.array([[31], [58], [np.nan]], dtype=np.float32), binary_data=True)
    city = triton.InferInput("city", [3], "BYTES")
    city.set_data_from_numpy(np.array(["lima", "paris", "oslo"], dtype=object), binary_data=True)
    plan = triton.InferInput("plan", [3, 1], "BYTES")
    plan.set_data_from_numpy(np.array([[b"basic"], [b"pro"], [b"pro"]], dtype=object))
    outputs = [
        triton.InferRequestedOutput(n, binary_data=True) for n in ("predictions", "probabilities")
    ]
    body, header_length = triton.InferenceServerClient.generate_request_body(
        [age, city, plan], outputs=outputs
    )
    reply = client.post(
        "/v2/models/churn/infer",
        content=body,
        headers={v2.HEADER_LENGTH: str(header_length), "content-type": "application/octet-stream"},
    )
    assert reply.status_code == 200, reply.text
    result = triton.InferenceServerClient.parse_response_body(
        reply.content, header_length=int(reply.headers[v2.HEADER_LENGTH])
    )
    assert result.get_output("predictions")["datatype"] == "BYTES"
    assert result.as_numpy("predictions").tolist() == [b"no", b"yes", b"yes"]
    instances = [
        {"age": 31, "city": "lima", "plan": "basic"},
        {"age": 58, "city": "paris", "plan": "pro"},
        {"city": "oslo", "plan": "pro"},
    ]
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), reference_probabilities(instances), 1e-5
    )


def test_v2_tritons_default_request_gets_binary_outputs(client):
    # Naming no outputs, Triton's client asks for every output binary (binary_data_output).
    plan = triton.InferInput("plan", [2, 1], "BYTES")
    plan.set_data_from_numpy(np.array([["pro"], ["basic"]], dtype=object))
    body, header_length = triton.InferenceServerClient.generate_request_body([plan])
    assert b'"binary_data_output":true' in body
    reply = client.post(
        "/v2/models/churn/infer", content=body, headers={v2.HEADER_LENGTH: str(header_length)}
    )
    assert reply.status_code == 200, reply.text
    result = triton.InferenceServerClient.parse_response_body(
        reply.content, header_length=int(reply.headers[v2.HEADER_LENGTH])
    )
    assert result.as_numpy("predictions").tolist() == [b"yes", b"no"]
    assert result.as_numpy("probabilities").shape == (2, 2)
    assert all("parameters" in o for o in result.get_response()["outputs"])


def length_prefixed(*values: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def post_binary(client, model: str, inputs: list, tail: bytes, outputs: list | None = None):
    header = json.dumps({"inputs": inputs, **({"outputs": outputs} if outputs else {})}).encode()
    return client.post(
        f"/v2/models/{model}/infer",
        content=header + tail,
        headers={v2.HEADER_LENGTH: str(len(header))},
    )


def test_v2_binary_bytes_by_hand_and_bool_in_and_out(client):
    plan = length_prefixed(b"pro", b"basic")
    reply = post_binary(
        client,
        "churn",
        [
            {
                "name": "plan",
                "datatype": "BYTES",
                "shape": [2],
                "parameters": {"binary_data_size": len(plan)},
            }
        ],
        plan,
        [{"name": "predictions", "parameters": {"binary_data": True}}],
    )
    assert reply.status_code == 200, reply.text
    header, tail = v2.split_body(reply.content, reply.headers[v2.HEADER_LENGTH])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": len(tail)}
    assert tail == length_prefixed(b"yes", b"no")
    # BOOL: one byte per element, in and out; INT64 for the integer category.
    vip, tier = np.array([1, 0, 1], dtype=np.uint8).tobytes(), np.array([2, 2, 9], "<i8").tobytes()
    reply = post_binary(
        client,
        "renewal",
        [
            {
                "name": "vip",
                "datatype": "BOOL",
                "shape": [3, 1],
                "parameters": {"binary_data_size": 3},
            },
            {
                "name": "tier",
                "datatype": "INT64",
                "shape": [3],
                "parameters": {"binary_data_size": 24},
            },
        ],
        vip + tier,
        [{"name": "predictions", "parameters": {"binary_data": True}}],
    )
    assert reply.status_code == 200, reply.text
    header, tail = v2.split_body(reply.content, reply.headers[v2.HEADER_LENGTH])
    assert header["outputs"][0]["datatype"] == "BOOL" and tail == b"\x01\x00\x01"
    as_json = infer(
        client,
        "renewal",
        [column("vip", "BOOL", [True, False]), column("tier", "BYTES", ["2", "3"])],
    )
    assert as_json.json()["outputs"][0]["data"] == [True, False]


def test_v2_an_all_numeric_model_takes_features_with_nan_as_missing(client):
    features = {"name": "features", "datatype": "FP32", "shape": [2, 2]}
    reply = client.post(
        "/v2/models/price/infer",
        content=json.dumps({"inputs": [{**features, "data": [1, 3, 1, math.nan]}]}),
    )
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(reply.json()["outputs"][0]["data"], [31.0, 21.0], rtol=1e-6)
    null = infer(client, "price", [{**features, "data": [[1, 3], [None, 1]]}])
    np.testing.assert_allclose(null.json()["outputs"][0]["data"], [31.0, 11.0], rtol=1e-6)
    by_name = infer(client, "price", [column("b", "FP32", [3.0])])
    np.testing.assert_allclose(by_name.json()["outputs"][0]["data"], [31.0], rtol=1e-6)
    inf = np.array([[1, np.inf], [1, 1]], dtype="<f4").tobytes()
    binary = post_binary(
        client, "price", [{**features, "parameters": {"binary_data_size": 16}}], inf
    )
    assert "holds Inf" in error_of(binary)
    assert "unknown input 'x'; this model takes: a (FP32), b (FP32); or 'features'" in error_of(
        infer(client, "price", [column("x", "FP32", [1.0])])
    )


def test_v2_a_model_without_inputs_keeps_refusing_nan(client):
    data = {"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, None]}
    assert "NaN or Inf" in error_of(infer(client, "old", [data]))
    assert "unknown input 'age'; this model takes 'features'" in error_of(
        infer(client, "old", [column("age", "FP32", [1.0])])
    )


@pytest.mark.parametrize(
    "inputs,fragment",
    [
        (
            [column("city", "FP32", [1.0])],
            "input 'city' (categorical, string) takes datatype BYTES; got 'FP32'",
        ),
        ([column("age", "BYTES", ["31"])], "input 'age' (numeric, int64) takes datatype FP32 or"),
        ([column("plan", "BOOL", [True])], "takes datatype BYTES; got 'BOOL'"),
        (
            [column("agee", "FP32", [1.0])],
            "unknown input 'agee'; this model takes: age (FP32), "
            "income (FP32), city (BYTES), plan (BYTES)",
        ),
        ([column("features", "FP32", [1.0] * 4, [1, 4])], "unknown input 'features'"),
        (
            [column("age", "FP32", [1, 2]), column("plan", "BYTES", ["pro"])],
            "every input must have the same N; 'age' has 2, 'plan' has 1",
        ),
        ([column("age", "FP32", [1, 2]), column("age", "FP32", [1, 2])], "'age' is sent twice"),
        ([column("age", "FP32", [1, 2], [1, 2])], "must have shape [N] or [N, 1]; got [1, 2]"),
        ([column("age", "FP32", [[1]], [1, 1, 1])], "must have shape [N] or [N, 1]"),
        ([column("age", "FP32", [], [0])], "N must be between 1 and 50"),
        ([column("age", "FP32", [1] * 51)], "N must be between 1 and 50"),
        ([column("age", "FP32", [1, 2], [3])], "input 'age' has 2 values; its shape needs 3"),
        ([column("age", "FP32", ["31"])], "input 'age' is FP32; got '31'"),
        ([column("age", "FP32", [True])], "input 'age' is FP32; got True"),
        ([column("age", "FP32", [[[1]]])], "input 'age' is FP32; got [1]"),
        ([column("city", "BYTES", [7])], "input 'city' is BYTES; got 7"),
        ([column("age", "FP64", [1e39])], 'row 0: "age" is infinite or too large'),
        ([{"name": "age", "datatype": "FP32", "shape": [1]}], "neither a 'data' list"),
        ([{**column("age", "FP32", [1]), "parameters": [1]}], "'parameters' must be an object"),
        (
            [{**column("age", "FP32", [1]), "parameters": {"binary_data_size": "4"}}],
            "binary_data_size must be a byte count",
        ),
        ([], "send the model's inputs by name"),
        (["age"], "send the model's inputs by name"),
    ],
)
def test_v2_inputs_that_do_not_fit_are_a_422_saying_why(client, inputs, fragment):
    assert fragment in error_of(infer(client, "churn", inputs))


@pytest.mark.parametrize(
    "datatype,size,tail,fragment",
    [
        ("BYTES", 100, length_prefixed(b"pro"), "past the end of the body"),
        ("BYTES", 6, length_prefixed(b"pro"), "binary BYTES must be 1 elements"),
        ("BYTES", 9, b"\x09\x00\x00\x00pro\x00\x00", "binary BYTES must be 1 elements"),
        ("BYTES", 8, length_prefixed(b"pr\xff\xfe"), "element 0 is not UTF-8"),
        ("BYTES", 14, length_prefixed(b"pro", b"pro"), "binary BYTES must be 1 elements"),
        ("BOOL", 2, b"\x01\x00", "does not match 1 BOOL values (1 bytes)"),
    ],
)
def test_v2_malformed_binary_tensors_are_422(client, datatype, size, tail, fragment):
    name = "plan" if datatype == "BYTES" else "vip"
    model = "churn" if datatype == "BYTES" else "renewal"
    tensor = {
        "name": name,
        "datatype": datatype,
        "shape": [1],
        "parameters": {"binary_data_size": size},
    }
    assert fragment in error_of(post_binary(client, model, [tensor], tail))


@pytest.mark.parametrize(
    "content",
    [
        b'{"inputs": [{"name": "plan", "shape": [true], "datatype": "BYTES", "data": ["pro"]}]}',
        b'{"inputs": [{"name": "plan", "shape": [1], "datatype": "BYTES", "data": "pro"}]}',
        b'{"inputs": [{"name": ["plan"], "shape": [1], "datatype": "BYTES", "data": ["x"]}]}',
        b'{"inputs": [{"name": "plan", "shape": [1], "datatype": ["BYTES"], "data": ["x"]}]}',
        b'{"inputs": [{"name": "plan", "shape": [1], "datatype": "BYTES", "data": [{}]}]}',
        b'{"inputs": [{"name": "plan", "shape": [1], "datatype": "BYTES", "data": ["p"]}], '
        b'"outputs": [{"name": "predictions", "parameters": [true]}]}',
        b'{"inputs": {"plan": ["pro"]}}',
        b'{"inputs": [{"name": "age", "shape": [1], "datatype": "INT64", "data": [1e400]}]}',
        b'{"inputs": [{"name": "age", "shape": [1], "datatype": "INT64", "data": ['
        + b"9" * 400
        + b"]}]}",
        b"[" * 50_000,
    ],
)
def test_v2_no_client_input_gets_a_5xx(client, content):
    reply = client.post("/v2/models/churn/infer", content=content)
    assert 400 <= reply.status_code < 500, reply.text
    assert list(reply.json()) == ["error"]


@pytest.mark.parametrize(
    "classes,datatype",
    [
        ([0, 1, 2], "INT64"),
        ([False, True], "BOOL"),  # isinstance(True, int), yet not INT64
        ([0, True], "BYTES"),
        ([0.5, 1.5], "FP64"),
        (["no", "yes"], "BYTES"),
        ([1, "a"], "BYTES"),
    ],
)
def test_prediction_datatype_follows_the_classes(classes, datatype):
    spec = {"task": "classification", "classes": classes, "num_features": 1}
    assert v2.prediction_dtype(spec) == datatype
    assert v2.prediction_dtype({"task": "regression", "num_features": 1}) == "FP32"
