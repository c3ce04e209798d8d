"""Pure logic of cluster/runtime.py: no Ray."""

import json

from kiln.runtime import WORKER_ENV, worker_env_vars


def test_worker_env_leaves_out_keys_the_job_runtime_env_sets(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert worker_env_vars() == WORKER_ENV
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"OMP_NUM_THREADS": "2"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    got = worker_env_vars()
    assert "OMP_NUM_THREADS" not in got and got["MKL_NUM_THREADS"] == "1"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": None}))
    assert worker_env_vars() == WORKER_ENV
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert worker_env_vars() == WORKER_ENV


EMBEDDED_SCRIPT = """
import json, sys, tempfile
from pathlib import Path
import psutil, ray
from cluster import runtime
from kiln.settings import Settings

runtime.init_ray(Settings(kiln_home=Path(tempfile.mkdtemp())))
node = runtime.EMBEDDED_NODE[0]
pids = [p.process.pid for infos in node.all_processes.values() for p in infos]
pids += [c.pid for pid in pids for c in psutil.Process(pid).children(recursive=True)]  # agents
found = {
    "kinds": sorted(node.all_processes),
    "embedded": runtime.embedded_here(),
    "square": ray.get(ray.remote(lambda v: v * v).remote(7)),
    "metrics_port": ray._private.worker.global_worker.node.metrics_export_port,
}
runtime.shutdown_ray()
found["alive_after"] = [p for p in pids if psutil.pid_exists(p) and
                        psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
found["embedded_after"] = runtime.embedded_here()
print(json.dumps(found))
"""


def test_embedded_ray_starts_without_the_idle_processes_and_stops_whole():
    """The embedded Ray (start_embedded): no dashboard, autoscaler monitor or log monitor
    process; tasks run; Ray's metrics port is there (Serve's Prometheus metrics use it); every
    process it started is gone after shutdown_ray."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", EMBEDDED_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["square"] == 49 and found["embedded"] and not found["embedded_after"]
    assert "raylet" in found["kinds"] and "gcs_server" in found["kinds"]
    assert not {"dashboard", "monitor", "log_monitor"} & set(found["kinds"])
    assert found["metrics_port"] > 0
    assert found["alive_after"] == []
