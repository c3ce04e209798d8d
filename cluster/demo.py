"""`kiln demo`: load digits into shards, train on 2 workers, register, serve, query over HTTP.

Every step is the real one (Ray actors, Ray Train, the SQLite registry, Ray Serve, HTTP over
loopback); the demo only chooses the inputs and measures the result.
"""

from __future__ import annotations

import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from kiln.actors.shards import load_shards
from kiln.actors.sources import SourceSpec
from kiln.pipeline import ProgressFn, train_and_register
from kiln.requests import TrainRequest
from kiln.runtime import registry_for
from kiln.serving_control import deploy_models
from kiln.settings import Settings
from kiln.tls import TlsFiles
from kiln.training.config import TrainConfig

DEMO_DATA = "sklearn:digits"
DEMO_MODEL_NAME = "digits-mlp"


@dataclass
class LoadResult:
    predictions: list[Any]
    latencies_ms: list[float]


def query_endpoint(
    base_url: str, name: str, x: np.ndarray, concurrency: int = 8, ca_file: Path | None = None
) -> LoadResult:
    """One POST per row, `concurrency` at a time; keeps the order of rows. Over HTTPS the
    server's certificate is checked against `ca_file`."""
    url = f"{base_url}/v1/models/{name}:predict"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    verify: Any = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
    with httpx.Client(timeout=30, limits=limits, verify=verify) as client:

        def one(row: np.ndarray) -> tuple[Any, float]:
            started = time.perf_counter()
            response = client.post(url, json={"instances": [row.tolist()]})
            elapsed_ms = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            return response.json()["predictions"][0], elapsed_ms

        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, x))
    return LoadResult([p for p, _ in results], [ms for _, ms in results])


def run_demo(
    settings: Settings,
    cfg: TrainConfig,
    on_epoch: ProgressFn | None = None,
    on_step: Any = None,
    tls: TlsFiles | None = None,
) -> dict[str, Any]:
    """The whole demo inside an already connected Ray; returns the summary dict."""
    started = time.perf_counter()
    step = on_step or (lambda _: None)
    source = SourceSpec(uri=DEMO_DATA, test_fraction=0.2, seed=0)
    registry = registry_for(settings)
    request = TrainRequest(data=DEMO_DATA, source=source, train=cfg, name=DEMO_MODEL_NAME)
    outcome = train_and_register(settings, request, registry, on_epoch, step)
    step("serving")
    # The demo is a local show-and-tell: no keys to hand out, so auth is off (with a warning).
    # HTTP only: the demo queries over HTTP, and gRPC's port would be one more to collide on.
    base_url = deploy_models(settings, [outcome.record.ref], auth=False, tls=tls, grpc_port=0)
    step("querying")
    test = load_shards(source, "test", 1)
    try:
        _, x_test, y_test = test.read_arrays()
    finally:
        test.release()
    load = query_endpoint(base_url, DEMO_MODEL_NAME, x_test, ca_file=tls.cert if tls else None)
    served_accuracy = float(np.mean(np.asarray(load.predictions) == y_test))
    return {
        "test_accuracy": outcome.test_metrics["accuracy"],
        "served_accuracy": served_accuracy,
        "num_workers": outcome.num_workers,
        "model": DEMO_MODEL_NAME,
        "version": outcome.record.version,
        "p50_ms": float(np.percentile(load.latencies_ms, 50)),
        "p99_ms": float(np.percentile(load.latencies_ms, 99)),
        "num_requests": len(load.latencies_ms),
        "url": base_url,
        "elapsed_s": time.perf_counter() - started,
    }
