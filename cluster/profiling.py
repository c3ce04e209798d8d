"""Latency profiles measured in a Ray task shaped like one serving replica, and recorded.

Every registration through `kiln.pipeline.register_model` (trained, tuned and compressed
versions alike) gets a torch profile this way; `kiln models profile REF [--backend ...]`
measures one again (or for the ONNX Runtime backend). The task holds the CPUs of one serving
replica (`ServeArgs.num_cpus`, default 1) and runs that many torch threads, and it loads the
version exactly as a replica does (`ModelReplica`: verified artifacts, the same forward), so
the figures are those a replica would see on that node. A profile that cannot be measured
never loses a registration: the version stays registered without one, with a warning that
says how to measure it later.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray

from kiln.actors.catalog import VersionRecord
from kiln.runtime import embedded_here, unwrapped_errors
from kiln.settings import Settings
from kiln.training.errors import KilnError
from kiln.training.export import serving_backend
from kiln.training.profile import ProfileConfig, measure_latency

DEFAULT_BACKEND = "torch"
REPLICA_CPUS = 1.0
"""CPUs of one serving replica by default (`ServeArgs.num_cpus`, `kiln serve --num-cpus`)."""
PROFILE_TIMEOUT_S = 60.0
"""How long a registration waits for a free CPU and the measurement before it gives up."""

logger = logging.getLogger(__name__)


def profile_threads(num_cpus: float) -> int:
    """Torch threads of a replica holding `num_cpus` CPUs (a fractional share runs one)."""
    return max(1, int(num_cpus))


def measure_version(
    record: VersionRecord,
    storage_uri: str,
    backend: str = DEFAULT_BACKEND,
    num_cpus: float = REPLICA_CPUS,
    config: ProfileConfig | None = None,
) -> dict[str, Any]:
    """Load `record` as a serving replica does and measure it, in this process (the Ray task's
    body; also what an embedded client without Ray runs). The thread count is restored after."""
    import torch

    from kiln.actors.replica import ModelReplica

    threads = profile_threads(num_cpus)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        replica = ModelReplica(record, storage_uri, gpu="off", backend=backend, num_cpus=threads)
        return measure_latency(
            replica.forward, replica.num_inputs, threads, replica.backend, config
        )
    finally:
        torch.set_num_threads(previous)


measure_task = ray.remote(max_retries=1)(measure_version)
"""`measure_version` as a Ray task (its CPUs are set per call)."""


def profile_version(
    target: Settings | str,
    record: VersionRecord,
    backend: str = DEFAULT_BACKEND,
    num_cpus: float = REPLICA_CPUS,
    registry: Any = None,
    timeout_s: float = PROFILE_TIMEOUT_S,
    key: str | None = None,
) -> dict[str, Any]:
    """Measure `record` in a Ray task with `num_cpus` CPUs and record the profile in the
    registry (`registry`, default this Ray's Registry actor; `key`: an admin API key when
    the catalog is written as one); returns the profile.

    `target` is the Kiln settings or the artifact storage URI. Raises KilnError when the
    cluster cannot give the task its CPUs or it does not finish within `timeout_s`.
    """
    storage_uri = target.storage_uri if isinstance(target, Settings) else target
    registry = registry if registry is not None else registry_handle(target)
    profile = run_measurement(record, storage_uri, backend, num_cpus, timeout_s)
    backend = profile["backend"]  # "auto" resolved to the backend that ran
    with unwrapped_errors():
        ray.get(registry.record_profile.remote(record.name, record.version, backend, profile, key))
    logger.info(
        "profiled %s (%s): batch 1 p50 %.3f ms, batch 64 p50 %.3f ms",
        record.ref,
        backend,
        profile["b1_p50_ms"],
        profile["b64_p50_ms"],
    )
    return profile


def import_profiler() -> None:
    """What a measurement imports (torch, the replica, ONNX Runtime's wrapper): about 3 s."""
    import kiln.actors.replica  # noqa: F401
    import kiln.training.profile  # noqa: F401


def warm_profiler() -> None:
    """Start importing what the registration's profile needs in an idle Ray worker, beside
    the data load, so the measurement at registration does not wait ~3 s for torch (on the
    embedded Ray, on a thread of this process, where the measurement runs).

    Measured: `kiln train --model ridge` on diabetes spent 4.1 s registering (the profile's
    fresh worker importing torch), ~1 s with this."""
    if embedded_here():
        threading.Thread(target=import_profiler, name="kiln-import-profiler", daemon=True).start()
    else:
        ray.remote(num_cpus=0)(import_profiler).remote()


def run_measurement(
    record: VersionRecord, storage_uri: str, backend: str, num_cpus: float, timeout_s: float
) -> dict[str, Any]:
    """`measure_version` as a Ray task holding `num_cpus` CPUs; its profile.

    On the embedded one-node Ray this process started, the measurement runs here instead:
    the node is this machine either way, the driver has torch loaded already, and a task's
    worker would import torch first (measured: `kiln train --model ridge` on diabetes spent
    2.5 of its 2.6 s of registration there, on a 2-core machine).
    """
    total = ray.cluster_resources().get("CPU", 0.0)
    if total < num_cpus:
        raise KilnError(
            f"this Ray cluster has {total:g} CPUs; a profile needs {num_cpus:g} (a replica's)"
        )
    if embedded_here():
        with unwrapped_errors():
            return measure_version(record, storage_uri, backend, num_cpus)
    task = measure_task.options(num_cpus=num_cpus)
    ref = task.remote(record, storage_uri, backend, num_cpus)
    try:
        with unwrapped_errors():
            return dict(ray.get(ref, timeout=timeout_s))
    except ray.exceptions.GetTimeoutError as exc:
        ray.cancel(ref, force=True)
        raise KilnError(
            f"profiling {record.ref} did not finish within {timeout_s:g} s (no free CPU?)"
        ) from exc


def registry_handle(target: Settings | str) -> Any:
    """The Registry actor: from the settings, or the named one already running."""
    if isinstance(target, Settings):
        from kiln.runtime import registry_for

        return registry_for(target)
    from kiln.actors.registry import NAMESPACE, REGISTRY_NAME

    return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)


def profile_at_registration(
    registry: Any, record: VersionRecord, backend: str = DEFAULT_BACKEND
) -> dict[str, Any] | None:
    """The registration hook: profile `record`, or warn and return None (it stays registered).

    A version the backend cannot run yet (an ONNX variant whose model.onnx is added after
    registration) is left to whoever adds the file (`kiln export` profiles it then)."""
    try:
        serving_backend(record.spec, record.artifacts, backend, record.ref)
    except KilnError as exc:
        logger.info("%s: no %s profile at registration (%s)", record.ref, backend, exc)
        return None
    try:
        storage_uri = ray.get(registry.get_storage_uri.remote())
        return profile_version(storage_uri, record, backend, registry=registry)
    except Exception as exc:  # a profile is a measurement: never worth losing the version for
        logger.warning(
            "%s is registered without a latency profile (%s); measure it with "
            "kiln models profile %s",
            record.ref,
            " ".join(str(exc).split())[:300],
            record.ref,
        )
        return None
