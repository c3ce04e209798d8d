"""Kiln's Serve application: one deployment that is both the HTTP ingress and the model host.

Each extra Serve hop costs more than the model does on this hardware (RAY_NOTES: a composed
ingress -> model chain served 40-100 req/s, the proxy alone about 600), so the FastAPI ingress
and the batched forward pass share one replica. The FastAPI side is split by resource: the
routers in serving/routes/ reach the replica only through serving/dependencies.py, errors
answer through serving/errors.py, and the model host with its batching is plain Python in
serving/host.py. Ray's `@serve.ingress` serves the routes of the included routers.

Callers authenticate with `Authorization: Bearer <key>` (see serving/auth.py): a missing or
refused key gets 401 with a Bearer challenge, a live key without `predict:<model>`,
`predict:*` or `admin` gets 403. `ServeArgs.auth=False` (the embedded demo) turns this off.
"""

import asyncio
import functools
import logging
import os
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from kiln.actors.registry import NAMESPACE, REGISTRY_NAME
from kiln.serving import grpc_v2
from kiln.serving.auth import BearerAuth, KeyCache
from kiln.serving.batching import DEFAULT_MAX_BATCH_SIZE
from kiln.serving.console import routes as console_routes
from kiln.serving.console.data import Console, served_explainer
from kiln.serving.dependencies import serving_replica
from kiln.serving.direct import DirectGrpc, DirectServer, native_front, private_socket_path
from kiln.serving.errors import add_error_handlers
from kiln.serving.host import ModelHost
from kiln.serving.lean import LeanPredict
from kiln.serving.routes import explain, inference, models, monitoring, openai
from kiln.serving.schemas import AUTH_OFF_WARNING, LIVE_FIELDS, ServeArgs
from kiln.training.errors import KilnError

logger = logging.getLogger(__name__)

# Replica processes run Kiln's handlers on Serve's own event loop rather than on a second
# loop in another thread: measured, the cross-thread hand-offs cost 0.8 ms of a 2 ms request.
# Serve's own health and control calls then share the loop with forward passes; one pass
# blocks it for milliseconds at most against a 30 s health-check timeout.
# OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep at a barrier instead of spinning
# (libgomp spins ~300k rounds by default). A replica computing on 2 threads of a busy host
# otherwise burns its cores on threads waiting for a sibling the OS has descheduled: one decode
# step of lm_spec("small") at 32 rows took 2.5-3.5 s spinning against 0.29-0.47 s passive and
# 0.18-0.29 s on one thread (load avg 25, 2 cores; /work/notes/h2-lm-perf.md). The caller's
# own OMP_WAIT_POLICY, when set, wins.
REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
}

api = FastAPI(
    title="Kiln",
    description="Models trained and registered by Kiln, served by Ray Serve.",
    version="1",
    # FastAPI 0.165's native OpenTelemetry asks the global tracer, meter and logger providers
    # whether they are configured on every request (5.7 us each, thread CPU, load avg 9:
    # 2.5% of the light model's lean path); Kiln's metrics go through Ray (serving/metrics.py).
    telemetry={"tracing": False, "metrics": False, "logs": False},
)
add_error_handlers(api)
api.include_router(models.router)
api.include_router(inference.router)
api.include_router(monitoring.router)
api.include_router(explain.router)
api.include_router(openai.router)
api.add_exception_handler(openai.OpenAIError, openai.openai_error)
api.include_router(console_routes.router)
# V1 :predict and V2 infer answer before FastAPI's routing and dependencies (serving/lean.py).
api.add_middleware(LeanPredict, api=api)


def replica_console() -> Console:
    """The console of the KilnServer replica handling the request (serving/console/)."""
    return serving_replica().console  # type: ignore[no-any-return]


# Not `api.dependency_overrides`: any override makes FastAPI rebuild every route's dependency
# tree per request (fastapi/dependencies/utils.py solve_dependencies), which halved the light
# model's throughput; the overrides stay for tests.
console_routes.use_console(replica_console)


