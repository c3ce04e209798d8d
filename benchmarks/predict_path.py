"""Where a light predict request's replica CPU goes, in one process, without HTTP or Ray.

The Serve app's ASGI stack (serving/app.py `api`: FastAPI with the lean predict middleware)
is called directly with one V1 `:predict` request of one row of 64 features for the light
model (MLP 64->256->10), the same request over and over. A configuration's cost is the
thread CPU time per request (`time.thread_time`: others' processes on a shared machine move
it far less than wall time), the configurations interleaved over `--rounds` rounds, the
least of its rounds kept (the median beside it); each round runs them in its own order. The
forward pass runs inline, as on an idle replica; the batch queue and HTTP (HAProxy, uvicorn)
are not in these figures.
Configurations:
  full            the FastAPI route (a query string sends the request past the lean path)
  full+override   the same with one dependency override present (an unused one), as
                  serving/app.py had one from 2026-11-30 to 2026-12-07: FastAPI then
                  rebuilds every dependency of the route on every request
  lean            the lean path (serving/lean.py)
  lean+auth       with a key checked from the replica's cache (serving/auth.py)
  lean+metrics    with Prometheus metrics (serving/metrics.py, Ray's metrics API)
  lean+log        with the prediction log (its flushes' predictions and Arrow tables
                  included; the FeedbackStore's own work is in another process)
  lean+all        auth, metrics and log: `kiln serve`'s defaults
  v2-json, v2-binary   V2 infer on the lean path with everything on
Prints one JSON line last: microseconds per request by configuration, and the differences
that are each feature's cost.

    python benchmarks/predict_path.py           # about 1 minute on an idle 2-core machine
    python benchmarks/predict_path.py --quick   # smoke, about 15 s
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


ROW = [1.5] * 64
V1_BODY = json.dumps({"instances": [ROW]}).encode()
V2_BODY = json.dumps(
    {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}
).encode()
V2_HEADER = json.dumps(
    {
        "inputs": [
            {"name": "features", "datatype": "FP32", "shape": [1, 64],
             "parameters": {"binary_data_size": 256}}
        ],
        "parameters": {"binary_data_output": True},
    }
).encode()  # fmt: skip
V2_BINARY = V2_HEADER + struct.pack("<64f", *ROW)
SECRET = "kiln_0123456789ab_" + "s" * 43


class FakeStore:
    """A FeedbackStore handle whose append is acknowledged at once."""

    class _Append:
        @staticmethod
        def remote(*_: Any) -> Any:
            future = asyncio.get_running_loop().create_future()
            future.set_result(None)
            return future

    append = _Append()
    append_usage = _Append()
    report_usage = _Append()


def build_host(log: bool, metrics: bool, home: Path) -> Any:
    """A ModelHost serving the light model from a registry in `home` (no Ray)."""
    from benchmarks.serve_throughput import model_files
    from kiln.actors.registry import RegistryService
    from kiln.actors.replica import ModelReplica
    from kiln.serving.host import ModelHost, Served
    from kiln.serving.metrics import ServingMetrics
    from kiln.serving.predlog import PredictionLog
    from kiln.serving.routing import Router
    from kiln.serving.schemas import ServeArgs

    if not (home / "registry.db").exists():
        service = RegistryService(str(home / "registry.db"), str(home / "store"), recover=False)
        files = model_files("light")
        service.register("bench-light", files, json.loads(files["spec.json"]), {}, {})
        service.close()
    service = RegistryService(str(home / "registry.db"), str(home / "store"), recover=False)
    record = service.resolve("bench-light")
    service.close()
    replica = ModelReplica(record, str(home / "store"))
    host = ModelHost(ServeArgs(models=["bench-light"], log_sample=0, metrics=False), None)
    router = Router()
    router.add(record.ref, default=True)
    host.served = Served({record.ref: replica}, router)
    if metrics:
        host.metrics = ServingMetrics()
    if log:
        host.log = PredictionLog(lambda: [FakeStore()], served_models=host.served_model_names)
    return host


CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"path": "/v1/models/bench-light:predict?full=1"},
    "full+override": {"path": "/v1/models/bench-light:predict?full=1", "override": True},
    "lean": {},
    "lean+auth": {"auth": True},
    "lean+metrics": {"metrics": True},
    "lean+log": {"log": True},
    "lean+all": {"auth": True, "metrics": True, "log": True},
    "v2-json": {"auth": True, "metrics": True, "log": True, "path": "/v2/models/bench-light/infer",
                "body": V2_BODY},
    "v2-binary": {"auth": True, "metrics": True, "log": True,
                  "path": "/v2/models/bench-light/infer", "body": V2_BINARY,
                  "headers": [(b"inference-header-content-length", str(len(V2_HEADER)).encode())]},
}  # fmt: skip


async def drive(api: Any, config: dict[str, Any], requests: int, host: Any) -> float:
    """Thread CPU microseconds per request of `requests` requests through `api`, the work the
    prediction log and the metrics leave for their flushes included: the event loop runs
    every 100 requests (the flush timers fire as in a replica), and what is still buffered
    at the end is flushed inside the timed span."""
    path, _, query = config.get("path", "/v1/models/bench-light:predict").partition("?")
    body = config.get("body", V1_BODY)
    headers = [(b"content-type", b"application/json"), *config.get("headers", [])]
    if config.get("auth"):
        headers.append((b"authorization", f"Bearer {SECRET}".encode()))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": query.encode(), "headers": headers,
        "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
    }  # fmt: skip
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for _ in range(50):  # warm-up
        await api(dict(scope), receive, send)
    await flush(host)
    gc.collect()  # the garbage of the configuration before is not this one's
    started = time.thread_time()
    for i in range(requests):
        await api(dict(scope), receive, send)
        if i % 100 == 99:
            await asyncio.sleep(0)
    await flush(host)
    spent = time.thread_time() - started
    if set(statuses) != {200}:
        raise SystemExit(f"{config}: answered {sorted(set(statuses))}")
    return 1e6 * spent / requests


async def flush(host: Any) -> None:
    """Hand over what the prediction log and the metrics hold (as their timers would)."""
    if host.log is not None:
        await host.log.flush()
    if host.metrics is not None:
        host.metrics.flush()


async def unused_dependency() -> None:
    """A dependency override that no route uses: its presence alone costs (see `full+override`)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500, help="Per configuration and round.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument(
        "--quick", action="store_true", help="300 requests x 2 rounds (a smoke run, ~15 s)."
    )
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds = 300, 2
    import tempfile

    import torch

    import kiln.serving.dependencies as replica_module
    import kiln.serving.host as host_module
    from kiln.actors.keys import KeyCheck
    from kiln.serving.app import api
    from kiln.serving.auth import BearerAuth

    torch.set_num_threads(1)
    # Every pass inline (Serve's batch queue needs a replica context): as an idle replica runs
    # the light model's one-row pass; the queue's own cost is not in these figures.
    host_module.INLINE_FORWARD_S = float("inf")
    home = Path(tempfile.mkdtemp(prefix="kiln-predict-path-"))
    hosts = {
        (log, metrics): build_host(log, metrics, home)
        for log in (False, True)
        for metrics in (False, True)
    }

    async def verify(_: str) -> KeyCheck:
        return KeyCheck(ok=True, reason="ok", key_id="0123456789ab", scopes=("predict:*",))

    auth = BearerAuth(verify)
    names = args.configs.split(",")
    runs: dict[str, list[float]] = {n: [] for n in names}

    async def run_all() -> None:
        for round_number in range(args.rounds):
            # Each round in its own order: a configuration's place in the round (after a
            # heavy one, say) should not be its cost.
            for name in random.Random(round_number).sample(names, len(names)):
                config = CONFIGS[name]
                host = hosts[(bool(config.get("log")), bool(config.get("metrics")))]

                # The routes find the replica's host and auth as in Serve
                # (serving/dependencies.py `serving_replica`), with no dependency override.
                serving = SimpleNamespace(host=host, auth=auth if config.get("auth") else None)
                replica_module.serving_replica = lambda: serving  # noqa: B023
                api.dependency_overrides.clear()
                if config.get("override"):
                    api.dependency_overrides[unused_dependency] = unused_dependency
                runs[name].append(await drive(api, config, args.requests, host))
                print(name, round(runs[name][-1], 1), file=sys.stderr, flush=True)

    async def run_and_close() -> None:
        await run_all()
        for host in hosts.values():
            if host.log is not None:
                await host.log.close()

    asyncio.run(run_and_close())
    # The least disturbed round of each: on a shared machine others' work only adds to the
    # thread CPU a request takes (cache misses, a shared core's other hyperthread).
    us = {n: round(min(v), 1) for n, v in runs.items()}
    median = {n: round(statistics.median(v), 1) for n, v in runs.items()}
    costs, shares = {}, {}
    for feature in ("auth", "metrics", "log", "all"):
        if f"lean+{feature}" in us and "lean" in us:
            costs[f"{feature}_us"] = round(us[f"lean+{feature}"] - us["lean"], 1)
            shares[f"{feature}_pct"] = round(100 * costs[f"{feature}_us"] / us["lean"], 1)
    print(json.dumps({"feature_pct_of_lean": shares, "feature_us": costs, "us_per_request": us,
                      "median_us": median, "runs": runs, "requests": args.requests,
                      "rounds": args.rounds, "load_avg_1m": os.getloadavg()[0],
                      "cpu": cpu_model()}))  # fmt: skip


def cpu_model() -> str:
    """The CPU's model name (the figures depend on it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
