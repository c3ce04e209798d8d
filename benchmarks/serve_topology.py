"""Serving topology by measurement: replicas, CPUs per replica, ingress, batching, event loop.

Kiln as `kiln serve` runs it (auth on with a predict key, prediction log on, metrics on; one
embedded Ray per ingress and event-loop setting, since both are fixed when Ray starts), the
light (MLP 64->256->10) and medium (64->4096->4096->10) models of serve_throughput.py, one
row per request. Each configuration is deployed, warmed up with wrk for `--warmup-s`, then
measured with `wrk -t1` at c1 (p50, p99) and c64 (requests/s) for `--duration-s` each.

The grid is searched in stages, each stage starting from the best of the one before (a full
product of every knob would take hours on a small machine):
  1. replicas x CPUs per replica (1, 2, 3, 4 replicas; 1 or 2 CPUs each, at most the
     machine's cores x 2 in all), batching as each replica chooses it from the model's
     latency profile (serving/batching.py), Kiln's direct ingress (serving/direct.py), uvloop;
  2. at the best of 1: `max_batch_size` x `batch_wait_timeout_s` (a grid of user values
     against the profile's own choice);
  3. at the best of 2: Serve's HAProxy ingress (`--ingress serve`) and Serve's Python proxy
     instead of the direct ingress, and asyncio's own event loop instead of uvloop
     (RAY_USE_UVLOOP=0). uvicorn's HTTP parser is httptools wherever it is
     installed (uvicorn's `http="auto"`); Serve does not let a deployment choose it.
"Best" is the most requests/s at c64; the c1 p50 is printed beside it. Prints a table and
one JSON line last: per model the best configuration with its figures, and every row.

    python benchmarks/serve_topology.py            # full sweep: ~25 min on an idle 2-core box
    python benchmarks/serve_topology.py --quick    # 1-2 replicas, 2 batchings, ~4 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from benchmarks.serve_features import lua  # noqa: E402
from benchmarks.serve_throughput import ensure_wrk, latency_ms, model_files  # noqa: E402

CORES = os.cpu_count() or 1
MODELS = ("light", "medium")
AUTO = None
"""A batching value left to the replica's latency profile."""


def grids(quick: bool) -> dict[str, Any]:
    """The values each stage tries (see the module docstring)."""
    if quick:
        return {
            "placements": [(1, 1), (2, 1)],
            "batchings": [(AUTO, AUTO), (64, 0.0)],
            "ingress": [("direct", True), ("ha", True)],
        }
    placements = [
        (replicas, cpus)
        for replicas in (1, 2, 3, 4)
        for cpus in (1, 2)
        if replicas * cpus <= 2 * CORES
    ]
    batchings = [
        (AUTO, AUTO),
        (1, 0.0),
        (16, 0.0),
        (64, 0.0),
        (256, 0.0),
        (64, 0.001),
        (64, 0.005),
        (256, 0.005),
    ]
    return {
        "placements": placements,
        "batchings": batchings,
        "ingress": [("direct", True), ("ha", True), ("python", True), ("direct", False)],
    }


def run_wrk(url: str, connections: int, duration_s: float, script: str) -> dict[str, float]:
    """`wrk -t1` for `duration_s`: requests/s, p50/p99 ms and non-2xx answers."""
    import re

    path = Path(tempfile.mkdtemp()) / "post.lua"
    path.write_text(script)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--latency"]
        + ["-s", str(path), url],
        capture_output=True,
        text=True,
        timeout=duration_s + 60,
    ).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        return {"rps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"), "non_2xx": -1}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(found.group(1)),
        "p50_ms": latency_ms(out, "50%"),
        "p99_ms": latency_ms(out, "99%"),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


# ----------------------------------------------------------------------------- one Ray


