"""serving/grpc_v2.py without Ray: the request proto -> V2 request -> numpy mapping, the V2
outputs -> response proto mapping (read back by the stock tritonclient), and the HTTP
status -> gRPC code mapping. The served path is tests/e2e/test_grpc_user.py."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
import tritonclient.grpc as triton
from fastapi import HTTPException
from tritonclient.grpc import service_pb2 as pb

from kiln.serving import grpc_v2, v2
from kiln.serving.schemas import RequestError

SPEC = {"task": "classification", "classes": [0, 1, 2], "num_features": 4}


def request_to_v2(request: Any) -> tuple[bytes, str]:
    """The request as the HTTP V2 path would receive it: (JSON header + tensors, the header's
    length), so the checks below go through the same split and parse."""
    header, tail = grpc_v2.request_header(request)
    head = orjson.dumps(header)
    return head + tail, str(len(head))


def parsed(request: Any, num_features: int = 4) -> np.ndarray:
    """The (N, F) float32 rows the HTTP V2 path reads from the request's V2 body."""
    body, header_length = request_to_v2(request)
    header, tail = v2.split_body(body, header_length)
    return v2.parse_infer_request(header, tail, num_features, 100)


def refused(request: Any) -> grpc_v2.GrpcRefusal:
    with pytest.raises(grpc_v2.GrpcRefusal) as caught:
        request_to_v2(request)
    return caught.value


def test_raw_input_contents_from_tritonclient_reach_the_rows_unchanged() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    tensor = triton.InferInput("features", [3, 4], "FP32")
    tensor.set_data_from_numpy(x)
    request = pb.ModelInferRequest(model_name="m", inputs=[tensor._get_tensor()])
    request.raw_input_contents.append(tensor._get_content())
    np.testing.assert_array_equal(parsed(request), x)


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("FP32", "fp32_contents", [0.5, -1.25, 3.0, 4.0, 5.5, 6.0]),
        ("FP64", "fp64_contents", [0.1, 2.0, 3.0, 4.0, 5.0, 6.0]),
        ("INT64", "int64_contents", [1, -2, 3, 4, 5, 2**40]),
        ("INT32", "int_contents", [1, -2, 3, 4, 5, 6]),
    ],
)
def test_typed_contents_reach_the_rows_as_the_same_numbers(
    datatype: str, field: str, values: list[float]
) -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="features", datatype=datatype, shape=[2, 3])
    getattr(tensor.contents, field).extend(values)
    rows = parsed(request, num_features=3)
    np.testing.assert_array_equal(rows, np.asarray(values, dtype=np.float32).reshape(2, 3))


def test_bytes_contents_pack_as_the_binary_bytes_tensor() -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="city", datatype="BYTES", shape=[2, 1])
    tensor.contents.bytes_contents.extend([b"Oslo", "Zürich".encode()])
    body, header_length = request_to_v2(request)
    _, tail = v2.split_body(body, header_length)
    assert v2.decode_bytes(tail, "city", 2) == ["Oslo", "Zürich"]


def test_request_id_and_outputs_carry_over_all_outputs_binary() -> None:
    request = pb.ModelInferRequest(model_name="m", id="abc")
    request.inputs.add(
        name="features", datatype="FP32", shape=[1, 1]
    ).contents.fp32_contents.append(1.0)
    request.outputs.add(name="probabilities")
    body, header_length = request_to_v2(request)
    header, _ = v2.split_body(body, header_length)
    assert header["id"] == "abc"
    assert v2.requested_outputs(header, SPEC) == [("probabilities", True)]
    request.ClearField("outputs")
    header, _ = v2.split_body(*request_to_v2(request))
    assert v2.requested_outputs(header, SPEC) == [("predictions", True), ("probabilities", True)]


def test_too_few_typed_values_name_the_field_and_the_count() -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[2, 4])
    tensor.contents.fp32_contents.extend([1.0] * 5)
    refusal = refused(request)
    assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(refusal) == (
        "input 'features': contents.fp32_contents has 5 values; shape [2, 4] needs 8"
    )


def test_values_in_the_wrong_typed_field_are_refused_naming_the_right_one() -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[1, 2])
    tensor.contents.int64_contents.extend([1, 2])
    message = str(refused(request))
    assert "takes its values in contents.fp32_contents" in message
    assert "it has int64_contents" in message


