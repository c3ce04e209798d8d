"""How a failed request answers, and how the routes document it in /openapi.json.

Every 4xx (and the 503s) is `{"error": "..."}` (`ErrorBody`): an `HTTPException` from a route
or dependency, a body that fails validation, or a `RequestError` from the model host.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import ray.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.serving.schemas import ErrorBody, RequestError

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}


logger = logging.getLogger(__name__)

RETRY_AFTER_S = 2
"""What a 503 for a restarting actor tells the caller to wait (the `Retry-After` header)."""

MAX_ERROR_CHARS = 1000
"""A last bound on any error message (each quoted value is already cut at 64 characters)."""


def bounded(message: str) -> str:
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "…"


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        {"error": bounded(str(exc.detail))}, status_code=exc.status_code, headers=exc.headers
    )


async def request_error(_: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": bounded(str(exc))}, status_code=exc.status, headers=exc.headers)


async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
    where = ".".join(str(p)[:64] for p in first.get("loc", ())) or "body"
    return JSONResponse({"error": bounded(f"{where}: {first['msg']}")}, status_code=422)


def actor_failure(exc: BaseException, what: str) -> RequestError:
    """How a failed call to one of Kiln's actors (`what`: "the key registry", "the feedback
    store") answers, logged here with its cause.

    - restarting (`ActorUnavailableError`) or no answer in time: 503 with `Retry-After`; the
      same request may be sent again;
    - gone for good (`ActorDiedError`: killed for good, or every handle to it dropped): 503
      that names it and says no retry helps until the service is restarted, no `Retry-After`;
    - an error raised inside the actor (`RayTaskError`): 500, a bug of Kiln's, never a 503
      that invites endless retries.
    """
    if isinstance(exc, ray.exceptions.ActorUnavailableError | TimeoutError):
        logger.warning("%s is not answering (restarting?): %s", what, exc)
        return RequestError(
            503,
            f"{what} is restarting; send the same request again in a few seconds",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(exc, ray.exceptions.RayActorError):
        logger.error("%s has died: %s", what, exc)
        return RequestError(
            503,
            f"{what} has stopped and will not come back ({death_reason(exc)}); retrying will not "
            "help: restart the service (kiln serve)",
        )
    logger.error("%s failed: %s", what, exc, exc_info=exc)
    return RequestError(500, f"{what} failed: {type(exc).__name__}; see the replica's log")


def death_reason(exc: BaseException) -> str:
    """The sentence of Ray's actor-death message that says why ("The actor is dead because
    ..."), or its first line, cut short."""
    text = str(exc)
    found = re.search(r"The actor is dead because ([^.]*)", text)
    reason = found.group(1) if found else text.strip().splitlines()[0] if text.strip() else ""
    return (reason or type(exc).__name__)[:200]


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestError, request_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its local `$defs` references replaced by the definitions."""
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)  # type: ignore[no-any-return]
