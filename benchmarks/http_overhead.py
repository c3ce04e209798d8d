"""What Kiln's HTTP path adds to a request: the constants of the SLO choice (serving/slo.py).

One replica with one CPU serves the light model (MLP 64->256->10, a forward pass of a few
microseconds a row) as `kiln serve` does (HAProxy ingress, batching on). wrk, on loopback:
  - one connection (one request at a time): p50/p99 latency; minus the forward pass's own
    batch-1 p50/p99 (its latency profile, measured in this process with one thread), that is
    the latency HTTP adds with nothing queued: `http_overhead_p50_ms`, `http_overhead_p99_ms`
    (`HTTP_OVERHEAD_MS` is the p99);
  - 64 connections: requests/s of the saturated replica; 1 s over it, less the batched
    forward's time per row, is the replica CPU one request's HTTP handling takes:
    `http_cpu_ms` (`HTTP_CPU_MS`).
Prints one JSON line last.

    python benchmarks/http_overhead.py                # about 1 minute
    python benchmarks/http_overhead.py --smoke-test   # 2 s per point
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from benchmarks.serve_throughput import ensure_wrk, model_files, run_wrk  # noqa: E402

NAME = "overhead-light"


def measure(duration_s: int) -> dict[str, Any]:
    import ray

    from kiln.profiling import measure_version
    from kiln.runtime import registry_for, serve_env, shutdown_ray
    from kiln.serving_control import deploy_models
    from kiln.settings import Settings

    os.environ.update(serve_env())
    settings = Settings(
        kiln_home=Path(tempfile.mkdtemp(prefix="kiln-overhead-bench-")), kiln_http_port=8432
    )
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        registry = registry_for(settings)
        files = model_files("light")
        spec = json.loads(files["spec.json"])
        record = ray.get(registry.register.remote(NAME, files, spec, {}, {}))
        forward = measure_version(record, settings.storage_uri)
        url = deploy_models(settings, [NAME], auth=False, num_cpus=1, num_replicas=1)
        target = f"{url}/v1/models/{NAME}:predict"
        run_wrk(target, 4, 1)  # warm-up
        alone = run_wrk(target, 1, duration_s)
        saturated = run_wrk(target, 64, duration_s)
    finally:
        shutdown_ray()
    return {
        "http_overhead_p50_ms": round(alone["p50_ms"] - forward["b1_p50_ms"], 3),
        "http_overhead_p99_ms": round(alone["p99_ms"] - forward["b1_p99_ms"], 3),
        "http_cpu_ms": round(1000.0 / saturated["rps"] - forward["b64_p50_ms"] / 64, 3),
        "c1": alone,
        "c64": saturated,
        "forward": {k: forward[k] for k in ("b1_p50_ms", "b1_p99_ms", "b64_p50_ms")},
        "cpu_model": forward["cpu_model"],
        "cores": os.cpu_count(),
        "duration_s": duration_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=int, default=15, help="seconds per wrk point")
    parser.add_argument("--smoke-test", action="store_true", help="2 s per point")
    args = parser.parse_args()
    ensure_wrk()
    print(json.dumps(measure(2 if args.smoke_test else args.duration_s)), flush=True)


if __name__ == "__main__":
    main()
