"""Kiln's Serve application: one deployment that is both the HTTP ingress and the model host.

Each extra Serve hop costs more than the model does on this hardware (RAY_NOTES: a composed
ingress -> model chain served 40-100 req/s, the proxy alone about 600), so the FastAPI ingress
and the batched forward pass share one replica. `@serve.batch` groups concurrent requests,
whichever model they name, and runs one forward pass per model per batch.

Callers authenticate with `Authorization: Bearer <key>` (see serving/auth.py): a missing or
refused key gets 401 with a Bearer challenge, a live key without `predict:<model>`,
`predict:*` or `admin` gets 403. `ServeArgs.auth=False` (the embedded demo) turns this off.
"""

import json
import logging
import math
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import ray
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.catalog import VersionRecord
from actors.keys import KeyCheck
from actors.registry import NAMESPACE, REGISTRY_NAME
from actors.replica import SMALL_ROWS, ModelReplica
from serving import v2
from serving.auth import BearerAuth, KeyCache
from serving.ratelimit import RateLimiter
from serving.routing import Router
from serving.schemas import (
    AUTH_OFF_WARNING,
    LIVE_FIELDS,
    ErrorBody,
    ModelInfo,
    ModelList,
    PredictRequest,
    PredictResponse,
    ServeArgs,
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
)
from training.errors import KilnError

logger = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 422, 429, 503)
}
# A request whose forward pass is expected to take less than this skips the batch queue when
# no batch is running: batching cannot save more than the queue's own overhead then.
INLINE_FORWARD_S = 0.0005
# Replica processes run Kiln's handlers on Serve's own event loop rather than on a second
# loop in another thread: measured, the cross-thread hand-offs cost 0.8 ms of a 2 ms request.
# Serve's own health and control calls then share the loop with forward passes; one pass
# blocks it for milliseconds at most against a 30 s health-check timeout.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}

api = FastAPI(
    title="Kiln",
    description="Models trained and registered by Kiln, served by Ray Serve.",
    version="1",
)


# Reads the header only; whether the key is live and allowed is the registry's call (below).
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="KilnKey",
    description="An API key from `kiln keys create`: kiln_<id>_<secret>.",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


@api.exception_handler(StarletteHTTPException)
async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
    )


@api.exception_handler(RequestValidationError)
async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return JSONResponse({"error": f"{where}: {first['msg']}"}, status_code=422)


def runs_inline(replica: ModelReplica, rows: int) -> bool:
    """Whether a forward pass of `rows` rows is cheap enough to block the event loop for."""
    return rows <= SMALL_ROWS and replica.small_forward_s < INLINE_FORWARD_S


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


# The infer routes read the raw body (binary tensors may follow the JSON): the schemas are
# declared for the docs only.
V2_INFER_DOCS: dict[str, Any] = {
    "tags": ["v2"],
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


@dataclass(frozen=True)
class Served:
    """What one replica serves now; rebuilt whole and swapped in by `reconfigure`."""

    replicas: dict[str, ModelReplica]
    router: Router


@dataclass
class BatchItem:
    """One request's rows on their way through the batch queue."""

    model_key: str
    x: np.ndarray  # (N, F) float32


def parse_rows(body: PredictRequest, replica: ModelReplica, max_instances: int) -> np.ndarray:
    """The instances as an (N, F) float32 array, or an HTTP 422 that names the expected shape."""
    num_features = replica.num_features
    if not body.instances:
        raise HTTPException(422, f"instances is empty; send shape [N, {num_features}] with N >= 1")
    if len(body.instances) > max_instances:
        raise HTTPException(
            422, f"got {len(body.instances)} instances; at most {max_instances} per request"
        )
    for i, row in enumerate(body.instances):
        if len(row) != num_features:
            raise HTTPException(
                422,
                f"instances must have shape [N, {num_features}]; "
                f"instance {i} has {len(row)} values",
            )
    x = np.asarray(body.instances, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x))[0][0])
        raise HTTPException(422, f"instance {bad} holds NaN or Inf; send finite numbers only")
    return x


