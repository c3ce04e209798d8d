"""Open Inference Protocol V2 over gRPC: KServe/Triton's `inference.GRPCInferenceService`.

`kiln serve --grpc-port P` (9000 by default) answers on P. With the direct ingress (the
default on the embedded Ray, serving/direct.py) every replica opens P itself with
`DirectServicer` on a grpc.aio server; with `--ingress serve` Kiln opens Ray Serve's gRPC
ingress with
`add_inference_servicer` (below) as its servicer function. Serve's HAProxy forwards a call
to a replica's direct-ingress gRPC port; with one application it needs no `application`
metadata, so the stock `tritonclient.grpc` works unchanged. The replica calls the KilnServer
method named like the RPC (`/inference.GRPCInferenceService/ModelInfer` -> `ModelInfer`),
which hands over to the functions here.

A ModelInfer request is answered by the HTTP V2 path itself (serving/routes/inference.py
`answer_v2_infer`): the request proto is read as a V2 binary-extension request (its JSON
header as a dict and the tensors behind it, typed contents packed little-endian as raw ones
are), and the response proto is built from the same outputs as the V2 response (every
output binary, in `raw_output_contents`), as Triton answers. The same checks, forward
pass, prediction log and metrics run; the same key cache and scopes decide (metadata
`authorization: Bearer <key>`). HTTP statuses map to gRPC codes (`STATUS_CODES`): a
client's mistake is INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED or PERMISSION_DENIED, never
INTERNAL.

The messages are tritonclient's generated `service_pb2` (a superset of KServe's
grpc_predict_v2.proto, the same field numbers); only the methods in METHODS are registered,
so the rest of Triton's service answers UNIMPLEMENTED.

On the direct ingress gRPC itself is terminated by `kiln-grpc-front` where it is built
(serving/native/: C++, one process a replica, started by serving/direct.py `DirectGrpc`): it
hands each message's bytes to its replica over HTTP/1.1 on a Unix socket, and `GrpcBridge`
(below) answers them with the same functions. grpc.aio's own work was ~250 us of the
replica's core a call, more than everything Kiln does with one (docs/design-notes.md).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import orjson
import ray
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from kiln.serving import v2
from kiln.serving.auth import BearerAuth
from kiln.serving.dependencies import check_predict_key
from kiln.serving.host import ModelHost
from kiln.serving.jsonbody import shown
from kiln.serving.lean import BRIDGE_TOKEN_HEADER, bearer_secret
from kiln.serving.routes.inference import answer_v2_infer, v2_replica, v2_server
from kiln.serving.routes.inference import model_config as routes_model_config
from kiln.serving.schemas import RequestError

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
SERVICER = "kiln.serving.grpc_v2.add_inference_servicer"
"""The import path Serve's gRPCOptions takes (grpc_servicer_functions)."""
METHODS = (
    "ServerLive",
    "ServerReady",
    "ServerMetadata",
    "ModelReady",
    "ModelMetadata",
    "ModelConfig",
    "ModelInfer",
)

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
"""The gRPC code of each HTTP status Kiln answers with (anything else: INTERNAL)."""

# The typed field of InferTensorContents for each datatype, and the little-endian numpy
# type its values are packed as (the binary tensor extension's layout).
CONTENTS: dict[str, tuple[str, str]] = {
    "BOOL": ("bool_contents", "|b1"),
    "INT8": ("int_contents", "<i1"),
    "INT16": ("int_contents", "<i2"),
    "INT32": ("int_contents", "<i4"),
    "INT64": ("int64_contents", "<i8"),
    "UINT8": ("uint_contents", "<u1"),
    "UINT16": ("uint_contents", "<u2"),
    "UINT32": ("uint_contents", "<u4"),
    "UINT64": ("uint64_contents", "<u8"),
    "FP32": ("fp32_contents", "<f4"),
    "FP64": ("fp64_contents", "<f8"),
    "BYTES": ("bytes_contents", ""),
}


@functools.cache
def service_pb2() -> Any:
    """tritonclient's generated messages (imported when first needed: ~0.3 s; cached, as an
    import statement per call showed in the replica's profile)."""
    from tritonclient.grpc import service_pb2 as pb

    return pb


