"""The lean predict path: V1 `:predict` and V2 `infer` without FastAPI's routing and dependencies.

A pure ASGI middleware in front of the FastAPI app (serving/app.py). A POST to
`/v1/models/{name}:predict`, `/v2/models/{name}/infer` or
`/v2/models/{name}/versions/{version}/infer` (no query string) is answered here; anything
else, and any request whose form this path does not read itself, goes to the full app, which
keeps the OpenAPI schema, the other routes and every rare case.

What a request costs here, and no more (docs/design-notes.md has the measured split):
  - the auth decision from the replica's key cache (serving/auth.py) and the rate limit, as
    the routes' `Authorized` dependency takes it, with the same 401/403/429;
  - the body read straight from the ASGI messages and parsed with orjson (serving/jsonbody.py)
    straight into one numpy array (serving/host.py `numeric_rows`), the schema checked on the
    parsed values without a pydantic object per request or row;
  - one forward pass (inline or through the batch queue), the metrics and the prediction log
    (ModelHost.log_request), and one response body serialised once by orjson.
Errors answer through serving/errors.py's handlers, so the status codes and `{"error": ...}`
bodies are the full app's (the hostile-input table and the fuzz run through this path).
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from typing import Any

import orjson
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from kiln.serving import v2
from kiln.serving.auth import BearerAuth
from kiln.serving.dependencies import check_predict_key, get_auth, get_host
from kiln.serving.errors import http_error, request_error, validation_error
from kiln.serving.host import ModelHost, logged_failures, parse_instances
from kiln.serving.ids import request_id
from kiln.serving.jsonbody import may_hold_booleans, parse_json
from kiln.serving.routes.inference import answer_v2_infer, v2_replica
from kiln.serving.schemas import PredictRequest, RequestError

V1_PREFIX, V1_SUFFIX = "/v1/models/", ":predict"
V2_PREFIX, V2_SUFFIX, V2_VERSIONS = "/v2/models/", "/infer", "/versions/"
JSON_HEADERS = [(b"content-type", b"application/json")]
RETURNS = ("predictions", "probabilities")
BRIDGE_PREFIX = "/v2/grpc/"
"""Where the native gRPC front (serving/native/) posts a call's message: + the method's name."""
BRIDGE_TOKEN_HEADER = "x-kiln-front"

logger = logging.getLogger(__name__)


def lean_route(path: str) -> tuple[str, str, str | None] | None:
    """("v1" | "v2", model name, version or None) for a path this module answers, else None.
    Matches as Starlette's routes do: a `{name}` or `{version}` is one or more characters
    other than `/`, and `{name}:predict` takes the last `:predict`."""
    if path.startswith(V1_PREFIX) and path.endswith(V1_SUFFIX):
        name = path[len(V1_PREFIX) : -len(V1_SUFFIX)]
        if name and "/" not in name:
            return "v1", name, None
        return None
    if path.startswith(V2_PREFIX) and path.endswith(V2_SUFFIX):
        rest = path[len(V2_PREFIX) : -len(V2_SUFFIX)]
        name, sep, version = rest.partition(V2_VERSIONS)
        if not name or "/" in name:
            return None
        if not sep:
            return "v2", name, None
        if version and "/" not in version:
            return "v2", name, version
    return None


class LeanPredict:
    """ASGI middleware: the predict routes answered here, the rest by `app` (see the module)."""

    def __init__(
        self, app: ASGIApp, api: FastAPI, outermost: bool = False, bridge: Any = None
    ) -> None:
        self.app = app
        self.api = api
        """The FastAPI app: its dependency overrides (route tests) give the host and auth."""
        self.outermost = outermost
        """In front of the whole FastAPI app (the direct ingress, serving/direct.py) rather
        than inside its middleware stack: a predict request then skips Starlette's error,
        telemetry and body-limit middleware (6% of the light model's replica CPU at c64,
        py-spy), and an error no handler maps answers 500 `{"error": ...}` here, as
        Starlette's ServerErrorMiddleware would (with its plain-text body) inside."""
        self.bridge = bridge
        """The replica's GrpcBridge (serving/grpc_v2.py) where a native gRPC front hands it
        calls: a POST to BRIDGE_PREFIX with its token is answered by it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        if scope["type"] == "http" and scope["method"] == "POST" and not scope["query_string"]:
            if self.bridge is not None and scope["path"].startswith(BRIDGE_PREFIX):
                if await self.bridged(scope, receive, send):
                    return
            route = lean_route(scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        kind, name, version = route
        # The first of repeated headers counts, as in Starlette's `Headers.get`.
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}
        try:
            host, auth = await self.dependencies()
            if kind == "v1":
                status, body, extra = await v1_predict(host, auth, name, headers, receive)
            else:
                status, body, extra = await v2_infer(host, auth, name, version, headers, receive)
        except StarletteHTTPException as exc:
            await (await http_error(None, exc))(scope, receive, send)  # type: ignore[arg-type]
            return
        except RequestError as exc:
            await (await request_error(None, exc))(scope, receive, send)  # type: ignore[arg-type]
            return
        except RequestValidationError as exc:
            await (await validation_error(None, exc))(scope, receive, send)  # type: ignore[arg-type]
            return
        except ClientDisconnect:
            if not self.outermost:
                raise
            return  # nobody to answer
        except Exception:
            if not self.outermost:
                raise
            logger.exception("predict request %s failed", scope["path"])
            status, body, extra = 500, b'{"error":"internal error"}', JSON_HEADERS
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *extra],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def bridged(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer a gRPC call the native front handed over; False: not one (no token)."""
        pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        if not self.bridge.owns(dict(reversed(pairs))):
            return False
        try:
            body = await read_body(receive)
        except ClientDisconnect:
            return True
        method = scope["path"][len(BRIDGE_PREFIX) :]
        status, message, payload = await self.bridge.answer(method, pairs, body)
        headers = [
            (b"content-length", str(len(payload)).encode()),
            *bridge_headers(status, message),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        return True

    async def dependencies(self) -> tuple[ModelHost, BearerAuth | None]:
        overrides = self.api.dependency_overrides
        host = await overrides.get(get_host, get_host)()
        auth = await overrides.get(get_auth, get_auth)()
        return host, auth


def bearer_secret(headers: dict[str, str]) -> str | None:
    """The secret of an `Authorization: Bearer` header, as FastAPI's HTTPBearer reads it."""
    authorization = headers.get("authorization")
    if not authorization:
        return None
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if not scheme or not secret or scheme.lower() != "bearer":
        return None
    return secret


async def read_body(receive: Receive) -> bytes:
    """The whole request body from the ASGI messages (Starlette's `Request.body`)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def v1_predict(
    host: ModelHost,
    auth: BearerAuth | None,
    name: str,
    headers: dict[str, str],
    receive: Receive,
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """serving/routes/models.py `predict`, step for step, without the framework."""
    if auth is not None:
        await check_predict_key(name, host, auth, bearer_secret(headers))
    started = time.perf_counter()
    key, replica = host.replica_for(name, headers.get(host.args.sticky_header.lower()))
    log_id = request_id()
    with logged_failures(host, key, log_id, started):
        limit = host.args.max_body_bytes
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"request body is {declared} bytes; the limit is {limit}")
        raw = await read_body(receive)
        if len(raw) > limit:
            raise HTTPException(413, f"request body is {len(raw)} bytes; the limit is {limit}")
        payload = parse_json(raw)
        instances, returns = predict_fields(payload)
        x = parse_instances(instances, replica, host.args.max_instances, may_hold_booleans(raw))
        outputs = await host.forward(key, x)
    result = replica.format(outputs, probabilities=returns == "probabilities")
    host.log_request(key, log_id, started, x, outputs)
    reply = {
        "predictions": result["predictions"],
        **({"probabilities": result["probabilities"]} if "probabilities" in result else {}),
        "model": replica.record.name,
        "model_version": replica.record.version,
        "ids": [f"{log_id}-{i}" for i in range(len(x))],
    }
    return 200, orjson.dumps(reply, option=orjson.OPT_SERIALIZE_NUMPY), JSON_HEADERS


def predict_fields(payload: Any) -> tuple[list[Any], str]:
    """`instances` and `return` of a V1 body. The common shape is checked here on the parsed
    values; anything else goes through PredictRequest, whose error the route answers with."""
    if type(payload) is dict:
        instances = payload.get("instances")
        returns = payload.get("return", "predictions")
        if type(instances) is list and type(returns) is str and returns in RETURNS:
            return instances, returns
    try:
        body = PredictRequest.model_validate(payload)
    except ValueError as exc:
        raise RequestValidationError(exc.errors()) from exc  # type: ignore[attr-defined]
    return body.instances, body.return_


async def v2_infer(
    host: ModelHost,
    auth: BearerAuth | None,
    name: str,
    version: str | None,
    headers: dict[str, str],
    receive: Receive,
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """serving/routes/inference.py `v2_infer`, step for step, without the framework."""
    if auth is not None:
        await check_predict_key(name, host, auth, bearer_secret(headers))
    started = time.perf_counter()
    key, replica = v2_replica(host, name, version, headers.get(host.args.sticky_header.lower()))
    content, header_length = await answer_v2_infer(
        host, key, replica, lambda: read_body(receive), headers.get(v2.HEADER_LENGTH), started
    )
    if header_length:
        extra = [
            (b"content-type", b"application/octet-stream"),
            (v2.HEADER_LENGTH.encode(), header_length.encode()),
        ]
        return 200, content, extra
    return 200, content, JSON_HEADERS


def bridge_headers(status: int, message: str) -> list[tuple[bytes, bytes]]:
    """The bridge's answer headers: the gRPC status, and its message percent-encoded (as gRPC
    sends it; the front decodes it)."""
    quoted = urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[]^_`{|}~")
    return [(b"grpc-status", str(status).encode()), (b"grpc-message", quoted.encode())]
