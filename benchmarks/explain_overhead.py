"""What `:explain` costs predict: light-model requests/s at 64 connections, with and without an
explanation every second.

One replica with one CPU serves the light model of benchmarks/serve_throughput.py (MLP
64->256->10) as `kiln serve` runs it. wrk (64 connections, one row per request) measures
predict's requests/s for `--duration-s`; in the "with" windows a client thread posts one
`:explain` a second meanwhile (integrated gradients, 50 steps, `--explain-rows` rows: the
default request). Windows come in `--pairs` pairs, without and with, their order alternating so
that a drift of the machine's load falls on both; `explain_predict_ratio` is the median of the
pairs' ratios (with / without), robust to a burst of other work on a shared machine, and
`total_ratio` all the "with" requests over all the "without" ones. `--explain-in thread`
explains on a thread of the replica instead of Kiln's ExplainWorker actor (serving/explain.py).

    python benchmarks/explain_overhead.py                 # 10 pairs of 3 s, about 1.5 minutes
    python benchmarks/explain_overhead.py --smoke-test    # 2 pairs of 2 s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.serve_throughput import ensure_wrk, model_files, run_wrk  # noqa: E402
from kiln.serving.explain import EXPLAIN_IN_ENV  # noqa: E402

MODEL = "bench-light"
CONNECTIONS = 64


class ExplainEverySecond:
    """A thread that posts one `:explain` a second until stopped; records status and latency."""

    def __init__(self, url: str, rows: int, n_steps: int) -> None:
        rng = np.random.default_rng(0)
        self.body = {"instances": rng.normal(size=(rows, 64)).round(3).tolist(), "n_steps": n_steps}
        self.url = f"{url}/v1/models/{MODEL}:explain"
        self.stop = threading.Event()
        self.results: list[tuple[int, float]] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                status = client.post(self.url, json=self.body).status_code
                took = time.perf_counter() - started
                self.results.append((status, took))
                self.stop.wait(max(0.0, 1.0 - took))

    def __enter__(self) -> ExplainEverySecond:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from kiln.runtime import registry_for, serve_env, shutdown_ray
    from kiln.serving_control import deploy_models
    from kiln.settings import Settings

    os.environ.update(serve_env())
    os.environ[EXPLAIN_IN_ENV] = args.explain_in  # replicas inherit it from Ray's start
    settings = Settings(
        kiln_home=Path(tempfile.mkdtemp(prefix="kiln-explain-bench-")), kiln_http_port=8432
    )
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        registry = registry_for(settings)
        files = model_files("light")
        ray.get(registry.register.remote(MODEL, files, json.loads(files["spec.json"]), {}, {}))
        url = deploy_models(settings, [MODEL], auth=False, num_cpus=1, num_replicas=1)
        predict_url = f"{url}/v1/models/{MODEL}:predict"
        run_wrk(predict_url, 4, 1)  # warm-up
        with ExplainEverySecond(url, args.explain_rows, args.n_steps):  # the explainer's too
            time.sleep(2.0)
        without, with_explain, explains = [], [], []
        for pair in range(args.pairs):
            # Alternate which goes first, so a drift of the machine's load falls on both.
            for explaining in (False, True) if pair % 2 == 0 else (True, False):
                if not explaining:
                    without.append(run_wrk(predict_url, CONNECTIONS, args.duration_s))
                    continue
                with ExplainEverySecond(url, args.explain_rows, args.n_steps) as explainer:
                    with_explain.append(run_wrk(predict_url, CONNECTIONS, args.duration_s))
                explains.extend(explainer.results)
    finally:
        shutdown_ray()
    ratios = sorted(w["rps"] / wo["rps"] for w, wo in zip(with_explain, without, strict=True))
    latencies = sorted(t for _, t in explains)
    return {
        "explain_predict_ratio": round(statistics.median(ratios), 3),
        "pair_ratio_min": round(min(ratios), 3),
        "pair_ratio_max": round(max(ratios), 3),
        "pair_ratios": [round(r, 3) for r in ratios],
        "total_ratio": round(
            sum(r["rps"] for r in with_explain) / sum(r["rps"] for r in without), 3
        ),
        "rps_without": [round(r["rps"], 1) for r in without],
        "rps_with": [round(r["rps"], 1) for r in with_explain],
        "p99_ms_without": round(statistics.median(r["p99_ms"] for r in without), 1),
        "p99_ms_with": round(statistics.median(r["p99_ms"] for r in with_explain), 1),
        "non_2xx": sum(r["non_2xx"] for r in without + with_explain),
        "explains": len(explains),
        "explains_ok": sum(1 for s, _ in explains if s == 200),
        "explain_p50_ms": round(1000 * latencies[len(latencies) // 2], 1) if latencies else None,
        "explain_in": args.explain_in,
        "explain_rows": args.explain_rows,
        "n_steps": args.n_steps,
        "connections": CONNECTIONS,
        "duration_s": args.duration_s,
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--duration-s", type=int, default=3)
    parser.add_argument("--explain-rows", type=int, default=1)
    parser.add_argument("--n-steps", type=int, default=50)
    parser.add_argument(
        "--explain-in",
        choices=("worker", "thread"),
        default="worker",
        help="worker: Kiln's ExplainWorker actor; thread: a thread of the replica (compared).",
    )
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.pairs, args.duration_s = 2, 2
    ensure_wrk()
    print(json.dumps(measure(args)), flush=True)


if __name__ == "__main__":
    main()
