"""A run's training data resident in ShardStore actors: a named dataset loaded earlier, or
the run's URI loaded for it.

Light on imports (no torch, no Ray Train): `kiln train` starts loading the shards while its
own torch import finishes on another thread.
"""

from __future__ import annotations

import math
from dataclasses import replace

from kiln.actors.shards import Dataset, attach_dataset, load_dataset, looks_like_dataset_name
from kiln.actors.sources import SourceSpec, source_rows
from kiln.requests import TrainRequest
from kiln.resources import worker_cpus
from kiln.training.errors import KilnError


def resident_data(request: TrainRequest) -> Dataset:
    """A named dataset loaded earlier (shared, not reloaded), else load the URI for this run.
    A --cpus-per-worker the cluster cannot give fails first, before any data loads."""
    worker_cpus(request.train)
    attached = attach_dataset(request.data) if looks_like_dataset_name(request.data) else None
    if attached is not None:
        shards = len(attached.train.handles)
        if request.train.resolved_solver == "minibatch" and request.train.workers > shards:
            raise KilnError(
                f'Got "{request.train.workers}" for --workers, but dataset "{request.data}" has '
                f"{shards} shards. Use --workers {shards} or fewer, or reload it with more shards."
            )
        return attached
    source = request.source
    if request.train.resolved_solver != "minibatch":
        # The convex solvers fit every non-test row and stop on their own criterion: a
        # validation split would be two more shard processes holding rows merged back anyway.
        source = replace(source, val_fraction=0.0)
        return load_dataset(source, convex_shards(source, request.train.workers))
    return load_dataset(source, request.train.workers)


ROWS_PER_CONVEX_SHARD = 250_000
"""Training rows per shard process for the exact and L-BFGS solvers (no Train workers read
them: the shards compute the statistics and loss sums themselves, in parallel)."""


def convex_shards(source: SourceSpec, most: int) -> int:
    """Training shards for a convex fit: one per ROWS_PER_CONVEX_SHARD rows, at most `most`
    (--workers); `most` when the row count is unknown before reading (CSV, Arrow files).

    Each shard is a process: on a 2-core machine a second one for diabetes' 353 rows cost
    1.5 s of CPU and computed nothing faster (benchmarks/exact_solve.py)."""
    rows = source_rows(source)
    if rows is None:
        return most
    return max(1, min(most, math.ceil(rows / ROWS_PER_CONVEX_SHARD)))