def side(proxy: str, uvloop: bool, plan: list[dict[str, Any]], warmup_s: float, duration_s: float):
    """Runs in its own process (the ingress and the event loop are fixed when Ray starts):
    deploys each planned configuration and measures it; returns one row per configuration."""
    import ray

    from kiln.runtime import free_port, registry_for, serve_env, shutdown_ray
    from kiln.serving_control import deploy_models
    from kiln.settings import Settings

    # Free ports of its own either way (other Rays with Serve may share the machine).
    os.environ.update(serve_env())
    if proxy == "python":
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    os.environ["RAY_USE_UVLOOP"] = "1" if uvloop else "0"
    home = Path(tempfile.mkdtemp(prefix="kiln-topology-"))
    ingress = "direct" if proxy == "direct" else "serve"
    settings = Settings(kiln_home=home, kiln_http_port=free_port(), kiln_ingress=ingress)
    # Logical CPUs enough for 4 replicas of 2 CPUs beside the registry and the log's store.
    ray.init(address="local", num_cpus=12, include_dashboard=False, log_to_driver=False)
    registry = registry_for(settings)
    admin = ray.get(registry.create_key.remote(["admin"]))["secret"]
    key = ray.get(registry.create_key.remote(["predict:*"], key=admin))["secret"]
    script = lua(key)
    registered = set()
    rows = []
    for item in plan:
        kind = item["model"]
        if kind not in registered:
            files = model_files(kind)
            spec = json.loads(files["spec.json"])
            ray.get(registry.register.remote(f"bench-{kind}", files, spec, {}, {}))
            registered.add(kind)
        serve_args: dict[str, Any] = {
            "num_replicas": item["replicas"],
            "num_cpus": item["num_cpus"],
        }
        if item["max_batch_size"] is not None:
            serve_args["max_batch_size"] = item["max_batch_size"]
        if item["batch_wait_timeout_s"] is not None:
            serve_args["batch_wait_timeout_s"] = item["batch_wait_timeout_s"]
        row = {**item, "proxy": proxy, "uvloop": uvloop}
        try:
            url = deploy_models(settings, [f"bench-{kind}"], key=admin, **serve_args)
            target = f"{url}/v1/models/bench-{kind}:predict"
            chosen = batching_of(url, kind, key)
            run_wrk(target, 4, warmup_s, script)
            c1 = run_wrk(target, 1, duration_s, script)
            c64 = run_wrk(target, 64, duration_s, script)
            row.update(
                c1_p50_ms=c1["p50_ms"],
                c1_p99_ms=c1["p99_ms"],
                c64_rps=c64["rps"],
                c64_p50_ms=c64["p50_ms"],
                c64_p99_ms=c64["p99_ms"],
                non_2xx=c1["non_2xx"] + c64["non_2xx"],
                chosen=chosen,
                load_avg_1m=round(os.getloadavg()[0], 2),
            )
        except Exception as exc:  # noqa: BLE001 (a failed start is a row, not the end)
            row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}"[:200])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    shutdown_ray()
    return rows


