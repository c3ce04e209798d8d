"""What each default-on feature of Kiln's request path costs the light model, A/B interleaved.

One Ray, one registry, the light model (MLP 64->256->10) on one single-CPU replica on
Kiln's default ingress (direct on this embedded Ray), as `benchmarks/serve_throughput.py`
deploys it. Each configuration is
deployed in turn and measured with wrk at c1 (p50) and c64 (requests/s); the whole list is
repeated `--rounds` times, so slow drift of a shared machine falls on every configuration
alike. Configurations (each differs from `all-on`, the defaults, in one feature):
  all-on        auth on (a key with predict:*), prediction log at 1.0, metrics on
  no-auth       auth off
  no-log        --log-sample 0
  no-metrics    metrics off
  all-off       auth, log and metrics off
Beside wrk's figures, the CPU time each process of this Ray spends per request at c64 (from
psutil: the replica, HAProxy, the registry, the FeedbackStore, Serve's controller, Ray's
metrics agent, raylet and GCS, the rest): on a shared machine
the CPU microseconds a request costs move far less with the load than requests/s do.
Prints one JSON line last: per configuration the median over rounds, and each feature's cost
as the ratio of all-on to the configuration without it (c64 req/s; c1 p50; c64 CPU us/request).

    python benchmarks/serve_features.py                 # about 3 minutes
    python benchmarks/serve_features.py --rounds 1 --duration-s 2 --configs all-on,all-off
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

from benchmarks.serve_throughput import ensure_wrk, model_files, run_wrk  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "all-on": {"auth": True, "log_sample": 1.0, "metrics": True},
    "no-auth": {"auth": False, "log_sample": 1.0, "metrics": True},
    "no-log": {"auth": True, "log_sample": 0.0, "metrics": True},
    "no-metrics": {"auth": True, "log_sample": 1.0, "metrics": False},
    "all-off": {"auth": False, "log_sample": 0.0, "metrics": False},
}
BODY = '{"instances": [[' + ", ".join(["1.5"] * 64) + "]]}"


def lua(key: str | None) -> str:
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"\n' if key else ""
    return (
        f"wrk.method = \"POST\"\nwrk.body = '{BODY}'\n"
        f'wrk.headers["Content-Type"] = "application/json"\n{auth}'
    )


ROLES = {
    "ServeReplica": "replica",
    "haproxy": "haproxy",
    "ProxyActor": "serve_proxy",
    "Registry": "registry",
    "FeedbackStore": "feedback_store",
    "ServeController": "serve_controller",
    "dashboard/agent.py": "metrics_agent",  # Ray's per-node agent: it exports the metrics
    "raylet": "raylet",
    "gcs_server": "gcs",
}


def cpu_by_role() -> dict[str, float]:
    """CPU seconds so far of every process this driver started (Ray's and theirs), by role."""
    import psutil

    totals: dict[str, float] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
            times = proc.cpu_times()
        except psutil.Error:
            continue
        role = next((r for k, r in ROLES.items() if k in cmd), "other")
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    return totals


def measured(target: str, connections: int, duration_s: int, script: str) -> dict[str, Any]:
    """wrk's figures and the CPU microseconds per request of each role over the run."""
    before = cpu_by_role()
    figures: dict[str, Any] = dict(run_wrk(target, connections, duration_s, script))
    after = cpu_by_role()
    requests = max(1.0, figures["rps"] * duration_s)
    per_role = {r: 1e6 * (after[r] - before.get(r, 0.0)) / requests for r in after}
    figures["cpu_us_per_request"] = {r: round(v, 1) for r, v in sorted(per_role.items())}
    figures["cpu_us_total"] = round(sum(per_role.values()), 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration-s", type=int, default=4)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--path", default="v1", choices=["v1", "v2"])
    args = parser.parse_args()
    ensure_wrk()
    import ray

    from kiln.runtime import registry_for, serve_env, shutdown_ray
    from kiln.serving_control import deploy_models
    from kiln.settings import Settings

    os.environ.update(serve_env())
    settings = Settings(
        kiln_home=Path(tempfile.mkdtemp(prefix="kiln-features-")), kiln_http_port=8433
    )
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    registry = registry_for(settings)
    files = model_files("light")
    ray.get(registry.register.remote("bench-light", files, json.loads(files["spec.json"]), {}, {}))
    admin = ray.get(registry.create_key.remote(["admin"]))["secret"]
    key = ray.get(registry.create_key.remote(["predict:*"], key=admin))["secret"]
    configs = args.configs.split(",")
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for name in configs:
            config = CONFIGS[name]
            url = deploy_models(
                settings, ["bench-light"], key=admin, num_cpus=1, num_replicas=1, **config
            )
            script = lua(key if config["auth"] else None)
            if args.path == "v1":
                target = f"{url}/v1/models/bench-light:predict"
            else:
                target = f"{url}/v2/models/bench-light/infer"
                script = script.replace(BODY, V2_BODY)
            run_wrk(target, 4, 1, script)  # warm-up
            c1 = measured(target, 1, args.duration_s, script)
            c64 = measured(target, 64, args.duration_s, script)
            runs[name].append(
                {"c1_p50_ms": c1["p50_ms"], "c64_rps": c64["rps"],
                 "c64_cpu_us": c64["cpu_us_total"], "c64_cpu": c64["cpu_us_per_request"],
                 "c1_cpu": c1["cpu_us_per_request"],
                 "non_2xx": c1["non_2xx"] + c64["non_2xx"], "at": time.time(),
                 "load": os.getloadavg()[0]}
            )  # fmt: skip
            print(name, runs[name][-1], file=sys.stderr, flush=True)
    shutdown_ray()
    median = {
        c: {
            k: statistics.median(r[k] for r in rs)
            for k in ("c1_p50_ms", "c64_rps", "c64_cpu_us", "load")
        }
        for c, rs in runs.items()
    }
    costs = {}
    if "all-on" in median:
        on = median["all-on"]
        for c in configs:
            if c != "all-on":
                costs[f"all-on_vs_{c}"] = {
                    "c64_rps": on["c64_rps"] / median[c]["c64_rps"],
                    "c1_p50": on["c1_p50_ms"] / median[c]["c1_p50_ms"],
                    "c64_cpu_us": on["c64_cpu_us"] / median[c]["c64_cpu_us"],
                }
    print(json.dumps({"path": args.path, "costs": costs, "median": median, "runs": runs,
                      "cpu": os.cpu_count()}))  # fmt: skip


V2_BODY = (
    '{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [['
    + ", ".join(["1.5"] * 64)
    + "]]}]}"
)

if __name__ == "__main__":
    main()