@serve.deployment(
    name="KilnServer",
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=0.5,
)
@serve.ingress(api)
class KilnServer:
    """Serves registered model versions over V1 and V2 HTTP, batching across requests.

    The routes find this replica's `host` and `auth` through serving/dependencies.py.
    """

    def __init__(self, args: dict[str, Any]) -> None:
        parsed = ServeArgs(**args)
        self.host = ModelHost(parsed, ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE))
        self.auth: BearerAuth | None = None
        if parsed.auth:
            registry = self.host.registry
            self.auth = BearerAuth(
                self.host.verify_key,
                KeyCache(parsed.auth_cache_ttl_s),
                report=lambda uses: registry.record_key_uses.remote(uses),
                report_interval_s=parsed.key_use_report_s,
            )
        else:
            logger.warning(AUTH_OFF_WARNING)
        self.console = Console(self.host.registry, self.auth, served_explainer(self.host))
        # Here too, not only at import: Serve rebuilds the ingress app in the replica from a
        # pickle without importing this module, and /ui then had no console (a 500).
        console_routes.use_console(replica_console)
        grpc_v2.bind_replica_grpc_like_http()
        # The direct ingress (serving/direct.py): this replica answers the Kiln ports itself.
        self.direct: DirectServer | None = None
        self.direct_grpc: DirectGrpc | None = None
        # They start listening after the first reconfigure, once the models are loaded: a
        # replica that answered before then said "not served" (a 404) to the requests the
        # kernel gave it while it loaded, at start and whenever Serve replaced a replica.
        self._loop = asyncio.get_running_loop()
        native = None
        if parsed.direct_port and parsed.direct_grpc_port:
            native = native_front(parsed.grpc_front)
        # The native gRPC front hands calls to `bridge` over a Unix socket of this replica's.
        bridge = grpc_v2.GrpcBridge(self) if native is not None else None
        private = private_socket_path() if native is not None else None
        if parsed.direct_port:
            front = LeanPredict(api, api, outermost=True, bridge=bridge)
            self.direct = DirectServer(front, parsed.direct_host, parsed.direct_port, private)
        if parsed.direct_port and parsed.direct_grpc_port:
            self.direct_grpc = DirectGrpc(
                self,
                parsed.direct_host,
                parsed.direct_grpc_port,
                native,
                private,
                bridge.token if bridge is not None else "",
            )
        if self.direct is not None:
            # Whether a cheap forward pass may run at once or joins a batch (ModelHost.forward),
            # and whether a batch waits to fill (BatchQueue.more_coming).
            self.host.requests_in_flight = self.requests_in_flight
            self.host.more_requests_coming = self.more_requests_coming

    def requests_in_flight(self) -> int:
        """Predict requests this replica's direct ingress has begun and not yet answered."""
        grpc_calls = 0 if self.direct_grpc is None else self.direct_grpc.requests_in_flight()
        return grpc_calls + (0 if self.direct is None else self.direct.requests_in_flight())

    def more_requests_coming(self, queued: int) -> bool:
        """Whether requests not among the `queued` ones may still join a batch: HTTP requests
        in flight beyond them, or any gRPC call (grpc.aio hands calls over one at a time, so
        its count leaves out those it has not handed over yet)."""
        if self.direct_grpc is not None and self.direct_grpc.requests_in_flight() > 0:
            return True
        return self.direct is not None and self.direct.requests_in_flight() > queued

    async def __del__(self) -> None:
        """Serve's graceful shutdown: the direct ingress finishes its requests in flight."""
        if self.direct_grpc is not None:
            await self.direct_grpc.stop()
        if self.direct is not None:
            await self.direct.stop()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's live update (`user_config`): see ModelHost.reconfigure. The first one (Serve
        calls it as the replica starts) loads the models; the direct ingress listens after it."""
        self.host.reconfigure(user_config)
        for direct in (self.direct, self.direct_grpc):
            if direct is not None and direct.task is None:
                # This may run on a thread of Serve's: the listener starts on the replica's loop
                # (start() is idempotent, so a second reconfigure before it runs is harmless).
                self._loop.call_soon_threadsafe(direct.start, self._loop)

    def current_args(self) -> dict[str, Any]:
        """What this replica serves now (for `kiln deploy`, `promote` and `rollback`)."""
        return self.host.args.model_dump()

    def stable_refs(self) -> dict[str, str]:
        """Model name -> the exact version its bare name answers with (a canary aside)."""
        return {k: v for k, v in self.host.served.router.routes.items() if "@" not in k}

    def check_health(self) -> None:
        """Serve restarts a replica whose models cannot run a forward pass, or whose direct
        ingress stopped."""
        self.host.check_health()
        for direct in (self.direct, self.direct_grpc):
            if direct is not None and direct.failed:
                raise RuntimeError(f"Kiln's direct ingress on port {direct.port} stopped")

    # Open Inference Protocol V2 over gRPC (serving/grpc_v2.py): Serve's gRPC ingress calls
    # the method named like the RPC, with the request proto and the call's context.
    async def ModelInfer(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802
        return await grpc_v2.model_infer(self.host, self.auth, request, grpc_context)

    async def ModelMetadata(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802
        return await grpc_v2.model_metadata(self.host, self.auth, request, grpc_context)

    async def ModelReady(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802
        return await grpc_v2.model_ready(self.host, self.auth, request, grpc_context)

    async def ModelConfig(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802
        return await grpc_v2.model_config(self.host, self.auth, request, grpc_context)

    async def ServerReady(self, request: Any) -> Any:  # noqa: N802
        return grpc_v2.server_ready(self.host)

    async def ServerLive(self, request: Any) -> Any:  # noqa: N802
        return grpc_v2.server_live()

    async def ServerMetadata(self, request: Any) -> Any:  # noqa: N802
        return await grpc_v2.server_metadata()


def build_app(args: dict[str, Any]) -> Application:
    """Serve config entry point: `import_path: kiln.serving.app:build_app`."""
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
        # Two full batches in flight; with the batch size left to each model's profile, 128.
        "max_ongoing_requests": max(2 * (parsed.max_batch_size or DEFAULT_MAX_BATCH_SIZE), 32),
        "logging_config": {"enable_access_log": parsed.access_log},
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = parsed.num_replicas
    # Bind the first live values only through `static_args`: init args that differ between two
    # deploys restart every replica, while a user_config change reconfigures them in place.
    static = static_args(parsed)
    deployment = KilnServer.options(**options)  # type: ignore[attr-defined]
    # Serve gives every `serve.run` without a version a random one, and a new version restarts
    # every replica (one replica: stopped before its replacement starts), so a canary, promote
    # or rollback refused connections for the seconds a replica takes to start under the
    # direct ingress (HAProxy queued them). A version that names the code and the init args
    # keeps the same replicas for a live change (user_config: Serve's lightweight update).
    version = code_version(static, options["ray_actor_options"])
    return deployment.options(version=version, _internal=True).bind(static)


def code_version(static: dict[str, Any], actor_options: dict[str, Any]) -> str:
    """A deployment version that changes with Kiln's code, the init args and the actor options."""
    import hashlib
    import json

    from kiln import __version__

    blob = json.dumps([__version__, static, actor_options], sort_keys=True, default=str)
    return hashlib.sha256(serving_code_digest() + blob.encode()).hexdigest()[:16]


@functools.cache
def serving_code_digest() -> bytes:
    """SHA-256 of the serving code the replicas run (read once a process)."""
    import hashlib

    code = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        code.update(path.read_bytes())
    return code.digest()


def static_args(parsed: ServeArgs) -> dict[str, Any]:
    """Init args that stay equal across live updates (placeholders for the live fields)."""
    dumped = parsed.model_dump()
    return {k: v for k, v in dumped.items() if k not in LIVE_FIELDS} | {"models": ["_"]}
