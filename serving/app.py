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
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.catalog import VersionRecord
from actors.keys import KeyCheck
from actors.registry import NAMESPACE, REGISTRY_NAME
from actors.replica import ModelReplica
from serving.auth import BearerAuth, KeyCache
from serving.schemas import (
    ErrorBody,
    ModelInfo,
    ModelList,
    PredictRequest,
    PredictResponse,
    ServeArgs,
)
from training.errors import KilnError

logger = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 422, 503)
}
AUTH_OFF_WARNING = (
    "Kiln serving with auth off: anyone who can reach the HTTP port may call every served model"
)

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


def resolve_records(
    registry: Any, refs: list[str]
) -> tuple[list[VersionRecord], str, dict[str, list[str]]]:
    """Ask the Registry actor what each reference means now; also return the storage URI."""
    records: list[VersionRecord] = ray.get([registry.resolve.remote(ref) for ref in refs])
    storage_uri = str(ray.get(registry.get_storage_uri.remote()))
    aliases: dict[str, list[str]] = {}
    for ref, record in zip(refs, records, strict=True):
        _, _, selector = ref.partition("@")
        aliases.setdefault(record.ref, [])
        if selector and not selector.isdigit():
            aliases[record.ref].append(selector)
    return records, storage_uri, aliases


@serve.deployment(name="KilnServer", health_check_period_s=5)
@serve.ingress(api)
class KilnServer:
    """Serves registered model versions over V1 HTTP, batching across concurrent requests."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ServeArgs(**args)
        self.registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
        records, storage_uri, aliases = resolve_records(self.registry, self.args.models)
        self.auth: BearerAuth | None = None
        if self.args.auth:
            self.auth = BearerAuth(self._verify_key, KeyCache(self.args.auth_cache_ttl_s))
        else:
            logger.warning(AUTH_OFF_WARNING)
        self.replicas: dict[str, ModelReplica] = {}
        self.routes: dict[str, str] = {}
        for record in records:
            self.replicas[record.ref] = ModelReplica(record, storage_uri, self.args.gpu)
            for key in (
                record.name,
                record.ref,
                *(f"{record.name}@{a}" for a in aliases[record.ref]),
            ):
                self.routes.setdefault(key, record.ref)
        self.reconfigure(self.args.model_dump())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live knobs: max_batch_size and batch_wait_timeout_s."""
        batched: Any = self._forward_batch  # @serve.batch adds the setters
        if "max_batch_size" in user_config:
            batched.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            batched.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    async def _verify_key(self, secret: str) -> KeyCheck:
        try:
            return await self.registry.verify_key.remote(secret)
        except ray.exceptions.RayError as exc:
            logger.error("the registry could not check a key: %s", exc)
            raise HTTPException(503, "the key registry is unavailable; retry shortly") from exc

    async def _authorize(self, credentials: HTTPAuthorizationCredentials | None, name: str) -> None:
        """401/403 unless the key may predict with `name` (a no-op when auth is off)."""
        if self.auth is not None:
            secret = credentials.credentials if credentials else None
            await self.auth.authorize(secret, "predict", name.partition("@")[0])

    def _replica_for(self, name: str) -> tuple[str, ModelReplica]:
        key = self.routes.get(name)
        if key is None:
            served = ", ".join(sorted(self.routes))
            raise HTTPException(404, f"model {name!r} is not served here; served: {served}")
        return key, self.replicas[key]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _forward_batch(self, items: list[BatchItem]) -> list[np.ndarray]:
        """One forward pass per model over every row of the batch, split back per request."""
        outputs: list[np.ndarray | None] = [None] * len(items)
        for key in {item.model_key for item in items}:
            members = [i for i, item in enumerate(items) if item.model_key == key]
            x = np.concatenate([items[i].x for i in members])
            out = self.replicas[key].forward(x)
            offsets = np.cumsum([0] + [len(items[i].x) for i in members])
            for j, i in enumerate(members):
                outputs[i] = out[offsets[j] : offsets[j + 1]]
        return outputs  # type: ignore[return-value]

    def _info(self, key: str) -> ModelInfo:
        replica = self.replicas[key]
        record, spec = replica.record, replica.spec
        return ModelInfo(
            name=record.name,
            version=record.version,
            task=spec["task"],
            kind=spec["kind"],
            num_features=spec["num_features"],
            classes=spec.get("classes"),
            metrics=record.metrics,
            aliases=sorted(
                k.split("@", 1)[1]
                for k, v in self.routes.items()
                if v == key and "@" in k and not k.split("@", 1)[1].isdigit()
            ),
        )

    @api.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models(self, credentials: BearerDep) -> ModelList:
        """The served versions this key may predict with (all of them when auth is off)."""
        keys = sorted(self.replicas)
        if self.auth is not None:
            check = await self.auth.authenticate(credentials.credentials if credentials else None)
            keys = [k for k in keys if check.allows("predict", self.replicas[k].record.name)]
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
    async def predict(self, name: str, request: Request, credentials: BearerDep) -> PredictResponse:
        # Auth first: a caller without a key learns nothing, not even which models exist.
        await self._authorize(credentials, name)
        key, replica = self._replica_for(name)
        payload = await read_json_body(request, self.args.max_body_bytes)
        try:
            body = PredictRequest.model_validate(payload)
        except ValueError as exc:
            raise RequestValidationError(exc.errors()) from exc  # type: ignore[attr-defined]
        x = parse_rows(body, replica, self.args.max_instances)
        outputs = await self._forward_batch(BatchItem(key, x))
        result = replica.format(outputs, probabilities=body.return_ == "probabilities")
        request_id = uuid.uuid4().hex[:16]
        return PredictResponse(
            **result,
            model=replica.record.name,
            model_version=replica.record.version,
            ids=[f"{request_id}-{i}" for i in range(len(x))],
        )


def build_app(args: dict[str, Any]) -> Application:
    """Serve config entry point: `import_path: serving.app:build_app`."""
    try:
        parsed = ServeArgs(**args)
    except ValueError as exc:
        raise KilnError(f"invalid serve args: {exc}") from exc
    return KilnServer.options(  # type: ignore[attr-defined]
        num_replicas=parsed.num_replicas,
        ray_actor_options={"num_cpus": parsed.num_cpus},
        user_config={
            "max_batch_size": parsed.max_batch_size,
            "batch_wait_timeout_s": parsed.batch_wait_timeout_s,
        },
    ).bind(parsed.model_dump())
