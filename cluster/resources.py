"""CPUs for Ray Train workers: what each one reserves, checked against what the cluster has.

A worker reserves `cpus_per_worker` CPUs in its ScalingConfig and runs as many torch threads
(training/loop.py caps them at its node's cores shared by the workers there). Left unset, a
worker reserves one CPU, Ray Train's default; `--cpus-per-worker 2` lets one worker on an idle
2-core node use both cores.
"""

from __future__ import annotations

import ray

from kiln.training.config import TrainConfig
from kiln.training.errors import KilnError


def resolve_cpus_per_worker(
    requested: int | None, workers: int, node_cpus: list[float], free_cpus: float
) -> int:
    """CPUs each of `workers` reserves; a request no node or no cluster could meet is an
    error naming the option and the fix."""
    largest, total = int(max(node_cpus, default=0)), int(sum(node_cpus))
    if requested is None:
        # Ray Train's own default. The share of the free CPUs (one worker taking both cores of
        # an idle node) was tried: under load two threads ran 8-14x slower than one, and the
        # `ray up` acceptance job hung with it (not yet diagnosed), so it waits for an idle
        # measurement before it becomes the default.
        return 1
    if requested > largest or requested * workers > total:
        fits = max(1, min(largest, total // workers))
        raise KilnError(
            f'Got "{requested}" for --cpus-per-worker, but the cluster has {total} CPUs '
            f"(at most {largest} on one node) for {workers} workers. "
            f"Use --cpus-per-worker {fits} or fewer, or fewer --workers."
        )
    return requested


def worker_cpus(cfg: TrainConfig) -> int:
    """`cfg.cpus_per_worker` resolved against the live cluster."""
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]]
    free = ray.available_resources().get("CPU", 0.0)
    return resolve_cpus_per_worker(cfg.cpus_per_worker, cfg.workers, node_cpus, free)