def batching_of(url: str, kind: str, key: str) -> dict[str, Any] | None:
    """The batching the answering replica uses (V1 metadata)."""
    import httpx

    answer = httpx.get(
        f"{url}/v1/models/bench-{kind}", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    found = answer.json().get("batching") if answer.status_code == 200 else None
    if found:
        found.pop("profile_ms", None)
    return found


def run_side(
    proxy: str, uvloop: bool, plan: list[dict[str, Any]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    if not plan:
        return []
    done = subprocess.run(
        [sys.executable, __file__, "--side", proxy, "1" if uvloop else "0", json.dumps(plan)]
        + ["--warmup-s", str(args.warmup_s), "--duration-s", str(args.duration_s)],
        stdout=subprocess.PIPE,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0 or not done.stdout.strip():
        return [{**p, "proxy": proxy, "uvloop": uvloop, "error": "side failed"} for p in plan]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- the stages


def configuration(kind: str, placement: tuple[int, float], batching: tuple[Any, Any]) -> dict:
    return {
        "model": kind,
        "replicas": placement[0],
        "num_cpus": placement[1],
        "max_batch_size": batching[0],
        "batch_wait_timeout_s": batching[1],
    }


def best(rows: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    measured = [r for r in rows if r["model"] == kind and "c64_rps" in r and r["non_2xx"] == 0]
    return max(measured, key=lambda r: r["c64_rps"], default=None)


def label(row: dict[str, Any]) -> str:
    size = row["max_batch_size"] if row["max_batch_size"] is not None else "auto"
    wait = row["batch_wait_timeout_s"]
    wait_text = "auto" if wait is None else f"{wait * 1000:g}ms"
    loop = "uvloop" if row["uvloop"] else "asyncio"
    return (
        f"{row['replicas']}x{row['num_cpus']:g}cpu batch={size} wait={wait_text} "
        f"{row['proxy']} {loop}"
    )


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'model':<7} {'configuration':<48} {'c64 req/s':>10} {'c1 p50 ms':>10} "
        f"{'c64 p99 ms':>10}  chosen"
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['model']:<7} {label(row):<48} {row['error'].splitlines()[0]}")
            continue
        chosen = row.get("chosen") or {}
        wait_ms = 1000 * (chosen.get("batch_wait_timeout_s") or 0)
        lines.append(
            f"{row['model']:<7} {label(row):<48} {row['c64_rps']:>10.0f} "
            f"{row['c1_p50_ms']:>10.2f} {row['c64_p99_ms']:>10.2f}  "
            f"{chosen.get('max_batch_size')}/{wait_ms:.2g}ms"
            f"{' non-2xx ' + str(row['non_2xx']) if row['non_2xx'] else ''}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A reduced grid, 3 s points.")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--warmup-s", type=float, default=None)
    parser.add_argument("--duration-s", type=float, default=None)
    parser.add_argument(
        "--side", nargs=3, metavar=("PROXY", "UVLOOP", "PLAN"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.warmup_s is None:
        args.warmup_s = 1.0 if args.quick else 2.0
    if args.duration_s is None:
        args.duration_s = 3.0 if args.quick else 8.0
    if args.side:
        proxy, uvloop, plan = args.side
        print(
            json.dumps(side(proxy, uvloop == "1", json.loads(plan), args.warmup_s, args.duration_s))
        )
        return
    ensure_wrk()
    started = time.time()
    load_before = os.getloadavg()
    kinds = args.models.split(",")
    grid = grids(args.quick)
    rows: list[dict[str, Any]] = []
    # 1: replicas x CPUs, batching from the profile, the direct ingress, uvloop.
    plan = [configuration(k, p, (AUTO, AUTO)) for k in kinds for p in grid["placements"]]
    rows += run_side("direct", True, plan, args)
    # 2: the batching grid at each model's best placement.
    plan = []
    for kind in kinds:
        top = best(rows, kind)
        placement = (top["replicas"], top["num_cpus"]) if top else grid["placements"][0]
        plan += [configuration(kind, placement, b) for b in grid["batchings"] if b != (AUTO, AUTO)]
    rows += run_side("direct", True, plan, args)
    # 3: the other ingress and event loop at each model's best so far.
    for proxy, uvloop in grid["ingress"]:
        if (proxy, uvloop) == ("direct", True):
            continue
        plan = []
        for kind in kinds:
            top = best(rows, kind)
            if top is not None:
                keys = ("model", "replicas", "num_cpus", "max_batch_size", "batch_wait_timeout_s")
                plan.append({k: top[k] for k in keys})
        rows += run_side(proxy, uvloop, plan, args)
    print(table(rows), file=sys.stderr)
    winners = {}
    for kind in kinds:
        top = best(rows, kind)
        if top is not None:
            winners[kind] = {
                "configuration": label(top),
                **{
                    k: top[k]
                    for k in ("replicas", "num_cpus", "max_batch_size", "batch_wait_timeout_s")
                },
                "proxy": top["proxy"],
                "uvloop": top["uvloop"],
                "c64_rps": top["c64_rps"],
                "c1_p50_ms": top["c1_p50_ms"],
                "chosen_batching": top.get("chosen"),
            }
    print(
        json.dumps(
            {
                "best": winners,
                "quick": args.quick,
                "duration_s": args.duration_s,
                "cores": CORES,
                "cpu": cpu_model(),
                "load_avg_1m_before": round(load_before[0], 2),
                "load_avg_1m_after": round(os.getloadavg()[0], 2),
                "minutes": round((time.time() - started) / 60, 1),
                "rows": rows,
            }
        )
    )


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


if __name__ == "__main__":
    main()
