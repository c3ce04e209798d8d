"""Open Inference Protocol V2 routes (KServe, Triton): server and model metadata, infer."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from kiln.actors.replica import ModelReplica
from kiln.serving import v2
from kiln.serving.dependencies import Authorized, HostDep
from kiln.serving.errors import ERROR_RESPONSES, inline_refs
from kiln.serving.host import ModelHost, logged_failures
from kiln.serving.ids import request_id
from kiln.serving.jsonbody import may_hold_booleans, shown
from kiln.serving.schemas import (
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
)

router = APIRouter(tags=["v2"])
Endpoint = TypeVar("Endpoint", bound=Callable[..., Coroutine[Any, Any, Any]])

# The infer routes read the raw body (binary tensors may follow the JSON): the schemas are
# declared for the docs only.
V2_INFER_DOCS: dict[str, Any] = {
    "response_model": V2InferResponse,
    "response_model_exclude_none": True,
    "responses": ERROR_RESPONSES,
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline_refs(V2InferRequest.model_json_schema())},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "The JSON request, then the binary tensors; "
                    "Inference-Header-Content-Length gives the JSON's length.",
                },
            },
        }
    },
}


def v2_replica(
    host: ModelHost, name: str, version: str | None, sticky_key: str | None = None
) -> tuple[str, ModelReplica]:
    if version is not None and not version.isdigit():
        raise HTTPException(404, f"version {shown(version)} is not a number")
    return host.replica_for(f"{name}@{version}" if version else name, sticky_key)


@router.get("/v2", response_model=V2ServerMetadata)
async def v2_server() -> dict[str, Any]:
    return {"name": "kiln", "version": "1", "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live", response_model=V2Live)
async def v2_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", response_model=V2Ready, responses=ERROR_RESPONSES)
async def v2_ready(host: HostDep) -> dict[str, bool]:
    if not host.served.replicas:
        raise HTTPException(503, "no model is loaded yet")
    return {"ready": True}


def model_route(method: str, suffix: str, **docs: Any) -> Callable[[Endpoint], Endpoint]:
    """Registers a model route twice: `/v2/models/{name}SUFFIX` and the form with a version."""

    def register(endpoint: Endpoint) -> Endpoint:
        for path in ("/v2/models/{name}/versions/{version}", "/v2/models/{name}"):
            router.add_api_route(path + suffix, endpoint, methods=[method], **docs)
        return endpoint

    return register


@model_route("GET", "", response_model=V2ModelMetadata, responses=ERROR_RESPONSES)
async def v2_metadata(
    name: str, host: HostDep, _: Authorized, version: str | None = None
) -> dict[str, Any]:
    _key, replica = v2_replica(host, name, version)
    return v2.model_metadata(
        replica.record.name, replica.record.version, replica.spec, replica.platform
    )


@model_route("GET", "/config", responses=ERROR_RESPONSES)
async def v2_model_config(
    name: str, host: HostDep, _: Authorized, version: str | None = None
) -> dict[str, Any]:
    """Triton's model configuration extension, as far as Kiln has one: the inputs and
    outputs, and the batching (chosen from the model's latency profile unless given:
    serving/batching.py)."""
    key, replica = v2_replica(host, name, version)
    return model_config(host, key, replica)


def triton_config_tensors(tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """V2 metadata tensors as Triton's config lists them: TYPE_ names (BYTES is TYPE_STRING)
    and dims without the batch dimension (max_batch_size > 0 says it is there)."""
    return [
        {
            "name": t["name"],
            "data_type": "TYPE_STRING" if t["datatype"] == "BYTES" else f"TYPE_{t['datatype']}",
            "dims": t["shape"][1:],
        }
        for t in tensors
    ]


def model_config(host: ModelHost, key: str, replica: Any) -> dict[str, Any]:
    """The configuration `GET .../config` and gRPC's ModelConfig answer with (Triton's JSON)."""
    batching = host.batching_of(key)
    meta = v2.model_metadata(
        replica.record.name, replica.record.version, replica.spec, replica.platform
    )
    return {
        "name": replica.record.name,
        "version": str(replica.record.version),
        "platform": replica.platform,
        "max_batch_size": batching.max_batch_size,
        "input": triton_config_tensors(meta["inputs"]),
        "output": triton_config_tensors(meta["outputs"]),
        "dynamic_batching": {
            "max_queue_delay_microseconds": round(batching.batch_wait_timeout_s * 1e6)
        },
        "parameters": {"batching": batching.to_dict()},
    }


@model_route("GET", "/ready", response_model=V2ModelReady, responses=ERROR_RESPONSES)
async def v2_model_ready(
    name: str, host: HostDep, _: Authorized, version: str | None = None
) -> dict[str, Any]:
    _key, replica = v2_replica(host, name, version)
    return {"name": replica.record.name, "ready": True}


async def answer_v2_infer(
    host: ModelHost,
    key: str,
    replica: ModelReplica,
    read_body: Callable[[], Coroutine[Any, Any, bytes]] | None,
    header_length: str | None,
    started: float,
    parsed: tuple[dict[str, Any], bytes, int] | None = None,
    respond: Callable[..., Any] = v2.build_response,
) -> Any:
    """One V2 infer request's body -> (response body, its JSON header's length when binary):
    size check, parse, forward, log and build, shared by this route and serving/lean.py.

    gRPC (serving/grpc_v2.py) hands the request already `parsed` (its JSON header as a dict,
    the binary tail, and the size the same request has as a V2 body) instead of `read_body`,
    and its own `respond`, which builds the response proto from the same arguments as
    `v2.build_response`."""
    log_id = request_id()
    with logged_failures(host, key, log_id, started):
        if parsed is None:
            assert read_body is not None
            raw = await read_body()
            size, booleans = len(raw), may_hold_booleans(raw)
        else:
            size, booleans = parsed[2], True
        if size > host.args.max_body_bytes:
            raise HTTPException(
                413, f"request body is {size} bytes; the limit is {host.args.max_body_bytes}"
            )
        # A malformed request raises v2.V2Error, which answers with its 4xx (serving/errors.py).
        body, tail = v2.split_body(raw, header_length) if parsed is None else parsed[:2]
        x = v2.parse_infer_request(
            body,
            tail,
            replica.num_inputs,
            host.args.max_instances,
            replica.encoding,
            booleans=booleans,
        )
        wanted = v2.requested_outputs(body, replica.spec)
        outputs = await host.forward(key, x)
    host.log_request(key, log_id, started, x, outputs)
    result = replica.format(outputs, probabilities=True)
    arrays = {"predictions": np.asarray(result["predictions"])}
    if "probabilities" in result:
        arrays["probabilities"] = np.asarray(result["probabilities"], dtype=np.float32)
    return respond(
        replica.record.name,
        replica.record.version,
        str(body.get("id") or request_id()),
        arrays,
        wanted,
        replica.spec,
        {"prediction_ids": [f"{log_id}-{i}" for i in range(len(x))]},
    )


@model_route("POST", "/infer", **V2_INFER_DOCS)
async def v2_infer(
    name: str, request: Request, host: HostDep, _: Authorized, version: str | None = None
) -> Response:
    started = time.perf_counter()
    key, replica = v2_replica(host, name, version, request.headers.get(host.args.sticky_header))
    content, header_length = await answer_v2_infer(
        host, key, replica, request.body, request.headers.get(v2.HEADER_LENGTH), started
    )
    headers = {v2.HEADER_LENGTH: header_length} if header_length else None
    media = "application/octet-stream" if header_length else "application/json"
    return Response(content, media_type=media, headers=headers)
