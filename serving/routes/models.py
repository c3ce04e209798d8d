"""V1 routes (TF-Serving / KServe V1 style): list models, describe one, predict with it."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from kiln.serving.dependencies import AuthDep, Authorized, BearerDep, HostDep
from kiln.serving.errors import ERROR_RESPONSES
from kiln.serving.host import logged_failures, parse_rows
from kiln.serving.ids import request_id
from kiln.serving.jsonbody import may_hold_booleans, parse_json
from kiln.serving.schemas import ModelInfo, ModelList, OpenAIModel, PredictRequest, PredictResponse

router = APIRouter()


async def read_json_body(request: Request, max_body_bytes: int) -> tuple[Any, bool]:
    """The parsed body and whether it may hold booleans; 413 past the size limit, 400 for
    malformed JSON or JSON nested too deep (serving/jsonbody.py)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body_bytes:
        raise HTTPException(413, f"request body is {declared} bytes; the limit is {max_body_bytes}")
    raw = await request.body()
    if len(raw) > max_body_bytes:
        raise HTTPException(413, f"request body is {len(raw)} bytes; the limit is {max_body_bytes}")
    return parse_json(raw), may_hold_booleans(raw)


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(host: HostDep, auth: AuthDep, credentials: BearerDep) -> ModelList:
    """The served versions this key may predict with (all of them when auth is off)."""
    served = host.served
    replicas = served.replicas
    records = {k: r.record for k, r in {**replicas, **served.language}.items()}
    allowed = set(records)
    if auth is not None:
        check = await auth.authenticate(credentials.credentials if credentials else None)
        allowed = {k for k, record in records.items() if check.allows("predict", record.name)}
    data = {
        records[k].name: OpenAIModel(id=records[k].name, created=int(records[k].created_at))
        for k in sorted(allowed)
    }
    return ModelList(
        models=[host.info(key) for key in sorted(allowed) if key in replicas],
        data=list(data.values()),
    )


@router.get("/v1/models/{name}", response_model=ModelInfo, responses=ERROR_RESPONSES)
async def model_info(name: str, host: HostDep, _: Authorized) -> ModelInfo:
    key, _replica = host.replica_for(name)
    return host.info(key)


@router.post(
    "/v1/models/{name}:predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
        }
    },
)
async def predict(name: str, request: Request, host: HostDep, _: Authorized) -> Response:
    # Auth first (the Authorized dependency): a caller without a key learns nothing, not even
    # which models exist.
    started = time.perf_counter()
    key, replica = host.replica_for(name, request.headers.get(host.args.sticky_header))
    log_id = request_id()
    with logged_failures(host, key, log_id, started):
        payload, booleans = await read_json_body(request, host.args.max_body_bytes)
        try:
            body = PredictRequest.model_validate(payload)
        except ValueError as exc:
            raise RequestValidationError(exc.errors()) from exc  # type: ignore[attr-defined]
        x = parse_rows(body, replica, host.args.max_instances, booleans)
        outputs = await host.forward(key, x)
    result = replica.format(outputs, probabilities=body.return_ == "probabilities")
    host.log_request(key, log_id, started, x, outputs)
    reply = PredictResponse(
        **result,
        model=replica.record.name,
        model_version=replica.record.version,
        ids=[f"{log_id}-{i}" for i in range(len(x))],
    )
    # Serialised here, once: FastAPI would validate and encode the model again.
    return Response(reply.model_dump_json(exclude_none=True), media_type="application/json")
