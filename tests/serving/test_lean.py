"""The lean predict path (serving/lean.py) answers exactly as the full FastAPI routes do.

A query string sends a predict request through the full app (the lean path takes none), so
every request here is sent both ways and the answers compared: status, error body, and for a
success the same predictions. Real replicas of the table tests behind the real app; no Ray.
"""

from __future__ import annotations

import json

import pytest

from kiln.actors.keys import KeyCheck
from kiln.serving import lean
from kiln.serving.auth import BearerAuth
from kiln.serving.lean import bearer_secret, lean_route
from tests.serving.test_hostile import HOSTILE
from tests.serving.test_routes import client_for, no_overrides_left  # noqa: F401
from tests.serving.test_tabular_serving import client, replicas  # noqa: F401 (fixtures)

ROW4 = [0.1, 0.2, 0.3, 0.4]


@pytest.mark.parametrize(
    "path,route",
    [
        ("/v1/models/m:predict", ("v1", "m", None)),
        ("/v1/models/m@production:predict", ("v1", "m@production", None)),
        ("/v1/models/a:predict:predict", ("v1", "a:predict", None)),
        ("/v1/models/:predict", None),
        ("/v1/models/a/b:predict", None),
        ("/v1/models/m", None),
        ("/v2/models/m/infer", ("v2", "m", None)),
        ("/v2/models/m/versions/3/infer", ("v2", "m", "3")),
        ("/v2/models/m/versions/x/infer", ("v2", "m", "x")),
        ("/v2/models/m/versions//infer", None),
        ("/v2/models//infer", None),
        ("/v2/models/a/b/infer", None),
        ("/v2/models/m/ready", None),
    ],
)
def test_lean_routes_match_as_the_app_routes_do(path, route):
    assert lean_route(path) == route


@pytest.mark.parametrize(
    "header,secret",
    [
        (None, None),
        ("", None),
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
    ],
)
def test_the_bearer_secret_is_read_as_fastapi_reads_it(header, secret):
    assert bearer_secret({} if header is None else {"authorization": header}) == secret


def both_ways(client, path, content, headers):  # noqa: F811
    """(lean answer, full-app answer) of one request."""
    headers = {"content-type": "application/json", **headers}
    return (
        client.post(path, content=content, headers=headers),
        client.post(path + "?via=full", content=content, headers=headers),
    )


@pytest.mark.parametrize(
    "path,body,headers,status", [c[1:5] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_input_answers_the_same_on_both_paths(client, path, body, headers, status):  # noqa: F811
    content = body.encode() if isinstance(body, str) else body
    fast, full = both_ways(client, path, content, headers)
    assert fast.status_code == full.status_code == status
    assert fast.json() == full.json()


GOOD = [
    ("/v1/models/old:predict", {"instances": [ROW4, ROW4]}),
    ("/v1/models/old:predict", {"instances": [ROW4], "return": "probabilities"}),
    ("/v1/models/churn:predict", {"instances": [{"age": 40, "plan": "pro"}]}),
    ("/v1/models/price:predict", {"instances": [ROW4]}),
    ("/v1/models/old:predict", {"instances": [ROW4], "return": "nope"}),
    ("/v1/models/old:predict", {"instances": "x"}),
    ("/v1/models/old:predict", {"instances": []}),
    ("/v1/models/nobody:predict", {"instances": [ROW4]}),
    ("/v2/models/old/infer", {"inputs": [{"name": "features", "datatype": "FP32",
                                          "shape": [1, 4], "data": ROW4}]}),
    ("/v2/models/old/versions/1/infer", {"inputs": [{"name": "features", "datatype": "FP64",
                                                     "shape": [1, 4], "data": ROW4}]}),
    ("/v2/models/old/versions/9/infer", {"inputs": []}),
]  # fmt: skip


@pytest.mark.parametrize("path,body", GOOD)
def test_answers_match_the_full_routes(client, path, body):  # noqa: F811
    fast, full = both_ways(client, path, json.dumps(body).encode(), {})
    assert fast.status_code == full.status_code
    a, b = fast.json(), full.json()
    for answer in (a, b):  # the ids differ per request
        answer.pop("ids", None), answer.pop("id", None), answer.pop("parameters", None)
    assert a == b


def test_the_lean_path_answers_predict(client, monkeypatch):  # noqa: F811
    seen = []
    original = lean.v1_predict

    async def counted(*args, **kwargs):
        seen.append(1)
        return await original(*args, **kwargs)

    monkeypatch.setattr(lean, "v1_predict", counted)
    reply = client.post("/v1/models/old:predict", json={"instances": [ROW4]})
    assert reply.status_code == 200 and len(reply.json()["predictions"]) == 1
    client.post("/v1/models/old:predict?full=1", json={"instances": [ROW4]})
    assert seen == [1]


class Registry:
    def __init__(self, check: KeyCheck) -> None:
        self.check = check

    async def __call__(self, secret: str) -> KeyCheck:
        return self.check


@pytest.mark.parametrize(
    "headers,status",
    [
        ({}, 401),
        ({"authorization": "Bearer garbage"}, 401),
        ({"authorization": "Basic kiln_0123456789ab_secret"}, 401),
        ({"authorization": "Bearer kiln_0123456789ab_secret"}, 403),
    ],
)
def test_auth_answers_the_same_on_both_paths(client, headers, status):  # noqa: F811
    check = KeyCheck(ok=True, reason="ok", key_id="0123456789ab", scopes=("predict:other",))
    host = client.app.dependency_overrides  # the fixture's host, through its override
    import asyncio

    from kiln.serving.dependencies import get_host

    the_host = asyncio.run(host[get_host]())
    authed = client_for(the_host, BearerAuth(Registry(check)))
    body = json.dumps({"instances": [ROW4]}).encode()
    for path in ("/v1/models/old:predict", "/v2/models/old/infer"):
        fast, full = both_ways(authed, path, body, headers)
        assert fast.status_code == full.status_code == status
        assert fast.json() == full.json()
        assert fast.headers.get("www-authenticate") == full.headers.get("www-authenticate")
