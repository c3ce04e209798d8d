"""Open Inference Protocol V2 parsing and response building, JSON and binary. No Ray."""

import json

import numpy as np
import pytest

from kiln.serving import v2
from kiln.serving.schemas import RequestError

CLASSIFIER = {"task": "classification", "num_features": 3, "classes": [0, 1, 2]}
LABELLED = {"task": "classification", "num_features": 3, "classes": ["a", "b"]}
REGRESSOR = {"task": "regression", "num_features": 3}


def tensor(**fields):
    return {"name": "features", "shape": [2, 3], "datatype": "FP32", **fields}


def parse(body, tail=b"", max_rows=100):
    return v2.parse_infer_request(body, tail, num_features=3, max_rows=max_rows)


def test_json_data_flat_or_nested_gives_float32_rows():
    flat = parse({"inputs": [tensor(data=[1, 2, 3, 4, 5, 6])]})
    nested = parse({"inputs": [tensor(data=[[1, 2, 3], [4, 5, 6]])]})
    assert flat.dtype == np.float32 and flat.shape == (2, 3)
    np.testing.assert_array_equal(flat, nested)
    np.testing.assert_array_equal(flat[1], [4, 5, 6])


@pytest.mark.parametrize("datatype", sorted(v2.DTYPES))
def test_every_accepted_datatype_reads_as_binary_little_endian(datatype):
    values = np.array(
        [[1, 2, 3], [4, 5, -6]], dtype=np.dtype(v2.DTYPES[datatype]).newbyteorder("<")
    )
    raw = values.tobytes()
    x = parse(
        {"inputs": [tensor(datatype=datatype, parameters={"binary_data_size": len(raw)})]}, raw
    )
    np.testing.assert_array_equal(x, values.astype(np.float32))


def test_split_body_separates_the_json_header_from_the_binary_tail():
    header = json.dumps({"inputs": []}).encode()
    body, tail = v2.split_body(header + b"\x01\x02", str(len(header)))
    assert (body, tail) == ({"inputs": []}, b"\x01\x02")
    assert v2.split_body(header, None) == ({"inputs": []}, b"")


@pytest.mark.parametrize(
    "raw,length,status,fragment",
    [
        (b'{"inputs": []}', "99", 400, "does not fit the body"),
        (b'{"inputs": []}', "x", 400, "does not fit the body"),
        (b"{not json", None, 400, "not valid JSON"),
        (b"[1, 2]", None, 422, "must be a JSON object"),
    ],
)
def test_split_body_refuses_what_it_cannot_read(raw, length, status, fragment):
    with pytest.raises(v2.V2Error, match=fragment) as raised:
        v2.split_body(raw, length)
    assert raised.value.status == status and isinstance(raised.value, RequestError)


@pytest.mark.parametrize(
    "inputs,fragment",
    [
        ([], "send exactly one input"),
        ([tensor(name="x", data=[0] * 6)], "unknown input 'x'"),
        ([tensor(datatype="BOOL", data=[0] * 6)], "datatype 'BOOL' is not supported"),
        ([tensor(shape=[2, 4], data=[0] * 8)], "shape must be [N, 3]"),
        ([tensor(shape=[6], data=[0] * 6)], "shape must be [N, 3]"),
        ([tensor(shape=[0, 3], data=[])], "N must be between 1 and 100"),
        ([tensor(data=[0] * 5)], "has 5 values; shape needs 6"),
        ([tensor(data=["a"] * 6)], "must be numbers"),
        ([tensor()], "neither 'data' nor a binary_data_size"),
        ([tensor(data=[1, 2, 3, 4, 5, float("nan")])], "NaN or Inf"),
        ([tensor(parameters={"binary_data_size": 8})], "does not match the shape"),
    ],
)
def test_a_bad_input_is_a_422_that_says_what_to_send(inputs, fragment):
    with pytest.raises(v2.V2Error) as raised:
        parse({"inputs": inputs})
    assert raised.value.status == 422 and fragment in str(raised.value)


def test_too_many_rows_is_refused():
    with pytest.raises(v2.V2Error, match="N must be between 1 and 1"):
        parse({"inputs": [tensor(data=[0] * 6)]}, max_rows=1)


def test_metadata_names_the_outputs_and_their_datatypes():
    meta = v2.model_metadata("m", 4, CLASSIFIER)
    assert meta["versions"] == ["4"]
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 3]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("predictions", "INT64", [-1]),
        ("probabilities", "FP32", [-1, 3]),
    ]
    assert v2.model_metadata("m", 1, LABELLED)["outputs"][0]["datatype"] == "BYTES"
    assert [o["name"] for o in v2.model_metadata("r", 1, REGRESSOR)["outputs"]] == ["predictions"]


def test_requested_outputs_default_to_all_as_json():
    assert v2.requested_outputs({}, CLASSIFIER) == [
        ("predictions", False),
        ("probabilities", False),
    ]
    asked = {"outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}
    assert v2.requested_outputs(asked, CLASSIFIER) == [("probabilities", True)]
    with pytest.raises(
        v2.V2Error, match="unknown output 'probabilities'; this model has predictions"
    ):
        v2.requested_outputs(asked, REGRESSOR)
    with pytest.raises(v2.V2Error, match="must be a list of objects"):
        v2.requested_outputs({"outputs": ["predictions"]}, CLASSIFIER)


def test_a_json_response_carries_the_data_and_no_header_length():
    arrays = {"predictions": np.array([2, 0]), "probabilities": np.eye(3)[[2, 0]]}
    wanted = [("predictions", False), ("probabilities", False)]
    content, header_length = v2.build_response("m", 4, "req-1", arrays, wanted, CLASSIFIER)
    assert header_length is None
    reply = json.loads(content)
    assert (reply["model_name"], reply["model_version"], reply["id"]) == ("m", "4", "req-1")
    assert reply["outputs"][0] == {
        "name": "predictions",
        "datatype": "INT64",
        "shape": [2],
        "data": [2, 0],
    }
    assert reply["outputs"][1]["shape"] == [2, 3] and reply["outputs"][1]["data"][:3] == [0, 0, 1]


def test_binary_outputs_follow_the_json_header():
    probabilities = np.array([[0.25, 0.75, 0.0]], dtype=np.float32)
    arrays = {"predictions": np.array([1]), "probabilities": probabilities}
    wanted = [("predictions", False), ("probabilities", True)]
    content, header_length = v2.build_response("m", 1, "r", arrays, wanted, CLASSIFIER)
    header, tail = v2.split_body(content, header_length)
    size = header["outputs"][1]["parameters"]["binary_data_size"]
    assert size == 12 and len(tail) == size and "data" not in header["outputs"][1]
    np.testing.assert_array_equal(np.frombuffer(tail, dtype="<f4").reshape(1, 3), probabilities)


def test_string_labels_go_binary_length_prefixed_when_asked():
    arrays = {"predictions": np.array(["b", "ab"])}
    content, header_length = v2.build_response(
        "m", 1, "r", arrays, [("predictions", True)], LABELLED
    )
    header, tail = v2.split_body(content, header_length)
    output = header["outputs"][0]
    assert output["datatype"] == "BYTES" and "data" not in output
    assert tail == b"\x01\x00\x00\x00b\x02\x00\x00\x00ab"
    assert output["parameters"]["binary_data_size"] == len(tail)
    as_json, no_length = v2.build_response("m", 1, "r", arrays, [("predictions", False)], LABELLED)
    assert no_length is None and json.loads(as_json)["outputs"][0]["data"] == ["b", "ab"]
