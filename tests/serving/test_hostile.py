"""Hostile input, as an attacker sends it: a table of bodies and headers against the V1 and
V2 routes, each answered 4xx with `{"error": "..."}` that quotes the input only briefly.

Real replicas (tests/serving/test_tabular_serving.py: `churn` trained on a table, `renewal`
with an integer input, `old` without recorded inputs) behind the real routes; no Ray. Every
route Kiln adds joins this table and tests/serving/test_fuzz.py. The OpenAI routes have their
own table (`LM_HOSTILE`, against a tiny trained language model), answered in OpenAI's shape.
"""

from __future__ import annotations

import json

import pytest

from tests.serving.lm_fixtures import language_replica  # noqa: F401 (a fixture)
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


# ---------------------------------------------------------------------------- the OpenAI routes

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def completion(**fields) -> str:
    return json.dumps({"model": "tiny-lm", "prompt": "kiln", **fields})


def chat(messages, **fields) -> str:
    return json.dumps({"model": "tiny-lm", "messages": messages, **fields})


LM_HOSTILE = [
    # (id, path, body, status, fragment of error.message, error.param)
    ("prompt nested 100,000 deep", COMPLETIONS, b'{"model": "tiny-lm", "prompt": ' + DEEP + b"}",
     400, "nested deeper", None),
    ("messages nested 100,000 deep", CHAT, b'{"model": "tiny-lm", "messages": ' + DEEP + b"}",
     400, "nested deeper", None),
    ("5,000-character role", CHAT, chat([{"role": LONG, "content": "hi"}]), 400, "unknown role",
     "messages.0.role"),
    ("5,000-character model", COMPLETIONS, json.dumps({"model": LONG, "prompt": "x"}), 400,
     "at most 200 characters", "model"),
    ("token id past 64 bits", COMPLETIONS, completion(prompt=[99999999999999999999999]), 400,
     "outside the model's vocabulary", "prompt"),
    ("negative token id", COMPLETIONS, completion(prompt=[-1]), 400, "outside the model's",
     "prompt"),
    ("booleans as token ids", COMPLETIONS, completion(prompt=[True, 5]), 400, "true/false",
     None),
    ("a boolean for max_tokens", COMPLETIONS, completion(max_tokens=True), 400,
     "max_tokens is true", None),
    ("a boolean for temperature", COMPLETIONS, completion(temperature=False), 400,
     "temperature is false", None),
    ("max_tokens 10**30", COMPLETIONS, completion(max_tokens=10**30), 400, "context is 64 tokens",
     "max_tokens"),
    ("temperature 1e400", COMPLETIONS, b'{"model": "tiny-lm", "prompt": "k", "temperature": 1e400}',
     400, "less than or equal to 2", "temperature"),
    ("n 1000", COMPLETIONS, completion(n=1000), 400, "less than or equal to 16", "n"),
    ("five stop strings", COMPLETIONS, completion(stop=["a"] * 5), 400, "at most 4", "stop"),
    ("logprobs 10**30", COMPLETIONS, completion(logprobs=10**30), 400, "less than or equal to 5",
     "logprobs"),
    ("a 50,000-character prompt", COMPLETIONS, completion(prompt=LONG * 10), 400,
     "context is 64 tokens", "max_tokens"),
    ("an image content part", CHAT, chat([{"role": "user", "content": [{"type": "image_url"}]}]),
     400, "only text content parts", "messages"),
    ("no messages", CHAT, chat([]), 400, "messages is empty", "messages"),
    ("messages a string", CHAT, chat("nope"), 400, "valid list", "messages"),
    ("a bare string", CHAT, b'"hello"', 400, "must be a JSON object", None),
    ("not UTF-8", CHAT, b'{"model": "tiny-lm", "messages": [["\xff\xfe"]]}', 400, "not valid JSON",
     None),
    ("an empty body", COMPLETIONS, b"", 400, "not valid JSON", None),
    ("echo", COMPLETIONS, completion(echo=True), 400, "echo is not supported", "echo"),
    ("an unknown model", COMPLETIONS, json.dumps({"model": "nosuch", "prompt": "x"}), 404,
     "does not exist", "model"),
]  # fmt: skip


@pytest.fixture
def lm_client(language_replica):  # noqa: F811
    from kiln.serving.host import ModelHost, Served
    from kiln.serving.routing import Router
    from kiln.serving.schemas import ServeArgs
    from tests.serving.test_routes import client_for

    host = ModelHost(ServeArgs(models=["tiny-lm"]), registry=None)
    router = Router()
    router.add(language_replica.record.ref, default=True)
    host.served = Served({}, router, {language_replica.record.ref: language_replica})
    return client_for(host)


@pytest.mark.parametrize(
    "path,body,status,fragment,param",
    [case[1:] for case in LM_HOSTILE],
    ids=[c[0] for c in LM_HOSTILE],
)
def test_hostile_input_to_the_openai_routes_gets_a_4xx_in_openai_shape(
    lm_client, path, body, status, fragment, param
):
    content = body.encode() if isinstance(body, str) else body
    reply = lm_client.post(path, content=content, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text[:300]
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"] and error["param"] == param, error
    assert len(error["message"]) < 600 and LONG not in error["message"]


def test_hostile_feedback_on_a_language_model_is_a_422(lm_client):
    bad = (([None], "is null"), ([[1, 2]], "is array"), (["x" * 200_000], "at most"))
    for labels, fragment in bad:
        reply = lm_client.post(
            "/v1/models/tiny-lm:feedback", json={"ids": ["cmpl-a"], "labels": labels}
        )
        assert reply.status_code == 422 and fragment in reply.json()["error"], reply.text[:300]
