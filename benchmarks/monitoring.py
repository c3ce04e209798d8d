"""Monitoring's cost: the prediction log's capacity, and serving with logging and metrics on.

1. What one FeedbackStore absorbs: rows/s appended (light-model rows: 64 float inputs),
   flushes of 1,000 rows, in-process and through the actor (Arrow IPC over a Ray call), and
   what a replica spends per request to buffer a row and build the flush (`PredictionLog`).
2. Serving overhead: the light model (MLP 64->256->10, overhead-bound: the case where logging
   shows most) on one 1-CPU replica, wrk at 64 connections for `--duration-s`, alternately
   with the prediction log and Prometheus metrics on (`log_sample=1`, `metrics=True`, the
   defaults) and off (`log_sample=0`, `metrics=False`), `--rounds` times each; the ratio of
   the medians is `monitoring_overhead_ratio`, with every round's figure for the spread.

Prints one JSON line last; writes benchmarks/results/monitoring.png.

    python benchmarks/monitoring.py                 # about 3 minutes
    python benchmarks/monitoring.py --smoke-test    # 2 s rounds, 1 round each
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from benchmarks.serve_throughput import ensure_wrk, model_files, run_wrk  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def logged_items(requests: int, rows: int = 1) -> list[Any]:
    from kiln.serving.predlog import Logged

    rng = np.random.default_rng(0)
    x = rng.normal(size=(requests, rows, 64)).astype(np.float32)
    now = time.time()
    return [
        Logged("bench", 1, f"{i:016x}", now, 200, 1.0, rows, x[i], np.zeros(rows))
        for i in range(requests)
    ]


def store_capacity(flushes: int = 30, rows: int = 1000) -> dict[str, float]:
    """Rows/s one store writes (in-process and through the actor), and the replica's share."""
    import ray

    from kiln.actors.feedback import FeedbackService, feedback_stores, table_to_ipc
    from kiln.serving.predlog import PredictionLog, rows_table

    items = logged_items(flushes * rows)
    log = PredictionLog(lambda: [])
    log._task = object()  # no background loop: measure record() alone
    started = time.perf_counter()
    for item in items:
        log.record(item)
    record_us = (time.perf_counter() - started) / len(items) * 1e6
    started = time.perf_counter()
    batches = [table_to_ipc(rows_table(items[i * rows : (i + 1) * rows])) for i in range(flushes)]
    build_us = (time.perf_counter() - started) / len(items) * 1e6

    root = tempfile.mkdtemp(prefix="kiln-monitor-bench-")
    service = FeedbackService(root)
    started = time.perf_counter()
    for data in batches:
        service.append("bench", data)
    in_process = len(items) / (time.perf_counter() - started)

    # Through the actor, fresh ids (a store writes each id once).
    again = [
        table_to_ipc(rows_table(fresh(items[i * rows : (i + 1) * rows]))) for i in range(flushes)
    ]
    (store,) = feedback_stores(root + "-actor", 1)
    ray.get(store.ping.remote())
    started = time.perf_counter()
    ray.get([store.append.remote("bench", data) for data in again])
    through_actor = len(items) / (time.perf_counter() - started)
    ray.kill(store)
    return {
        "replica_record_us_per_request": record_us,
        "replica_flush_build_us_per_row": build_us,
        "store_rows_per_s_in_process": in_process,
        "store_rows_per_s_actor": through_actor,
    }


def fresh(items: list[Any]) -> list[Any]:
    from dataclasses import replace

    return [replace(item, request_id="b" + item.request_id[1:]) for item in items]


def serving_overhead(rounds: int, duration_s: int) -> dict[str, Any]:
    """wrk at c64 on the light model, monitoring on and off alternately."""
    import ray

    from kiln.runtime import registry_for
    from kiln.serving_control import deploy_models
    from kiln.settings import Settings

    settings = Settings(
        kiln_home=Path(tempfile.mkdtemp(prefix="kiln-monitor-bench-")), kiln_http_port=8432
    )
    registry = registry_for(settings)
    files = model_files("light")
    spec = json.loads(files["spec.json"])
    ray.get(registry.register.remote("bench-light", files, spec, {}, {}))
    modes = {
        "on": {"log_sample": 1.0, "metrics": True},
        "off": {"log_sample": 0.0, "metrics": False},
    }
    runs: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(rounds):
        for mode, options in modes.items():
            url = deploy_models(
                settings, ["bench-light"], auth=False, num_cpus=1, num_replicas=1, **options
            )
            target = f"{url}/v1/models/bench-light:predict"
            run_wrk(target, 4, 1)  # warm-up
            found = run_wrk(target, 64, duration_s)
            if found["non_2xx"]:
                raise RuntimeError(f"{found['non_2xx']} failed requests with monitoring {mode}")
            runs[mode].append(found["rps"])
    on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
    return {"rps_on": runs["on"], "rps_off": runs["off"], "monitoring_overhead_ratio": on / off}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=110)
    for x, mode in enumerate(("off", "on")):
        values = result[f"rps_{mode}"]
        axis.scatter([x] * len(values), values, color="tab:blue")
        axis.bar(x, statistics.median(values), alpha=0.3, color="tab:blue")
    axis.set_xticks([0, 1], ["monitoring off", "log + metrics on"])
    axis.set_ylabel("requests/s at 64 connections (light model)")
    axis.set_title(f"ratio of medians {result['monitoring_overhead_ratio']:.3f}")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=int, default=10)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.rounds, args.duration_s = 1, 2
    ensure_wrk()
    import ray

    from kiln.runtime import serve_env, shutdown_ray

    os.environ.update(serve_env())
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        capacity = store_capacity(flushes=5 if args.smoke_test else 30)
        overhead = serving_overhead(args.rounds, args.duration_s)
    finally:
        shutdown_ray()
    result = {**overhead, **capacity, "rounds": args.rounds, "duration_s": args.duration_s}
    path = RESULTS / "monitoring.png" if not args.smoke_test else Path(tempfile.mkdtemp()) / "m.png"
    plot(result, path)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