def test_a_datatype_without_typed_contents_asks_for_raw() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="features", datatype="FP16", shape=[1, 2])
    assert "send it in raw_input_contents" in str(refused(request))


def test_raw_contents_must_cover_every_input() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="FP32", shape=[1, 1])
    request.inputs.add(name="b", datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(np.float32(1).tobytes())
    refusal = refused(request)
    assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents has 1 entries for 2 inputs" in str(refusal)


def test_a_bad_shape_is_the_http_paths_422_message() -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[1, 3])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with pytest.raises(v2.V2Error) as caught:
        parsed(request, num_features=4)
    assert caught.value.status == 422
    answer = grpc_v2.refusal(caught.value)
    assert answer is not None and answer.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(answer) == "shape must be [N, 4]; got [1, 3]"


def test_the_v2_response_reads_back_in_tritonclient() -> None:
    arrays = {
        "predictions": np.array([2, 0]),
        "probabilities": np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1]], dtype=np.float32),
    }
    wanted = [("predictions", True), ("probabilities", True)]
    response = grpc_v2.proto_response(
        "m", 3, "req-1", arrays, wanted, SPEC, {"prediction_ids": ["p-0", "p-1"]}
    )
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "req-1")
    assert response.parameters["prediction_ids"].string_param == "p-0,p-1"
    result = triton.InferResult(response)
    np.testing.assert_array_equal(result.as_numpy("predictions"), [2, 0])
    np.testing.assert_array_equal(result.as_numpy("probabilities"), arrays["probabilities"])


def test_string_predictions_read_back_as_bytes() -> None:
    spec = {"task": "classification", "classes": ["cat", "dog"], "num_features": 2}
    arrays = {"predictions": np.array(["dog", "cat"], dtype=object)}
    response = grpc_v2.proto_response("m", 1, "r", arrays, [("predictions", True)], spec)
    result = triton.InferResult(response)
    assert result.as_numpy("predictions").tolist() == [b"dog", b"cat"]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (HTTPException(401, "missing API key"), grpc.StatusCode.UNAUTHENTICATED),
        (HTTPException(403, "lacks scope"), grpc.StatusCode.PERMISSION_DENIED),
        (RequestError(404, "not served"), grpc.StatusCode.NOT_FOUND),
        (HTTPException(404, "version x is not a number"), grpc.StatusCode.NOT_FOUND),
        (v2.V2Error(422, "shape"), grpc.StatusCode.INVALID_ARGUMENT),
        (HTTPException(413, "too big"), grpc.StatusCode.INVALID_ARGUMENT),
        (v2.V2Error(400, "header"), grpc.StatusCode.INVALID_ARGUMENT),
        (HTTPException(429, "rate"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (RequestError(503, "restarting"), grpc.StatusCode.UNAVAILABLE),
        (RequestError(500, "bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_http_statuses_map_to_grpc_codes(error: Exception, code: grpc.StatusCode) -> None:
    answer = grpc_v2.refusal(error)
    assert answer is not None
    assert answer.code == code
    assert str(answer) == str(getattr(error, "detail", error))


def test_an_unexpected_error_is_not_a_refusal() -> None:
    assert grpc_v2.refusal(ValueError("bug")) is None


class Context:
    """What `answered` uses of a gRPC servicer context."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def test_a_refused_call_sets_the_code_and_answers_an_empty_message() -> None:
    async def fails() -> Any:
        raise RequestError(404, "model 'x' is not served here")

    context = Context()
    answer = asyncio.run(grpc_v2.answered(context, pb.ModelInferResponse, fails()))
    assert answer == pb.ModelInferResponse()
    assert (context.code, context.details) == (
        grpc.StatusCode.NOT_FOUND,
        "model 'x' is not served here",
    )


def test_the_servicer_function_registers_the_v2_methods_only() -> None:
    class Server:
        handlers: dict[str, Any] = {}

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            Server.handlers.update(handlers[0]._method_handlers)

    grpc_v2.add_inference_servicer(
        object.__new__(type("S", (), {m: None for m in grpc_v2.METHODS})), Server()
    )
    assert sorted(Server.handlers) == sorted(
        f"/inference.GRPCInferenceService/{m}" for m in grpc_v2.METHODS
    )
    infer = Server.handlers["/inference.GRPCInferenceService/ModelInfer"]
    assert infer.request_deserializer == pb.ModelInferRequest.FromString
