"""Deploying Kiln's Serve application on the connected Ray instance."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import ray
from ray import serve

from kiln.actors.catalog import VersionRecord
from kiln.actors.registry import NAMESPACE
from kiln.runtime import free_port, registry_for, unwrapped_errors
from kiln.serving.app import build_app
from kiln.serving.schemas import AUTH_OFF_WARNING, ServeArgs, is_canary_weight
from kiln.settings import Settings
from kiln.tls import TlsFiles, TlsFrontend
from kiln.tls_cluster import cluster_serve_ports, start_node_fronts
from kiln.training.errors import KilnError
from kiln.training.export import serving_backend

APP_NAME = "kiln"

logger = logging.getLogger(__name__)


def deploy_models(
    settings: Settings,
    refs: list[str],
    key: str | None = None,
    tls: TlsFiles | None = None,
    grpc_port: int | None = None,
    **serve_args: Any,
) -> str:
    """Serve `refs` at settings' host and port; returns the base URL once it answers.

    gRPC (serving/grpc_v2.py) listens on `grpc_port` (default settings' kiln_grpc_port; 0:
    none) on the same host, behind a TLS frontend of its own (HTTP/2) with `tls`.

    Deploying is an admin action: it is audited first, which also refuses a `key` without the
    admin scope before anything changes. `auth=False` in `serve_args` turns key checks off.
    With `tls`, Serve listens on a loopback port and Kiln's TLS frontend (cluster/tls.py) on
    settings' host and port; it lives as long as this process (the embedded Ray's). On a
    cluster, every node with a Serve proxy gets a frontend actor (cluster/tls_cluster.py).
    """
    registry = registry_for(settings)
    # A missing model, or one its backend cannot run, is one line now, not a failed deployment.
    resolve_all(registry, refs, str(serve_args.get("backend", "auto")))
    auth = bool(serve_args.get("auth", True))
    ray.get(registry.record_event.remote("deploy", ",".join(refs), {"auth": auth}, key))
    if not auth:
        logger.warning(AUTH_OFF_WARNING)
    host, port = settings.kiln_http_host, settings.kiln_http_port
    grpc_port = settings.kiln_grpc_port if grpc_port is None else grpc_port
    serve_grpc_port = grpc_port
    if tls is not None:  # Serve (and its replicas' direct-ingress ports) on loopback only
        host, port = "127.0.0.1", free_port()
        if not settings.embedded:  # a cluster's HAProxy may need to reach other machines
            host = settings.kiln_tls_inner_host
        serve_grpc_port = free_port() if grpc_port else 0
    if not settings.embedded:  # a running Serve keeps its binding; TLS needs it on loopback
        port, serve_grpc_port = cluster_serve_ports(
            tls is not None, host, port, serve_grpc_port, NAMESPACE
        )
    running = running_serve_port()  # serve.start keeps a running Serve's first binding
    inner_grpc_port = serve_grpc_port  # where gRPC is answered (behind TLS: a loopback port)
    serve_port = port
    direct = direct_ingress(settings, serve_args, tls is not None)
    if direct and running == port and settings.kiln_ingress == "auto":
        # A Serve this process (or the user) started already answers the port: auto keeps it.
        logger.info("Serve's ingress already listens on port %s: HTTP ingress stays Serve's", port)
        direct = False
    if direct:
        # The replicas answer `port` themselves (serving/direct.py); Serve's ingress another.
        if running == port:
            raise KilnError(
                f"Serve's ingress already listens on port {port}; stop it (serve shutdown) "
                "for --ingress direct, or use --ingress serve"
            )
        serve_args.update(direct_host=host, direct_port=port)
        serve_port = running or free_port()
        if serve_grpc_port:  # the replicas answer gRPC too; Serve's gRPC ingress stays off
            if running_serve_grpc_port() == serve_grpc_port:
                raise KilnError(
                    f"Serve's gRPC ingress already listens on port {serve_grpc_port}; stop it "
                    "(serve shutdown) for --ingress direct, or use --ingress serve"
                )
            serve_args["direct_grpc_port"] = serve_grpc_port
            serve_grpc_port = 0
    elif running is not None and settings.embedded:
        port = serve_port = running
    serve.start(
        http_options={"host": host, "port": serve_port},
        grpc_options=grpc_options(serve_grpc_port),
    )
    serve_args.setdefault("feedback_shards", settings.kiln_feedback_shards)
    serve_args.setdefault("feedback_index_ids", settings.kiln_feedback_index_ids)
    serve_args.setdefault("grpc_front", settings.kiln_grpc_front)
    serve.run(build_app({"models": refs, **serve_args}), name=APP_NAME, route_prefix="/")
    # serve.run returns once replicas are healthy; check the proxy routes to them too.
    if tls is None or settings.embedded:  # a cluster's frontends check their own node's
        httpx.get(f"http://{host}:{port}/docs", timeout=30).raise_for_status()
    if tls is None:
        return f"http://{host}:{port}"
    if not settings.embedded:  # a TLS frontend on each node with a Serve proxy
        listeners = [(settings.kiln_http_port, port, "http/1.1")]
        if grpc_port and inner_grpc_port:
            listeners.append((grpc_port, inner_grpc_port, "h2"))
        start_node_fronts(tls, settings.kiln_http_host, listeners, NAMESPACE)
        return f"https://{public_host(settings.kiln_http_host)}:{settings.kiln_http_port}"
    FRONTENDS.append(
        TlsFrontend(tls, settings.kiln_http_host, settings.kiln_http_port, port).start()
    )
    if grpc_port:  # gRPC needs HTTP/2 negotiated by ALPN; TCP mode passes its frames as they are
        FRONTENDS.append(
            TlsFrontend(tls, settings.kiln_http_host, grpc_port, inner_grpc_port, "h2").start()
        )
    return f"https://{public_host(settings.kiln_http_host)}:{settings.kiln_http_port}"


def direct_ingress(settings: Settings, serve_args: dict[str, Any], tls: bool) -> bool:
    """Whether the replicas answer the HTTP port themselves (settings.kiln_ingress, resolved).

    auto: direct on the embedded Ray with a fixed replica count. Serve's autoscaler counts the
    requests its own ingress routes, so autoscaling keeps Serve's ingress; so does a cluster,
    where Serve's ingress answers on every node and a node without a replica would not.
    """
    autoscaling = serve_args.get("min_replicas") is not None or serve_args.get("max_replicas")
    choice = settings.kiln_ingress
    if choice == "serve" or (choice == "auto" and (autoscaling or not settings.embedded)):
        return False
    if autoscaling:
        raise KilnError(
            "--ingress direct serves a fixed number of replicas (Serve's autoscaler sees only "
            "the requests its own ingress routes); give --num-replicas N, or --ingress serve"
        )
    if tls and not settings.embedded:
        raise KilnError(
            "--ingress direct with TLS runs on the embedded Ray only; on a cluster use "
            "--ingress serve"
        )
    return True


def running_serve_port() -> int | None:
    """The HTTP port of the Serve instance already running on the connected Ray, if any."""
    client = running_serve()
    return None if client is None else int(client.http_config.port)


def running_serve_grpc_port() -> int | None:
    """The gRPC port of a running Serve with Kiln's servicer, if any."""
    client = running_serve()
    if client is None:
        return None
    running = ray.get(client._controller.get_grpc_config.remote())
    return int(running.port) if running.grpc_servicer_functions else None


