"""How a failed request answers, and how the routes document it in /openapi.json.

Every 4xx (and the 503s) is `{"error": "..."}` (`ErrorBody`): an `HTTPException` from a route
or dependency, a body that fails validation, or a `RequestError` from the model host.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.schemas import ErrorBody, RequestError

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}


MAX_ERROR_CHARS = 1000
"""A last bound on any error message (each quoted value is already cut at 64 characters)."""


def bounded(message: str) -> str:
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "…"


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        {"error": bounded(str(exc.detail))}, status_code=exc.status_code, headers=exc.headers
    )


async def request_error(_: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": bounded(str(exc))}, status_code=exc.status)


async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
    where = ".".join(str(p)[:64] for p in first.get("loc", ())) or "body"
    return JSONResponse({"error": bounded(f"{where}: {first['msg']}")}, status_code=422)


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