def bind_replica_grpc_like_http() -> None:
    """Bind this replica's direct-ingress gRPC server where its HTTP server binds.

    Serve 2.60's replica starts its gRPC server (the port HAProxy forwards gRPC calls to) on
    `[::]`, every interface, whatever HTTPOptions.host says, while its HTTP server binds that
    host: with `kiln serve`'s default host (127.0.0.1) gRPC would have opened ports to the
    network that HTTP keeps on loopback, and behind a TLS front a port in clear. Serve looks
    `default_impl.add_grpc_address` up when it starts the server, after this replica's
    constructor has run, so the constructor swaps in one that puts the HTTP host in place of
    `[::]`. HAProxy reaches a replica on its own node at the loopback address and one on
    another node at that node's IP, which is why a cluster sets a routable inner host
    (KILN_TLS_INNER_HOST). A wildcard HTTP host keeps Serve's own binding.
    """
    from ray.serve._private import default_impl
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    if getattr(default_impl.add_grpc_address, "kiln_host", None) is not None:
        return
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    host: str | None = ray.get(controller.get_http_config.remote()).host  # type: ignore[attr-defined]
    if not host or host in ("0.0.0.0", "::"):
        return
    bind_host = f"[{host}]" if ":" in host else host
    serve_add = default_impl.add_grpc_address

    def add_grpc_address(server: Any, address: str) -> None:
        if address.startswith("[::]:"):
            address = bind_host + address[len("[::]") :]
        serve_add(server, address)

    add_grpc_address.kiln_host = host  # type: ignore[attr-defined]
    default_impl.add_grpc_address = add_grpc_address


