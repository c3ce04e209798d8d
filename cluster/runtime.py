"""Connecting to Ray: an embedded local instance by default, or a cluster by address."""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from kiln.actors.registry import NAMESPACE, start_registry
from kiln.settings import Settings
from kiln.training.errors import KilnError

logger = logging.getLogger(__name__)

# Every Train worker and replica gets one BLAS thread: workers, not threads, use the cores.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Ray Train V2 holds every report() until its controller's next poll (2 s by default):
# measured here, a report took 1.6 s at the default and 0.13 s at 0.2 s. Kiln reports every
# epoch, so on small data the interval is the epoch's floor: `kiln train --data sklearn:iris`
# (300 epochs) trained in 41.2 s at 0.1, 24.9 s at 0.05 and 16.2 s at 0.02; but at 0.02 the
# polls cost busy 2-worker epochs about 10% (0.73-0.84 s against 0.65-0.74 s at 0.1, 400k rows),
# at 0.05 nothing measurable (0.65-0.73 s).
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.05"}
# Serve's HAProxy ingress (bundled with ray[serve] on Linux) instead of its Python proxy:
# measured here (benchmarks/serve_throughput.py), 3-4x the requests/s and a quarter of the
# latency. Fixed when Ray starts, so it applies to the embedded Ray; a cluster sets it on
# `ray start` (cluster_configs/ do). With it every stopping replica drains for at least
# RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s by default, time for an external load
# balancer to drop it): on one machine HAProxy reloads in well under a second, so 2 s, and
# `serve.shutdown` takes 3 s instead of 30.
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}
# HAProxy's stats and metrics ports and the fallback proxy's ports are fixed numbers by
# default (8404, 9101, 8500, 9500): a second Ray with Serve on the machine (another `kiln`
# command, a test run) could not start its HAProxy. The embedded Ray takes free ones.
SERVE_PORT_VARS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)
# Each replica listens on a port of its own (Serve's direct ingress, which HAProxy forwards
# to), taken from 30000-31000 by default: two Rays with Serve on one machine handed out the
# same ports. The embedded Ray takes a window of 100 of its own (replicas on one machine).
DIRECT_INGRESS_WINDOW = 100
DIRECT_INGRESS_BASES = range(30000, 32700, DIRECT_INGRESS_WINDOW)
GRPC_OFFSET = 10000


def serve_env() -> dict[str, str]:
    """What the embedded Ray's Serve runs with: SERVE_ENV plus free ports of its own."""
    base = random.SystemRandom().choice(DIRECT_INGRESS_BASES)
    return {
        **SERVE_ENV,
        **{name: str(free_port()) for name in SERVE_PORT_VARS},
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(base),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(base + DIRECT_INGRESS_WINDOW),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(base + GRPC_OFFSET),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(base + GRPC_OFFSET + DIRECT_INGRESS_WINDOW),
    }


# Ports Kiln picks for itself come from below the replicas' windows (above) and the kernel's
# ephemeral range (32768-60999 on Linux), where the OS hands out port-0 binds and outgoing
# connections, and above Ray's worker ports (10002-19999). A port-0 pick once landed on
# 52365, Ray's default dashboard agent port: the next Ray on the machine took it and Serve's
# HAProxy could not restart.
PORT_RANGE = (20000, 30000)


