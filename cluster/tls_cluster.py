"""TLS for `kiln serve --address ... --tls-*`: one TLS frontend per node that runs a Serve proxy.

On a cluster, Serve runs an ingress proxy on every node that holds a replica (and the head),
each bound to the same host and port. With TLS, Kiln binds those proxies to 127.0.0.1 on a
port of its choosing and starts, on each of their nodes, a `NodeTlsFront` actor pinned there
(NodeAffinitySchedulingStrategy, hard): it writes the certificate and key it is handed to a
mode-0600 file in a mode-0700 folder of that node and runs the bundled HAProxy TLS
terminator (cluster/tls.py) on the public host and port, forwarding to that node's loopback
Serve port. So no node answers in clear on the public port, and a node without a frontend
(one that joins after the deploy) answers nothing there: it fails closed, not open.

The key goes to each node in a method call (`start`), not in the actor's creation arguments:
Ray keeps an actor's creation task, arguments included, in the GCS for restarts, and a
frontend is therefore never restarted (max_restarts=0; a dead frontend closes its port; the
next `kiln serve` starts a new one). Ray's own traffic carries the key to the node, in clear
unless Ray's TLS (RAY_USE_TLS) is on: docs/security.md.

The frontends are detached, named `kiln-tls-front-<node id>` in the kiln namespace: on a
cluster `kiln serve` returns once the models answer, and they outlive it like the deployment.
A later `kiln serve` (with TLS or without) replaces them.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kiln.tls import TlsFiles, TlsFrontend, check_files
from kiln.training.errors import KilnError

FRONT_PREFIX = "kiln-tls-front-"
SERVE_WAIT_S = 120.0
"""How long a frontend waits for its node's Serve proxy to listen on the loopback port."""

logger = logging.getLogger(__name__)

Listener = tuple[int, int, str]
"""(public port, Serve's loopback port on the node, ALPN protocol: http/1.1 or h2 for gRPC)."""


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes a frontend writes on its node (no paths: they are the driver's)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    @classmethod
    def of(cls, files: TlsFiles) -> TlsMaterial:
        ca = files.client_ca.read_bytes() if files.client_ca is not None else None
        return cls(files.cert.read_bytes(), files.key.read_bytes(), ca)


class NodeFrontend(TlsFrontend):
    """A TLS frontend whose HAProxy ends with the actor that started it (even on SIGKILL)."""

    die_with_parent = True


def write_private(path: Path, data: bytes) -> Path:
    path.touch(mode=0o600)
    path.write_bytes(data)
    return path


def wait_listening(port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


@ray.remote(num_cpus=0, max_restarts=0)
class NodeTlsFront:
    """One node's TLS frontend: public host:port (TLS) -> 127.0.0.1:backend_port (Serve)."""

    def __init__(self) -> None:
        self.frontends: list[TlsFrontend] = []
        self.folder: Path | None = None

    def start(self, material: TlsMaterial, host: str, listeners: list[Listener]) -> dict[str, Any]:
        """Write the files (0600) and start a frontend per (public port, loopback port, ALPN)
        once this node's Serve listens there. Returns the node and the HAProxy process ids."""
        self.stop()
        self.folder = Path(tempfile.mkdtemp(prefix="kiln-tls-node-"))  # mode 0700
        files = TlsFiles(
            write_private(self.folder / "server.crt", material.cert),
            write_private(self.folder / "server.key", material.key),
            write_private(self.folder / "clients-ca.pem", material.client_ca)
            if material.client_ca is not None
            else None,
        )
        check_files(files)
        node = ray.get_runtime_context().get_node_id()
        for port, backend_port, alpn in listeners:
            if not wait_listening(backend_port, SERVE_WAIT_S):
                raise KilnError(
                    f"Serve's proxy on node {node[:12]} did not listen on 127.0.0.1:"
                    f"{backend_port} within {SERVE_WAIT_S:.0f} s"
                )
            self.frontends.append(NodeFrontend(files, host, port, backend_port, alpn).start())
        return {
            "node_id": node,
            "pids": [f.process.pid for f in self.frontends if f.process is not None],
            "folder": str(self.folder),
        }

    def stop(self) -> None:
        for frontend in self.frontends:
            frontend.stop()
        self.frontends = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def front_names(namespace: str) -> list[str]:
    """The names of the TLS frontends running in `namespace`."""
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == namespace and a["name"].startswith(FRONT_PREFIX)
    )


def stop_node_fronts(namespace: str) -> int:
    """Stop every TLS frontend a `kiln serve` left on the cluster; how many there were."""
    names = front_names(namespace)
    for name in names:
        try:
            actor = ray.get_actor(name, namespace=namespace)
        except ValueError:
            continue
        try:
            ray.get(actor.stop.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            logger.warning("TLS frontend %s did not stop in order: %s", name, exc)
        ray.kill(actor, no_restart=True)
    return len(names)


def proxy_nodes() -> list[str]:
    """The nodes Serve runs an ingress proxy on now (serve.status().proxies)."""
    from ray import serve

    return sorted(serve.status().proxies)


def start_node_fronts(
    tls: TlsFiles, host: str, listeners: list[Listener], namespace: str
) -> list[dict[str, Any]]:
    """A TLS frontend on each node with a Serve proxy; every one listening before it returns.
    `listeners`: (public port, Serve's loopback port, ALPN) for HTTP and, if on, gRPC."""
    stop_node_fronts(namespace)
    material = TlsMaterial.of(tls)
    nodes = proxy_nodes()
    if not nodes:
        raise KilnError("Serve runs no ingress proxy on any node; nothing to put TLS in front of")
    actors = [
        NodeTlsFront.options(  # type: ignore[attr-defined]
            name=f"{FRONT_PREFIX}{node}",
            namespace=namespace,
            lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote()
        for node in nodes
    ]
    try:
        started = ray.get([a.start.remote(material, host, listeners) for a in actors])
    except ray.exceptions.RayTaskError as exc:
        stop_node_fronts(namespace)
        if isinstance(exc.cause, KilnError):
            raise exc.cause from None
        raise
    logger.info("TLS frontends on %d node(s): %s", len(started), [s["node_id"] for s in started])
    return list(started)


def cluster_serve_ports(
    tls: bool, host: str, port: int, grpc_port: int, namespace: str
) -> tuple[int, int]:
    """The HTTP and gRPC ports Serve listens on for this deploy on a cluster, where Serve may
    run already (serve.start then keeps its first binding): with TLS, a running Serve's own
    loopback ports; refused where a running Serve listens in clear (or, without TLS, only on
    loopback)."""
    from ray.serve.context import _get_global_client

    if not tls:
        stopped = stop_node_fronts(namespace)
        if stopped:
            logger.warning("stopped the TLS frontends of %d node(s): serving in clear", stopped)
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return port, grpc_port
    running = client.http_config
    loopback = running.host in ("127.0.0.1", "localhost", "::1")
    if tls and not loopback and running.host != host:
        raise KilnError(
            f"Serve already listens in clear on {running.host}:{running.port}; stop it "
            "(serve shutdown) and run kiln serve --tls-* again"
        )
    if not tls and loopback and host not in ("127.0.0.1", "localhost", "::1"):
        raise KilnError(
            f"Serve listens on 127.0.0.1:{running.port} only (started for TLS); stop it "
            "(serve shutdown) and run kiln serve again, or keep --tls-*"
        )
    if not tls:
        return port, grpc_port
    running_grpc = ray.get(client._controller.get_grpc_config.remote())
    has_grpc = bool(running_grpc.grpc_servicer_functions)
    return int(running.port), int(running_grpc.port) if grpc_port and has_grpc else 0
