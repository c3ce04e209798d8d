"""A model's latency profile: p50/p99 of batch-1 and batch-64 forward passes and rows/s.

`kiln models compare` shows it and the SLO choice in `kiln serve` predicts from it, so every
registered version gets one (cluster/profiling.py runs this in a Ray task shaped like one
serving replica). Every registration pays for it, so it is bounded in time: after a short
warm-up each batch size runs for its share of `budget_s` and at least its minimum count of
passes, but never past its share of `max_s` (a model whose batch of 64 takes a second stops
early; the counts it reached are recorded beside the figures). Pure: the caller hands in a
forward function (a loaded replica's, torch or ONNX Runtime) and sets the threads.
"""

from __future__ import annotations

import functools
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 64)
"""Batch 1 is one request served alone; 64 is the serving default `max_batch_size`."""

Forward = Callable[[np.ndarray], Any]
Clock = Callable[[], float]


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    """How long a profile may take and how many passes it aims for."""

    budget_s: float = 0.5
    """Seconds of timed passes in all (warm-up excluded), shared between the batch sizes."""
    max_s: float = 3.0
    """Hard cap, shared the same way: a slow model stops here, below its minimum counts."""
    min_passes: tuple[int, int] = (100, 20)
    """Passes aimed for at batch 1 and batch 64, where the cap allows."""
    max_passes: int = 20_000
    """At most this many passes per batch size (a tiny model would run its share anyway)."""
    warmup_passes: int = 3
    share_b1: float = 0.4
    """Share of both budgets for batch 1 (the rest for batch 64)."""

    def __post_init__(self) -> None:
        if self.budget_s <= 0 or self.max_s < self.budget_s:
            raise ValueError(f"need 0 < budget_s <= max_s; got {self.budget_s}, {self.max_s}")
        if not 0 < self.share_b1 < 1:
            raise ValueError(f"share_b1 must lie in (0, 1); got {self.share_b1}")
        if min(self.min_passes) < 1 or self.max_passes < max(self.min_passes):
            raise ValueError(f"need 1 <= min_passes <= max_passes; got {self.min_passes}")


def measure_latency(
    forward: Forward,
    num_inputs: int,
    threads: int,
    backend: str = "torch",
    config: ProfileConfig | None = None,
    clock: Clock = time.perf_counter,
) -> dict[str, Any]:
    """Time `forward` on zero rows of `num_inputs` values (valid raw input for every model:
    slot 0 of a categorical) at batch 1 and 64; returns the profile as a flat JSON-ready dict.

    Keys: `b1_p50_ms`, `b1_p99_ms`, `b64_p50_ms`, `b64_p99_ms`, `rows_per_s_b64` (64 rows over
    the mean batch-64 pass), `passes_b1`, `passes_b64`, `complete` (both minimum counts were
    reached), `cpu_model`, `threads`, `torch_version`, `backend`, `measured_at` (epoch s),
    `duration_s`.
    """
    cfg = config or ProfileConfig()
    started = clock()
    profile: dict[str, Any] = {}
    mean_s: dict[int, float] = {}
    complete = True
    for batch, minimum, share in zip(
        BATCH_SIZES, cfg.min_passes, (cfg.share_b1, 1 - cfg.share_b1), strict=True
    ):
        rows = np.zeros((batch, num_inputs), dtype=np.float32)
        for _ in range(cfg.warmup_passes):
            forward(rows)
        times_s = timed_passes(
            functools.partial(forward, rows),
            minimum,
            cfg.budget_s * share,
            cfg.max_s * share,
            cfg.max_passes,
            clock,
        )
        complete = complete and len(times_s) >= minimum
        profile.update(summarise(batch, times_s))
        mean_s[batch] = float(np.mean(times_s))
    profile["rows_per_s_b64"] = round(BATCH_SIZES[1] / max(mean_s[BATCH_SIZES[1]], 1e-12), 2)
    return {
        **profile,
        "complete": complete,
        **environment(threads, backend),
        "duration_s": round(clock() - started, 4),
    }


def timed_passes(
    run: Callable[[], Any],
    minimum: int,
    budget_s: float,
    cap_s: float,
    max_passes: int,
    clock: Clock,
) -> list[float]:
    """Seconds of each call of `run`: until both `minimum` calls and `budget_s` are reached, or
    `cap_s` (at least one call), or `max_passes`."""
    times_s: list[float] = []
    begun = clock()
    while len(times_s) < max_passes:
        before = clock()
        run()
        after = clock()
        times_s.append(after - before)
        elapsed = after - begun
        if elapsed >= cap_s or (len(times_s) >= minimum and elapsed >= budget_s):
            break
    return times_s


def summarise(batch: int, times_s: list[float]) -> dict[str, Any]:
    """p50/p99 (ms) and the count of one batch size's passes."""
    ms = np.asarray(times_s, dtype=np.float64) * 1000.0
    return {
        f"b{batch}_p50_ms": round(float(np.percentile(ms, 50)), 4),
        f"b{batch}_p99_ms": round(float(np.percentile(ms, 99)), 4),
        f"passes_b{batch}": len(times_s),
    }


def environment(threads: int, backend: str) -> dict[str, Any]:
    """What the figures depend on besides the model: the CPU, threads, library, backend."""
    return {
        "cpu_model": cpu_model(),
        "threads": int(threads),
        "torch_version": torch_version(),
        "backend": backend,
        "measured_at": time.time(),
    }


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def torch_version() -> str:
    try:
        import torch
    except ImportError:  # an ONNX-only environment
        return "none"
    return str(torch.__version__)