async def read_json_body(request: Request, max_body_bytes: int) -> Any:
    """The parsed body; 413 past the size limit, 400 for malformed JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body_bytes:
        raise HTTPException(413, f"request body is {declared} bytes; the limit is {max_body_bytes}")
    raw = await request.body()
    if len(raw) > max_body_bytes:
        raise HTTPException(413, f"request body is {len(raw)} bytes; the limit is {max_body_bytes}")
    try:
        return json.loads(raw, parse_constant=lambda c: math.nan)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"request body is not valid JSON: {exc}") from exc


def resolve_served(registry: Any, args: ServeArgs, loaded: dict[str, ModelReplica]) -> Served:
    """Resolve every reference through the registry now and load what is not loaded yet."""
    refs = list(args.models) + [c.ref for c in args.canary.values()]
    records: list[VersionRecord] = ray.get([registry.resolve.remote(ref) for ref in refs])
    storage_uri = str(ray.get(registry.get_storage_uri.remote()))
    replicas: dict[str, ModelReplica] = {}
    for record in records:
        replicas[record.ref] = loaded.get(record.ref) or ModelReplica(record, storage_uri, args.gpu)
    router = Router()
    names = sorted({r.name for r in records})
    alias_maps = dict(zip(names, ray.get([registry.aliases.remote(n) for n in names]), strict=True))
    for ref, record in zip(refs[: len(args.models)], records, strict=False):
        selector = ref.partition("@")[2]
        # Every alias the registry has for this version answers too, not just the one named.
        aliases = {a for a, v in alias_maps[record.name].items() if v == record.version}
        if selector and not selector.isdigit():
            aliases.add(selector)
        router.add(record.ref, *sorted(aliases - {"canary"}), default=True)
    for (name, canary), record in zip(
        args.canary.items(), records[len(args.models) :], strict=True
    ):
        if name not in router.routes:
            raise KilnError(f"canary for {name!r}, which is not among the served models")
        router.add(record.ref, "canary", default=False)
        router.split(name, record.ref, canary.weight)
    return Served(replicas, router)


@serve.deployment(
    name="KilnServer",
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=0.5,
)
@serve.ingress(api)
class KilnServer:
    """Serves registered model versions over V1 and V2 HTTP, batching across requests."""

    def __init__(self, args: dict[str, Any]) -> None:
        # `args` holds every field; the live ones come again (and later) through reconfigure.
        self.args = ServeArgs(**args)
        self.registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
        self.auth: BearerAuth | None = None
        if self.args.auth:
            self.auth = BearerAuth(self._verify_key, KeyCache(self.args.auth_cache_ttl_s))
        else:
            logger.warning(AUTH_OFF_WARNING)
        self.limiter = RateLimiter(self.args.rate_limit_per_s, self.args.rate_limit_burst)
        self.served = Served({}, Router())
        # The replica computes with the cores it reserves (Kiln's workers default to one
        # thread each): a replica with num_cpus=4 runs its forward passes on 4 threads.
        torch.set_num_threads(max(1, int(self.args.num_cpus)))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live changes without a restart: served versions, canary split, batching, limits.

        New versions load before the swap; the new routing table replaces the old in one
        assignment, so requests in flight finish on the version they started with.
        """
        self.args = ServeArgs(**{**self.args.model_dump(), **user_config})
        self.served = resolve_served(self.registry, self.args, self.served.replicas)
        self.limiter = RateLimiter(self.args.rate_limit_per_s, self.args.rate_limit_burst)
        batched: Any = self._forward_batch  # @serve.batch adds the setters
        batched.set_max_batch_size(self.args.max_batch_size)
        batched.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        logger.info("serving %s", ", ".join(self.served.router.served()))

    def current_args(self) -> dict[str, Any]:
        """What this replica serves now (for `kiln deploy`, `promote` and `rollback`)."""
        return self.args.model_dump()

    def check_health(self) -> None:
        """Serve restarts a replica whose models cannot run a forward pass."""
        for replica in self.served.replicas.values():
            replica.forward(np.zeros((1, replica.num_features), dtype=np.float32))

    async def _verify_key(self, secret: str) -> KeyCheck:
        try:
            return await self.registry.verify_key.remote(secret)
        except ray.exceptions.RayError as exc:
            logger.error("the registry could not check a key: %s", exc)
            raise HTTPException(503, "the key registry is unavailable; retry shortly") from exc

    async def _authorize(self, credentials: HTTPAuthorizationCredentials | None, name: str) -> None:
        """401/403 unless the key may predict with `name`; 429 past its rate (auth on)."""
        if self.auth is None:
            return
        secret = credentials.credentials if credentials else None
        check = await self.auth.authorize(secret, "predict", name.partition("@")[0])
        wait_s = self.limiter.wait_s(check.key_id or "unknown")
        if wait_s > 0:
            raise HTTPException(
                429,
                f"rate limit of {self.args.rate_limit_per_s:g} requests/s for this key exceeded",
                headers={"Retry-After": str(max(1, round(wait_s + 0.5)))},
            )

    def _replica_for(self, name: str, request: Request | None = None) -> tuple[str, ModelReplica]:
        sticky = request.headers.get(self.args.sticky_header) if request is not None else None
        served = self.served  # one read: a concurrent reconfigure cannot split this lookup
        key = served.router.pick(name, sticky)
        if key is None:
            raise HTTPException(
                404,
                f"model {name!r} is not served here; served: {', '.join(served.router.served())}",
            )
        return key, served.replicas[key]

    async def _forward(self, key: str, x: np.ndarray) -> np.ndarray:
        """Outputs for x: at once for a cheap pass on an idle replica, else through the batcher.

        A cheap forward pass (a small model, a few rows) costs less than the batch queue's
        hand-offs, so when no batch wait is asked for it runs at once. Everything else goes
        through `@serve.batch`: with no wait for a batch to fill (the default), a batch holds the
        requests that arrived while the previous one ran, as in Triton's dynamic batcher.
        """
        replica = self.served.replicas[key]
        if self.args.batch_wait_timeout_s == 0 and runs_inline(replica, len(x)):
            return replica.forward(x)
        return await self._forward_batch(BatchItem(key, x))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _forward_batch(self, items: list[BatchItem]) -> list[np.ndarray]:
        """One forward pass per model over every row of the batch, split back per request.

        The pass runs on the event loop, on purpose: Serve's batcher forms the next batch as
        soon as this one starts, so a pass on a worker thread left the loop free to cut many
        small batches (measured: a third of the throughput). Blocking here lets the requests
        that arrive meanwhile queue up and go through together in the next batch.
        """
        replicas = self.served.replicas
        outputs: list[np.ndarray | None] = [None] * len(items)
        for key in {item.model_key for item in items}:
            members = [i for i, item in enumerate(items) if item.model_key == key]
            x = np.concatenate([items[i].x for i in members])
            out = replicas[key].forward(x)
            offsets = np.cumsum([0] + [len(items[i].x) for i in members])
            for j, i in enumerate(members):
                outputs[i] = out[offsets[j] : offsets[j + 1]]
        return outputs  # type: ignore[return-value]

    def _info(self, key: str) -> ModelInfo:
        replica = self.served.replicas[key]
        record, spec = replica.record, replica.spec
        return ModelInfo(
            name=record.name,
            version=record.version,
            task=spec["task"],
            kind=spec["kind"],
            num_features=spec["num_features"],
            classes=spec.get("classes"),
            metrics={k: v for k, v in record.metrics.items() if k != "history"},
            aliases=self.served.router.aliases_of(key),
        )

    # ------------------------------------------------------------------------ V1

    @api.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models(self, credentials: BearerDep) -> ModelList:
        """The served versions this key may predict with (all of them when auth is off)."""
        keys = sorted(self.served.replicas)
        if self.auth is not None:
            check = await self.auth.authenticate(credentials.credentials if credentials else None)
            keys = [k for k in keys if check.allows("predict", self.served.replicas[k].record.name)]
        return ModelList(models=[self._info(key) for key in keys])

    @api.get("/v1/models/{name}", response_model=ModelInfo, responses=ERROR_RESPONSES)
    async def model_info(self, name: str, credentials: BearerDep) -> ModelInfo:
        await self._authorize(credentials, name)
        key, _ = self._replica_for(name)
        return self._info(key)

    @api.post(
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
    async def predict(self, name: str, request: Request, credentials: BearerDep) -> Response:
        # Auth first: a caller without a key learns nothing, not even which models exist.
        await self._authorize(credentials, name)
        key, replica = self._replica_for(name, request)
        payload = await read_json_body(request, self.args.max_body_bytes)
        try:
            body = PredictRequest.model_validate(payload)
        except ValueError as exc:
            raise RequestValidationError(exc.errors()) from exc  # type: ignore[attr-defined]
        x = parse_rows(body, replica, self.args.max_instances)
        outputs = await self._forward(key, x)
        result = replica.format(outputs, probabilities=body.return_ == "probabilities")
        request_id = uuid.uuid4().hex[:16]
        reply = PredictResponse(
            **result,
            model=replica.record.name,
            model_version=replica.record.version,
            ids=[f"{request_id}-{i}" for i in range(len(x))],
        )
        # Serialised here, once: FastAPI would validate and encode the model again.
        return Response(reply.model_dump_json(exclude_none=True), media_type="application/json")

    # ------------------------------------------------------------------------ V2 (OIP)

    @api.get("/v2", tags=["v2"], response_model=V2ServerMetadata)
    async def v2_server(self) -> dict[str, Any]:
        return {"name": "kiln", "version": "1", "extensions": ["binary_tensor_data"]}

    @api.get("/v2/health/live", tags=["v2"], response_model=V2Live)
    async def v2_live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready", tags=["v2"], response_model=V2Ready, responses=ERROR_RESPONSES)
    async def v2_ready(self) -> dict[str, bool]:
        if not self.served.replicas:
            raise HTTPException(503, "no model is loaded yet")
        return {"ready": True}

    def _v2_replica(
        self, name: str, version: str | None, request: Request | None
    ) -> tuple[str, ModelReplica]:
        if version is not None and not version.isdigit():
            raise HTTPException(404, f"version {version!r} is not a number")
        return self._replica_for(f"{name}@{version}" if version else name, request)

    @api.get(
        "/v2/models/{name}", tags=["v2"], response_model=V2ModelMetadata, responses=ERROR_RESPONSES
    )
    @api.get(
        "/v2/models/{name}/versions/{version}",
        tags=["v2"],
        response_model=V2ModelMetadata,
        responses=ERROR_RESPONSES,
    )
    async def v2_metadata(
        self, name: str, credentials: BearerDep, version: str | None = None
    ) -> dict[str, Any]:
        await self._authorize(credentials, name)
        _, replica = self._v2_replica(name, version, None)
        return v2.model_metadata(replica.record.name, replica.record.version, replica.spec)

    @api.get(
        "/v2/models/{name}/ready",
        tags=["v2"],
        response_model=V2ModelReady,
        responses=ERROR_RESPONSES,
    )
    @api.get(
        "/v2/models/{name}/versions/{version}/ready",
        tags=["v2"],
        response_model=V2ModelReady,
        responses=ERROR_RESPONSES,
    )
    async def v2_model_ready(
        self, name: str, credentials: BearerDep, version: str | None = None
    ) -> dict[str, Any]:
        await self._authorize(credentials, name)
        _, replica = self._v2_replica(name, version, None)
        return {"name": replica.record.name, "ready": True}

    @api.post("/v2/models/{name}/infer", **V2_INFER_DOCS)
    @api.post("/v2/models/{name}/versions/{version}/infer", **V2_INFER_DOCS)
    async def v2_infer(
        self, name: str, request: Request, credentials: BearerDep, version: str | None = None
    ) -> Response:
        await self._authorize(credentials, name)
        key, replica = self._v2_replica(name, version, request)
        raw = await request.body()
        if len(raw) > self.args.max_body_bytes:
            raise HTTPException(
                413, f"request body is {len(raw)} bytes; the limit is {self.args.max_body_bytes}"
            )
        try:
            body, tail = v2.split_body(raw, request.headers.get(v2.HEADER_LENGTH))
            x = v2.parse_infer_request(body, tail, replica.num_features, self.args.max_instances)
            wanted = v2.requested_outputs(body, replica.spec)
        except v2.V2Error as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        outputs = await self._forward(key, x)
        result = replica.format(outputs, probabilities=True)
        arrays = {"predictions": np.asarray(result["predictions"])}
        if "probabilities" in result:
            arrays["probabilities"] = np.asarray(result["probabilities"], dtype=np.float32)
        content, header_length = v2.build_response(
            replica.record.name,
            replica.record.version,
            str(body.get("id") or uuid.uuid4().hex[:16]),
            arrays,
            wanted,
            replica.spec,
        )
        headers = {v2.HEADER_LENGTH: header_length} if header_length else None
        media = "application/octet-stream" if header_length else "application/json"
        return Response(content, media_type=media, headers=headers)


def build_app(args: dict[str, Any]) -> Application:
    """Serve config entry point: `import_path: serving.app:build_app`."""
    try:
        parsed = ServeArgs(**args)
        autoscaling = parsed.autoscaling()
    except ValueError as exc:
        raise KilnError(f"invalid serve args: {exc}") from exc
    num_gpus = parsed.num_gpus
    if num_gpus is None:  # a fractional GPU per replica when the cluster has GPUs
        has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
        num_gpus = 0.25 if has_gpu and parsed.gpu != "off" else 0.0
    options: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": parsed.num_cpus,
            "num_gpus": num_gpus,
            "runtime_env": {"env_vars": REPLICA_ENV},
        },
        "user_config": parsed.live(),
        "graceful_shutdown_timeout_s": parsed.graceful_shutdown_timeout_s,
        "max_ongoing_requests": max(2 * parsed.max_batch_size, 32),
        "logging_config": {"enable_access_log": parsed.access_log},
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = parsed.num_replicas
    # Bind the first live values only through `static_args`: init args that differ between two
    # deploys restart every replica, while a user_config change reconfigures them in place.
    return KilnServer.options(**options).bind(static_args(parsed))  # type: ignore[attr-defined]


def static_args(parsed: ServeArgs) -> dict[str, Any]:
    """Init args that stay equal across live updates (placeholders for the live fields)."""
    dumped = parsed.model_dump()
    return {k: v for k, v in dumped.items() if k not in LIVE_FIELDS} | {"models": ["_"]}