def add_inference_servicer(servicer: Any, server: Any, streaming: bool = False) -> None:
    """Serve's servicer function: registers METHODS of `inference.GRPCInferenceService`.
    Serve replaces each handler with its own (routing to the replica), keeping the request
    deserializer given here. `streaming` adds ModelStreamInfer (the direct ingress's
    servicer only: Serve's gRPC ingress is not tried with client streams)."""
    pb = service_pb2()
    handlers = {
        method: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method),
            request_deserializer=getattr(pb, f"{method}Request").FromString,
            response_serializer=getattr(pb, f"{method}Response").SerializeToString,
        )
        for method in METHODS
    }
    if streaming:
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            servicer.ModelStreamInfer,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class DirectServicer:
    """The RPCs for Kiln's direct gRPC ingress (serving/direct.py): grpc.aio hands every method
    the request and its context, and each answers for `kiln`, the replica's KilnServer."""

    def __init__(self, kiln: Any) -> None:
        self.kiln = kiln
        self.calls_in_flight = 0
        """ModelInfer calls begun and not yet answered (ModelHost.forward's batching)."""

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls_in_flight += 1
        try:
            return await model_infer(self.kiln.host, self.kiln.auth, request, context)
        finally:
            self.calls_in_flight -= 1

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await model_metadata(self.kiln.host, self.kiln.auth, request, context)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await model_ready(self.kiln.host, self.kiln.auth, request, context)

    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await model_config(self.kiln.host, self.kiln.auth, request, context)

    async def ModelStreamInfer(  # noqa: N802
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for response in model_stream_infer(self, requests, context):
            yield response

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return server_ready(self.kiln.host)

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802
        return server_live()

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await server_metadata()


class GrpcRefusal(Exception):
    """A call answered with a non-OK gRPC code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def refusal(exc: Exception) -> GrpcRefusal | None:
    """The gRPC answer to an error the HTTP path raises (None: not a client's error)."""
    if isinstance(exc, GrpcRefusal):
        return exc
    if isinstance(exc, HTTPException):
        status, message = exc.status_code, str(exc.detail)
    elif isinstance(exc, RequestError):
        status, message = exc.status, str(exc)
    elif isinstance(exc, RequestValidationError):
        status, message = 422, str(exc.errors()[0].get("msg", "invalid request"))
    else:
        return None
    return GrpcRefusal(STATUS_CODES.get(status, grpc.StatusCode.INTERNAL), message)


# ----------------------------------------------------------------------- request -> V2 body


def request_header(request: Any) -> tuple[dict[str, Any], bytes]:
    """A ModelInferRequest as the V2 binary extension reads it: (the JSON header as a dict,
    the tensors behind it). Every input travels as binary data: `raw_input_contents` as they
    are, typed `contents` packed little-endian; every output is asked for in binary."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise GrpcRefusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, or typed contents for every input",
        )
    inputs, tails = [], []
    for i, tensor in enumerate(request.inputs):
        data = raw[i] if raw else typed_bytes(tensor)
        inputs.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": {"binary_data_size": len(data)},
            }
        )
        tails.append(data)
    header: dict[str, Any] = {
        "inputs": inputs,
        "parameters": {"binary_data_output": True},
    }
    if request.id:
        header["id"] = request.id
    if request.outputs:
        header["outputs"] = [
            {"name": o.name, "parameters": {"binary_data": True}} for o in request.outputs
        ]
    return header, tails[0] if len(tails) == 1 else b"".join(tails)


def typed_bytes(tensor: Any) -> bytes:
    """An input's typed contents (the field its datatype names) in the binary layout, after
    checking that it holds as many values as its shape."""
    where = f"input {shown(tensor.name)}"
    known = CONTENTS.get(tensor.datatype)
    if known is None:
        raise GrpcRefusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{where}: datatype {shown(tensor.datatype)} has no typed contents; send it in "
            "raw_input_contents",
        )
    field, dtype = known
    values = getattr(tensor.contents, field)
    if not values:
        filled = [f.name for f, _ in tensor.contents.ListFields()]
        also = f" (it has {', '.join(filled)})" if filled else ""
        raise GrpcRefusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{where}: datatype {tensor.datatype} takes its values in contents.{field} or "
            f"raw_input_contents{also}",
        )
    count = int(np.prod(list(tensor.shape))) if len(tensor.shape) else 1
    if len(values) != count:
        raise GrpcRefusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{where}: contents.{field} has {len(values)} values; shape {list(tensor.shape)} "
            f"needs {count}",
        )
    if tensor.datatype == "BYTES":
        return v2.encode_bytes([value.decode("utf-8", "replace") for value in values])
    return np.asarray(values, dtype=np.dtype(dtype)).tobytes()


# ----------------------------------------------------------------------- V2 body -> response


def proto_response(
    name: str,
    version: int,
    request_id: str,
    arrays: dict[str, np.ndarray],
    wanted: list[tuple[str, bool]],
    spec: dict[str, Any],
    parameters: dict[str, Any] | None = None,
) -> Any:
    """What `v2.build_response` answers over HTTP, as a ModelInferResponse: every output in
    `raw_output_contents` (as Triton answers), the prediction ids in parameter
    `prediction_ids` (comma-separated)."""
    response = service_pb2().ModelInferResponse(
        model_name=name, model_version=str(version), id=request_id
    )
    ids = (parameters or {}).get("prediction_ids")
    if ids:
        response.parameters["prediction_ids"].string_param = ",".join(ids)
    for output_name, _binary in wanted:
        array = arrays[output_name]
        datatype = v2.output_datatype(output_name, spec)
        response.outputs.add(name=output_name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(v2.tensor_bytes(array, datatype))
    return response


# ----------------------------------------------------------------------- the methods


def metadata_of(grpc_context: Any) -> dict[str, str]:
    """The call's metadata as headers (lower-case keys; the first of repeated keys counts)."""
    return {k.lower(): v for k, v in reversed(list(grpc_context.invocation_metadata() or ()))}


async def model_infer(
    host: ModelHost, auth: BearerAuth | None, request: Any, grpc_context: Any
) -> Any:
    """ModelInfer: the HTTP V2 infer (serving/lean.py `v2_infer`) on the proto."""
    return await answered(
        grpc_context, service_pb2().ModelInferResponse, _infer(host, auth, request, grpc_context)
    )


async def _infer(host: ModelHost, auth: BearerAuth | None, request: Any, grpc_context: Any) -> Any:
    headers = metadata_of(grpc_context)
    if auth is not None:
        await check_predict_key(request.model_name, host, auth, bearer_secret(headers))
    started = time.perf_counter()
    key, replica = v2_replica(
        host,
        request.model_name,
        request.model_version or None,
        headers.get(host.args.sticky_header.lower()),
    )
    header, tail = request_header(request)
    # The size this request has as a V2 body, for the same 413 (INVALID_ARGUMENT) limit.
    size = len(orjson.dumps(header)) + len(tail)
    return await answer_v2_infer(
        host, key, replica, None, None, started, (header, tail, size), proto_response
    )


async def stream_answer(
    host: ModelHost, auth: BearerAuth | None, request: Any, grpc_context: Any
) -> Any:
    """One ModelStreamInfer message's answer: the response, or `error_message` for a
    refusal (the stream goes on either way)."""
    pb = service_pb2()
    try:
        response = await _infer(host, auth, request, grpc_context)
        return pb.ModelStreamInferResponse(infer_response=response)
    except Exception as exc:
        refused = refusal(exc)
        if refused is None:
            logger.exception("ModelStreamInfer request %r failed", request.id)
        return pb.ModelStreamInferResponse(
            error_message=str(refused) if refused else f"internal error ({exc!r})",
            infer_response=pb.ModelInferResponse(id=request.id, model_name=request.model_name),
        )


async def model_stream_infer(
    servicer: DirectServicer, requests: AsyncIterator[Any], grpc_context: Any
) -> AsyncIterator[Any]:
    """ModelStreamInfer, as Triton answers it: every request on the stream is answered as
    ModelInfer answers it, all of them at once (so they batch together), each response as
    soon as it is ready (the client matches them by `id`). A refused request answers with
    `error_message` and the stream goes on; the stream's metadata carries the key."""
    answers: asyncio.Queue[Any] = asyncio.Queue()
    end = object()
    working: set[asyncio.Task[None]] = set()

    async def answer(request: Any) -> None:
        servicer.calls_in_flight += 1
        try:
            kiln = servicer.kiln
            await answers.put(await stream_answer(kiln.host, kiln.auth, request, grpc_context))
        finally:
            servicer.calls_in_flight -= 1

    async def read() -> None:
        try:
            async for request in requests:
                task = asyncio.create_task(answer(request))
                working.add(task)
                task.add_done_callback(working.discard)
            await asyncio.gather(*working)
        finally:
            await answers.put(end)

    reader = asyncio.create_task(read())
    # A stream the client broke off ends `read` with its error: taken here, not left unread.
    reader.add_done_callback(lambda task: task.cancelled() or task.exception())
    try:
        while (response := await answers.get()) is not end:
            yield response
    finally:  # the client went away: what it asked for is no longer wanted
        reader.cancel()
        for task in list(working):
            task.cancel()


async def model_metadata(
    host: ModelHost, auth: BearerAuth | None, request: Any, grpc_context: Any
) -> Any:
    """ModelMetadata: serving/routes/inference.py `v2_metadata`'s answer as a proto."""

    async def metadata() -> Any:
        replica = await authorized_replica(host, auth, request, grpc_context)
        meta = v2.model_metadata(
            replica.record.name, replica.record.version, replica.spec, replica.platform
        )
        pb = service_pb2()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[
                tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                for t in meta["inputs"]
            ],
            outputs=[
                tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                for t in meta["outputs"]
            ],
        )

    return await answered(grpc_context, service_pb2().ModelMetadataResponse, metadata())


async def model_config(
    host: ModelHost, auth: BearerAuth | None, request: Any, grpc_context: Any
) -> Any:
    """ModelConfig: serving/routes/inference.py `model_config` as Triton's ModelConfig proto
    (the batching in `parameters["batching"]` as a JSON string: a parameter is a string)."""

    async def config() -> Any:
        from google.protobuf import json_format
        from tritonclient.grpc import model_config_pb2

        key, replica = await authorized(host, auth, request, grpc_context)
        answer = routes_model_config(host, key, replica)
        batching = answer.pop("parameters")["batching"]
        del answer["version"]  # Triton's config has a version policy, not a version
        message = json_format.ParseDict(answer, model_config_pb2.ModelConfig())
        message.parameters["batching"].string_value = orjson.dumps(batching).decode()
        return service_pb2().ModelConfigResponse(config=message)

    return await answered(grpc_context, service_pb2().ModelConfigResponse, config())


async def model_ready(
    host: ModelHost, auth: BearerAuth | None, request: Any, grpc_context: Any
) -> Any:
    """ModelReady: ready when this replica serves the model (NOT_FOUND when it does not)."""

    async def ready() -> Any:
        await authorized_replica(host, auth, request, grpc_context)
        return service_pb2().ModelReadyResponse(ready=True)

    return await answered(grpc_context, service_pb2().ModelReadyResponse, ready())


async def authorized(
    host: ModelHost, auth: BearerAuth | None, request: Any, grpc_context: Any
) -> tuple[str, Any]:
    """The served key and replica of `request.name`/`version`, once the caller's key may use
    it (the HTTP routes' `Authorized`)."""
    if auth is not None:
        secret = bearer_secret(metadata_of(grpc_context))
        await check_predict_key(request.name, host, auth, secret)
    return v2_replica(host, request.name, request.version or None)


async def authorized_replica(
    host: ModelHost, auth: BearerAuth | None, request: Any, grpc_context: Any
) -> Any:
    return (await authorized(host, auth, request, grpc_context))[1]


def server_live() -> Any:
    return service_pb2().ServerLiveResponse(live=True)


def server_ready(host: ModelHost) -> Any:
    """Ready once a model is loaded (HTTP /v2/health/ready answers 503 before)."""
    return service_pb2().ServerReadyResponse(ready=bool(host.served.replicas))


async def server_metadata() -> Any:
    return service_pb2().ServerMetadataResponse(**(await v2_server()))


async def answered(grpc_context: Any, empty: Any, work: Any) -> Any:
    """`work`'s response, or an empty `empty` with the refusal's code and message set on the
    context (a non-OK status: the client sees the error, not the empty message)."""
    try:
        return await work
    except Exception as exc:
        answer = refusal(exc)
        if answer is None:
            raise
        grpc_context.set_code(answer.code)
        grpc_context.set_details(str(answer))
        return empty()


# ----------------------------------------------------------------------- the native front's bridge

OWN_HEADERS = frozenset({"host", "content-length", BRIDGE_TOKEN_HEADER})
"""Headers of the bridge's own HTTP request, not of the gRPC call's metadata."""


class BridgeContext:
    """The gRPC context the functions above take, for a call the native front handed over:
    its metadata, and the code and details a refusal sets."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self.metadata = metadata
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


class GrpcBridge:
    """Answers the calls `kiln-grpc-front` hands over (serving/native/grpc_front.cc) with the
    functions above: same checks, keys, batching, log and metrics as any gRPC call.

    Only a request carrying this replica's `token` (in BRIDGE_TOKEN_HEADER; the front has it
    from its environment) is taken: the Unix socket is the replica's own, and a request
    without the token goes to the full app (a 404)."""

    def __init__(self, kiln: Any) -> None:
        self.kiln = kiln
        self.token = secrets.token_hex(16)

    def owns(self, headers: dict[str, str]) -> bool:
        sent = headers.get(BRIDGE_TOKEN_HEADER, "")
        return hmac.compare_digest(sent.encode(), self.token.encode())

    async def answer(
        self, method: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, str, bytes]:
        """(gRPC status code, message, the response message's bytes) for one message."""
        pb = service_pb2()
        host, auth = self.kiln.host, self.kiln.auth
        context = BridgeContext([(k, v) for k, v in headers if k not in OWN_HEADERS])
        message = "ModelInfer" if method == "ModelStreamInfer" else method
        kind = getattr(pb, f"{message}Request", None)
        if kind is None or method not in METHODS + ("ModelStreamInfer",):
            return grpc.StatusCode.UNIMPLEMENTED.value[0], f"no method {shown(method)}", b""
        try:
            request = kind.FromString(body)
        except Exception:  # noqa: BLE001 (protobuf's DecodeError and its kin)
            code = grpc.StatusCode.INVALID_ARGUMENT
            return code.value[0], f"the {message}Request message could not be parsed", b""
        try:
            response = await self._call(method, host, auth, request, context)
        except Exception:
            logger.exception("gRPC %s failed", method)
            return grpc.StatusCode.INTERNAL.value[0], "internal error", b""
        if context.code is not None and context.code != grpc.StatusCode.OK:
            return context.code.value[0], context.details, b""
        return 0, "", response.SerializeToString()

    async def _call(
        self, method: str, host: ModelHost, auth: BearerAuth | None, request: Any, context: Any
    ) -> Any:
        if method == "ModelInfer":
            return await model_infer(host, auth, request, context)
        if method == "ModelStreamInfer":
            return await stream_answer(host, auth, request, context)
        if method == "ModelMetadata":
            return await model_metadata(host, auth, request, context)
        if method == "ModelReady":
            return await model_ready(host, auth, request, context)
        if method == "ModelConfig":
            return await model_config(host, auth, request, context)
        if method == "ServerReady":
            return server_ready(host)
        if method == "ServerLive":
            return server_live()
        return await server_metadata()