def running_serve() -> Any:
    """Serve's client on the connected Ray when Serve runs there; None when it does not."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False)


def grpc_options(port: int) -> dict[str, Any] | None:
    """Serve's gRPC ingress on `port` with Kiln's V2 servicer (serving/grpc_v2.py); None
    (Serve's default: no gRPC servicer, no gRPC port) for port 0."""
    if not port:
        return None
    from kiln.serving.grpc_v2 import SERVICER

    return {"port": port, "grpc_servicer_functions": [SERVICER]}


FRONTENDS: list[TlsFrontend] = []
"""The TLS frontends this process started (stopped at its exit: cluster/tls.py)."""


def public_host(host: str) -> str:
    """The address a client on this machine uses for `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def resolve_all(registry: Any, refs: list[str], backend: str = "auto") -> list[VersionRecord]:
    """Resolve every reference through the Registry actor (its KilnError, unwrapped) and check
    that `backend` can serve each version (kiln.training.export.serving_backend)."""
    with unwrapped_errors():
        records: list[VersionRecord] = ray.get([registry.resolve.remote(ref) for ref in refs])
    for ref, record in zip(refs, records, strict=True):
        serving_backend(record.spec, record.artifacts, backend, ref)
    return records


def current_args() -> dict[str, Any]:
    """The live arguments of the running Kiln app, asked of its ingress deployment."""
    try:
        handle = serve.get_app_handle(APP_NAME)
    except Exception as exc:  # Serve raises several types when no app runs
        raise KilnError("no Kiln application is being served; start one with kiln serve") from exc
    return handle.current_args.remote().result(timeout_s=30)


def served_stable_refs() -> dict[str, str]:
    """Model name -> the exact version (`name@N`) the running replicas answer its name with."""
    handle = serve.get_app_handle(APP_NAME)
    return handle.stable_refs.remote().result(timeout_s=30)  # type: ignore[no-any-return]


def pin_bare_names(args: dict[str, Any]) -> dict[str, Any]:
    """Served bare names replaced by the versions they answer with now: a bare name resolves to
    the latest version at every reconfigure, so without this, registering a new version and
    then changing anything (a canary) would move production to it."""
    if all("@" in ref for ref in args["models"]):
        return args
    stable = served_stable_refs()
    args["models"] = [ref if "@" in ref else stable.get(ref, ref) for ref in args["models"]]
    return args


def update_app(
    settings: Settings, args: dict[str, Any], action: str, target: str, key: str | None
) -> dict[str, Any]:
    """Redeploy with new live arguments: Serve reconfigures the replicas in place."""
    registry = registry_for(settings)
    ray.get(registry.record_event.remote(action, target, {"canary": args.get("canary")}, key))
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    return args


def deploy_canary(
    settings: Settings, name: str, version: int, weight: int, key: str | None = None
) -> dict[str, Any]:
    """Send `weight`% of `name`'s traffic to `name@version`; its alias `canary` moves there."""
    check_canary_weight(weight)
    args = pin_bare_names(current_args())
    if not any(ref.partition("@")[0] == name for ref in args["models"]):
        raise KilnError(f"{name} is not served; serve it first (kiln serve {name})")
    registry = registry_for(settings)
    # Refuses an unknown version, or one the served backend cannot run.
    resolve_all(registry, [f"{name}@{version}"], str(args.get("backend", "auto")))
    ray.get(registry.set_alias.remote(name, "canary", version, key))
    args["canary"] = {
        **args.get("canary", {}),
        name: {"ref": f"{name}@{version}", "weight": weight},
    }
    return update_app(settings, args, "deploy", f"{name}@{version}", key)


def check_canary_weight(weight: int) -> None:
    """A KilnError naming --canary-weight unless the serving schema accepts `weight`."""
    if not is_canary_weight(weight):
        raise KilnError(f'Got "{weight}" for --canary-weight. Use 0 to 100.')


def promote(settings: Settings, name: str, key: str | None = None) -> dict[str, Any]:
    """The canary becomes `production` and takes all traffic; the old one is kept as `previous`."""
    args = current_args()
    canary = args.get("canary", {}).get(name)
    if canary is None:
        raise KilnError(
            f"{name} has no canary to promote; deploy one with kiln deploy {name} --version N"
        )
    registry = registry_for(settings)
    new = ray.get(registry.resolve.remote(canary["ref"]))
    old = ray.get(registry.resolve.remote(stable_ref(args, name)))
    ray.get(registry.set_alias.remote(name, "previous", old.version, key))
    ray.get(registry.set_alias.remote(name, "production", new.version, key))
    args["models"] = [new.ref if ref.partition("@")[0] == name else ref for ref in args["models"]]
    args["canary"] = {k: v for k, v in args["canary"].items() if k != name}
    return update_app(settings, args, "promote", new.ref, key)


def rollback(settings: Settings, name: str, key: str | None = None) -> dict[str, Any]:
    """Drop a live canary; without one, serve the `previous` production version again."""
    args = current_args()
    registry = registry_for(settings)
    if name in args.get("canary", {}):
        args["canary"] = {k: v for k, v in args["canary"].items() if k != name}
        return update_app(settings, args, "rollback", f"{name} canary", key)
    previous = ray.get(registry.resolve.remote(f"{name}@previous"))
    ray.get(registry.set_alias.remote(name, "production", previous.version, key))
    args["models"] = [
        previous.ref if ref.partition("@")[0] == name else ref for ref in args["models"]
    ]
    return update_app(settings, args, "rollback", previous.ref, key)


def stable_ref(args: dict[str, Any], name: str) -> str:
    return next(ref for ref in args["models"] if ref.partition("@")[0] == name)


def serve_config(serve_args: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """A Serve config (the `serve deploy` schema, also a RayService's serveConfigV2)."""
    defaults = ServeArgs(models=["_"]).model_dump()
    args = {k: v for k, v in serve_args.items() if k == "models" or v != defaults.get(k)}
    grpc = grpc_options(settings.kiln_grpc_port)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": settings.kiln_http_port},
        **({"grpc_options": grpc} if grpc else {}),
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "kiln.serving.app:build_app",
                "args": args,
            }
        ],
    }


def write_serve_config(path: str, serve_args: dict[str, Any], settings: Settings) -> None:
    import yaml

    header = (
        "# Kiln Serve config: `serve deploy` it to a cluster where Kiln is installed (see\n"
        "# cluster_configs/), or paste it as a KubeRay RayService's serveConfigV2.\n"
    )
    with open(path, "w") as out:
        out.write(header + yaml.safe_dump(serve_config(serve_args, settings), sort_keys=False))