def free_port() -> int:
    """A TCP port nothing listens on (checked on every interface), outside the ephemeral range."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*PORT_RANGE)
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # the range is full: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_ray(settings: Settings, debug: bool = False) -> bool:
    """Connect (or start) Ray; returns True when this call started it."""
    if ray.is_initialized():
        return False
    open_encryption(settings)
    for key, value in {**WORKER_ENV, **TRAIN_ENV}.items():
        os.environ.setdefault(key, value)
    if settings.embedded:
        for key, value in serve_env().items():
            os.environ.setdefault(key, value)
        start_embedded(settings.kiln_num_cpus or max(4, os.cpu_count() or 1), debug)
    else:
        ray.init(
            address=settings.ray_address,
            namespace=NAMESPACE,
            log_to_driver=debug,
            runtime_env={"env_vars": worker_env_vars()},
        )
    return True


def open_encryption(settings: Settings) -> None:
    """Check the storage's encryption before Ray starts: a store that holds encrypted files
    and no (or the wrong) KILN_MASTER_KEY stops the command here, in one line. With
    encryption on, KILN_ENCRYPT is set for the workers this process starts (Ray Train's
    checkpoints are sealed in the worker); a cluster's nodes need KILN_MASTER_KEY themselves.
    """
    from kiln.actors.storage import ArtifactStore
    from kiln.training.encryption import ENCRYPT_ENV

    if ArtifactStore(settings.storage_uri, encrypt=settings.kiln_encrypt).encrypted:
        os.environ[ENCRYPT_ENV] = "1"
        WORKER_ENV[ENCRYPT_ENV] = "1"


# The embedded Ray this process started itself (see start_embedded); shutdown_ray stops it.
EMBEDDED_NODE: list[Any] = []


def start_embedded(num_cpus: int, debug: bool) -> None:
    """Start a one-node Ray for this process and connect to it.

    `ray.init()` starts seven Python processes before the first task can run; on a 2-core
    machine it took 5.0 s. Three of them do nothing for an embedded Ray: the dashboard head
    (ray.init waits ~2 s for it to write its URL, and with include_dashboard=False it serves
    no page), the autoscaler's monitor (one fixed node), and the log monitor (only
    log_to_driver, i.e. --debug, reads it). Without them, and with the agents' ports chosen
    here (else the raylet waits for the agents to report theirs), the start took 3.5 s
    (benchmarks/exact_solve.py). This uses Ray's own node launcher (`ray._private.node.Node`,
    what `ray.init` and `ray.cluster_utils.Cluster` use; Ray is pinned to 2.60.x); if it
    fails, `ray.init` starts Ray as before.
    """
    node = None
    try:
        from ray._private.node import Node
        from ray._private.parameter import RayParams

        class EmbeddedNode(Node):
            def start_api_server(self, *, include_dashboard: Any, raise_on_failure: Any) -> None:
                return None  # no dashboard process (see above)

        params = RayParams(
            num_cpus=num_cpus,
            include_dashboard=False,
            no_monitor=True,
            include_log_monitor=debug,  # type: ignore[arg-type]  # Ray passes a bool too
            dashboard_agent_listen_port=free_port(),
            metrics_agent_port=free_port(),
            metrics_export_port=free_port(),
            runtime_env_agent_port=free_port(),
        )
        node = EmbeddedNode(params, head=True, shutdown_at_exit=False, spawn_reaper=True)
        ray.init(
            address=node.address,
            namespace=NAMESPACE,
            log_to_driver=debug,
            logging_level=logging.INFO if debug else logging.WARNING,
        )
    except Exception as exc:  # noqa: BLE001 (any failure of the private launcher: fall back)
        logger.info("starting Ray with ray.init (the embedded launcher failed: %s)", exc)
        if ray.is_initialized():
            ray.shutdown()
        if node is not None:
            node.kill_all_processes(check_alive=False, allow_graceful=False)
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            namespace=NAMESPACE,
            log_to_driver=debug,
            logging_level=logging.INFO if debug else logging.WARNING,
        )
        node = None  # ray.init's own node: ray.shutdown stops it
    EMBEDDED_NODE.append(node)
    atexit.register(stop_embedded)


def embedded_here() -> bool:
    """True when this process started the one-node Ray it is connected to through
    `init_ray` (`kiln` commands without --address): its driver shares the node with every
    worker."""
    return bool(EMBEDDED_NODE) and ray.is_initialized()


def stop_embedded() -> None:
    """Disconnect and stop the Ray that start_embedded started (a no-op when there is none)."""
    if ray.is_initialized():
        ray.shutdown()
    while EMBEDDED_NODE:
        node = EMBEDDED_NODE.pop()
        if node is not None:
            node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)


def worker_env_vars() -> dict[str, str]:
    """WORKER_ENV less the keys a Ray Job's own runtime env already sets.

    Inside a job, Ray merges the driver's runtime env into the job's and refuses any key set
    in both (`kiln submit --env OMP_NUM_THREADS=1 -- kiln train ...` would fail to start).
    The job's value reaches the workers anyway.
    """
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    job_env: dict[str, str] = {}
    if injected:
        try:
            job_env = (json.loads(injected).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            job_env = {}
    return {k: v for k, v in WORKER_ENV.items() if k not in job_env}


def shutdown_ray(stop_serve: bool = True) -> None:
    """Serve first, then Ray: an orderly stop leaves no replicas or raylets behind.

    With `stop_serve=False` only this process's connection closes: on a cluster, the
    applications a command deployed must outlive the command.
    """
    if stop_serve and serve_is_running():
        from ray import serve  # imported only when Serve runs: about 0.5 s

        serve.shutdown()
    ray.shutdown()
    stop_embedded()


def serve_is_running() -> bool:
    named = ray.util.list_named_actors(all_namespaces=True)
    return any(a["name"] == "SERVE_CONTROLLER_ACTOR" for a in named)


@contextmanager
def ray_session(settings: Settings, debug: bool = False) -> Iterator[None]:
    started = init_ray(settings, debug)
    try:
        yield
    finally:
        if started:
            shutdown_ray(stop_serve=settings.embedded)


def registry_for(settings: Settings):  # noqa: ANN201 (a Ray actor handle)
    """The Registry actor of this Ray instance, detached on a cluster and on the embedded Ray.

    Serve replicas, FeedbackStores and jobs find it by name, and a lookup by name does not
    keep a non-detached actor alive: on the embedded Ray it died as soon as the command that
    created it dropped its handle (`kiln serve` after deploying), and every keyed request
    answered 503 once the replicas' key cache expired (issue 29). Detached, it lives as long
    as the Ray it runs on; the embedded Ray's end (`stop_embedded`) ends it too.
    """
    return start_registry(str(settings.registry_db), settings.storage_uri, detached=True)


@contextmanager
def unwrapped_errors() -> Iterator[None]:
    """A KilnError raised in a task or actor, without Ray's wrapper (its remote traceback)."""
    try:
        yield
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, KilnError):
            raise exc.cause from None
        raise
