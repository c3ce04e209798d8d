"""Hostile input, as an attacker sends it: a table of bodies and headers against the V1 and
V2 routes, each answered 4xx with `{"error": "..."}` that quotes the input only briefly.

Real replicas (tests/serving/test_tabular_serving.py: `churn` trained on a table, `renewal`
with an integer input, `old` without recorded inputs) behind the real routes; no Ray. Every
route Kiln adds joins this table and tests/serving/test_fuzz.py.
"""

from __future__ import annotations

import json

import pytest

from tests.serving.test_routes import no_overrides_left  # noqa: F401 (autouse fixture)
from tests.serving.test_tabular_serving import client, replicas  # noqa: F401 (fixtures)

DEEP = b"[" * 100_000 + b"]" * 100_000  # 200 KB
LONG = "m" * 5000
ROW4 = [0.1, 0.2, 0.3, 0.4]
OLD_V1, CHURN_V1 = "/v1/models/old:predict", "/v1/models/churn:predict"
OLD_V2, RENEWAL_V2 = "/v2/models/old/infer", "/v2/models/renewal/infer"


def v2_features(datatype: str, data: list, shape: list | None = None) -> bytes:
    tensor = {"name": "features", "datatype": datatype, "shape": shape or [1, 4], "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


def v2_tier(data: list, datatype: str = "INT64") -> bytes:
    tensor = {"name": "tier", "datatype": datatype, "shape": [len(data)], "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


HOSTILE = [
    # (id, path, body, headers, status, fragment of the error)
    ("v1 nested 100,000 deep", OLD_V1, b'{"instances": ' + DEEP + b"}", {}, 400, "nested deeper"),
    ("v1 nested 65 deep", OLD_V1, b"[" * 65 + b"]" * 65, {}, 400, "deeper than 64 levels"),
    ("v2 nested 100,000 deep", OLD_V2, b'{"inputs": ' + DEEP + b"}", {}, 400, "nested deeper"),
    (
        "v2 binary header nested deep",
        OLD_V2,
        b"[" * 70 + b"]" * 70 + b"\x00\x00",
        {"Inference-Header-Content-Length": "140"},
        400,
        "nested deeper",
    ),
    ("v1 booleans as numbers", OLD_V1, json.dumps({"instances": [[True, 0.2, 0.3, False]]}), {},
     422, "holds a boolean"),
    ("v1 all booleans", OLD_V1, json.dumps({"instances": [[True] * 4]}), {}, 422, "boolean"),
    ("v1 boolean for a number input", CHURN_V1, json.dumps({"instances": [{"age": True}]}), {},
     422, '"age" takes a number; got True'),
    ("v2 INT64 past its range", OLD_V2, v2_features("INT64", [99999999999999999999999, 1, 2, 3]),
     {}, 422, "INT64 data must be within [-9223372036854775808, 9223372036854775807]"),
    ("v2 INT32 past its range", OLD_V2, v2_features("INT32", [3_000_000_000, 1, 2, 3]), {}, 422,
     "INT32 data must be within [-2147483648, 2147483647]"),
    ("v2 INT64 fractions", OLD_V2, v2_features("INT64", [1.5, 1, 2, 3]), {}, 422,
     "INT64 data must be integers"),
    ("v2 FP32 booleans", OLD_V2, v2_features("FP32", [True, False, True, False]), {}, 422,
     "JSON true and false are not"),
    ("v2 FP32 a boolean among floats", OLD_V2, v2_features("FP32", [True, 1.5, 2.5, 3.5]), {},
     422, "JSON true and false are not"),
    ("v2 named INT64 past its range", RENEWAL_V2, v2_tier([99999999999999999999999]), {}, 422,
     "INT64: integers within"),
    ("v2 named INT64 a fraction", RENEWAL_V2, v2_tier([2.5]), {}, 422, "is INT64; got 2.5"),
    ("v1 5,000-character model name", f"/v1/models/{LONG}:predict",
     json.dumps({"instances": [ROW4]}), {}, 404, "is not served here"),
    ("v2 5,000-character model name", f"/v2/models/{LONG}/infer", v2_features("FP32", ROW4), {},
     404, "is not served here"),
    ("v2 5,000-character version", f"/v2/models/old/versions/{LONG}/infer",
     v2_features("FP32", ROW4), {}, 404, "is not a number"),
    ("v2 5,000-character input name", OLD_V2,
     json.dumps({"inputs": [{"name": LONG, "datatype": "FP32", "shape": [1, 4], "data": ROW4}]}),
     {}, 422, "unknown input"),
    ("v2 5,000-character datatype", OLD_V2, v2_features(LONG, ROW4), {}, 422, "not supported"),
    ("v1 5,000-character key", CHURN_V1, json.dumps({"instances": [{LONG: 1}]}), {}, 422,
     "unknown input"),
    ("v1 5,000-character category for a number", CHURN_V1,
     json.dumps({"instances": [{"age": LONG}]}), {}, 422, "takes a number"),
    ("v2 header length not a number", OLD_V2, v2_features("FP32", ROW4),
     {"Inference-Header-Content-Length": LONG[:300]}, 400, "does not fit the body"),
    ("v2 header length negative", OLD_V2, v2_features("FP32", ROW4),
     {"Inference-Header-Content-Length": "-5"}, 400, "does not fit the body"),
    ("v1 1e400", OLD_V1, b'{"instances": [[1e400, 1, 2, 3]]}', {}, 422, "NaN or Inf"),
    ("v1 10**400", CHURN_V1, b'{"instances": [{"age": 1' + b"0" * 400 + b"}]}", {}, 422,
     "too large"),
    ("v1 not UTF-8", OLD_V1, b'{"instances": [["\xff\xfe"]]}', {}, 400, "not valid JSON"),
    ("v1 empty body", OLD_V1, b"", {}, 400, "not valid JSON"),
    ("v1 a bare string", OLD_V1, b'"hello"', {}, 422, "body"),
]  # fmt: skip


@pytest.mark.parametrize(
    "path,body,headers,status,fragment", [case[1:] for case in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_input_gets_a_4xx_that_quotes_it_briefly(
    client,  # noqa: F811
    path,
    body,
    headers,
    status,
    fragment,
):
    content = body.encode() if isinstance(body, str) else body
    reply = client.post(
        path, content=content, headers={"content-type": "application/json", **headers}
    )
    assert reply.status_code == status, reply.text[:300]
    answer = reply.json()
    assert list(answer) == ["error"] and fragment in answer["error"], answer
    assert len(answer["error"]) < 600  # the 5,000-character values are quoted cut short
    assert LONG not in answer["error"]


def test_a_string_may_hold_any_brackets_and_quotes(client):  # noqa: F811
    """Depth counts arrays and objects, not brackets inside strings (escaped quotes too)."""
    city = '\\"' + "[" * 200 + "{" * 200
    body = '{"instances": [{"age": 31, "city": "' + city + '", "plan": "pro"}]}'
    reply = client.post(CHURN_V1, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 200, reply.text[:300]
    assert reply.json()["predictions"] == ["yes"]  # an unknown city: other; pro: yes


def test_64_levels_are_allowed(client):  # noqa: F811
    """The limit is on depth, not on the count of brackets: 64 levels still parse."""
    nested = b'{"instances": [[' + b"[" * 61 + b"1" + b"]" * 61 + b"]]}"
    reply = client.post(OLD_V1, content=nested, headers={"content-type": "application/json"})
    assert reply.status_code == 422  # parsed (64 levels), then refused as not a row of numbers
    assert "nested" not in reply.json()["error"]
