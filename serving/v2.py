"""Open Inference Protocol V2 (KServe, Triton): request parsing and response building.

Both the JSON form and the binary-tensor extension are read, since Triton's own client sends
binary tensors by default: the body is a JSON header of `Inference-Header-Content-Length`
bytes followed by the raw little-endian tensors, each announced by its `binary_data_size`.
Pure logic, no Ray; errors are `V2Error`, a `RequestError` that answers with its 4xx.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from serving.schemas import RequestError

INPUT_NAME = "features"
DTYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "INT64": np.int64,
    "INT32": np.int32,
    "FP16": np.float16,
}
HEADER_LENGTH = "inference-header-content-length"


class V2Error(RequestError):
    """A malformed or unservable V2 request; `status` is its 4xx."""


def split_body(raw: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON part of a request and the binary tail (empty without the extension)."""
    if header_length is None:
        json_part, tail = raw, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(raw):
            raise V2Error(
                400, f"Inference-Header-Content-Length {header_length!r} does not fit the body"
            )
        json_part, tail = raw[: int(header_length)], raw[int(header_length) :]
    try:
        parsed = json.loads(json_part, parse_constant=lambda c: math.nan)
    except (ValueError, UnicodeDecodeError) as exc:
        raise V2Error(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise V2Error(422, "the request must be a JSON object with an 'inputs' list")
    return parsed, tail


def parse_infer_request(
    body: dict[str, Any], tail: bytes, num_features: int, max_rows: int
) -> np.ndarray:
    """The single input tensor as (N, num_features) float32, validated."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise V2Error(
            422, f"send exactly one input, named {INPUT_NAME!r}, of shape [-1, {num_features}]"
        )
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise V2Error(422, f"unknown input {tensor.get('name')!r}; this model takes {INPUT_NAME!r}")
    datatype = tensor.get("datatype")
    if datatype not in DTYPES:
        raise V2Error(
            422, f"datatype {datatype!r} is not supported; use one of {', '.join(DTYPES)}"
        )
    shape = tensor.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(d, int) and d >= 0 for d in shape)
    ):
        raise V2Error(422, f"shape must be [N, {num_features}]; got {shape!r}")
    if shape[1] != num_features:
        raise V2Error(422, f"shape must be [N, {num_features}]; got {shape}")
    if not 1 <= shape[0] <= max_rows:
        raise V2Error(422, f"N must be between 1 and {max_rows}; got shape {shape}")
    values = tensor_values(tensor, tail, DTYPES[datatype], shape[0] * shape[1])
    x = values.reshape(shape).astype(np.float32)
    if not np.isfinite(x).all():
        raise V2Error(422, "the input holds NaN or Inf; send finite numbers only")
    return x


def tensor_values(tensor: dict[str, Any], tail: bytes, dtype: type, count: int) -> np.ndarray:
    binary_size = (tensor.get("parameters") or {}).get("binary_data_size")
    if binary_size is not None:
        if binary_size != count * np.dtype(dtype).itemsize or binary_size > len(tail):
            raise V2Error(
                422, f"binary_data_size {binary_size} does not match the shape and datatype"
            )
        return np.frombuffer(tail[:binary_size], dtype=np.dtype(dtype).newbyteorder("<"))
    data = tensor.get("data")
    if data is None:
        raise V2Error(422, "the input has neither 'data' nor a binary_data_size")
    try:
        flat = np.asarray(data, dtype=np.float64).reshape(-1)  # nested or flat, row-major
    except (ValueError, TypeError) as exc:
        raise V2Error(422, f"input data must be numbers: {exc}") from exc
    if flat.size != count:
        raise V2Error(422, f"input data has {flat.size} values; shape needs {count}")
    return flat


def model_metadata(name: str, version: int, spec: dict[str, Any]) -> dict[str, Any]:
    outputs = [{"name": "predictions", "datatype": prediction_dtype(spec), "shape": [-1]}]
    if spec["task"] == "classification":
        outputs.append(
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(spec["classes"])]}
        )
    return {
        "name": name,
        "versions": [str(version)],
        "platform": "kiln-pytorch",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, spec["num_features"]]}],
        "outputs": outputs,
    }


def prediction_dtype(spec: dict[str, Any]) -> str:
    if spec["task"] == "classification":
        return "INT64" if all(isinstance(c, int) for c in spec["classes"]) else "BYTES"
    return "FP32"


def requested_outputs(body: dict[str, Any], spec: dict[str, Any]) -> list[tuple[str, bool]]:
    """(name, binary) of each output to return; all outputs as JSON when none are named."""
    known = [o["name"] for o in model_metadata("", 0, spec)["outputs"]]
    asked = body.get("outputs")
    if not asked:
        return [(name, False) for name in known]
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise V2Error(422, "'outputs' must be a list of objects with a 'name'")
    chosen = []
    for output in asked:
        if output.get("name") not in known:
            raise V2Error(
                422, f"unknown output {output.get('name')!r}; this model has {', '.join(known)}"
            )
        chosen.append((output["name"], bool((output.get("parameters") or {}).get("binary_data"))))
    return chosen


def build_response(
    name: str,
    version: int,
    request_id: str,
    arrays: dict[str, np.ndarray],
    wanted: list[tuple[str, bool]],
    spec: dict[str, Any],
) -> tuple[bytes, str | None]:
    """The response body, and the JSON header length when binary outputs follow it."""
    outputs, tails = [], []
    for output_name, binary in wanted:
        array = arrays[output_name]
        datatype = "FP32" if output_name == "probabilities" else prediction_dtype(spec)
        entry: dict[str, Any] = {
            "name": output_name,
            "datatype": datatype,
            "shape": list(array.shape),
        }
        if binary and datatype != "BYTES":
            raw = np.ascontiguousarray(
                array, dtype=np.dtype(DTYPES[datatype]).newbyteorder("<")
            ).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    header = json.dumps(
        {"model_name": name, "model_version": str(version), "id": request_id, "outputs": outputs}
    ).encode()
    if not tails:
        return header, None
    return header + b"".join(tails), str(len(header))
