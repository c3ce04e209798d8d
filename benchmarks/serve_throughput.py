"""Serving throughput: Kiln on Ray Serve against plain FastAPI + uvicorn, with wrk.

Three models, one row of 64 features per request:
  - light: MLP 64->256->10, overhead-bound (the HTTP path is all there is to measure);
  - heavy: MLP 64->8192->8192->10, the issue's "heavy" model: a batch-1 forward of about
    13 ms on one core, and still about 2 ms per row in a batch of 64 (batched compute dominates
    the ~1 ms of HTTP handling per request, as it does for a CNN on 3x32x32 images);
  - medium: MLP 64->4096->4096->10 (3 ms batch-1 but only 0.5 ms per row batched), the
    model earlier runs used as "heavy"; kept to show where the per-request HTTP cost binds.
At concurrency 1, 16 and 64, wrk (a Lua script POSTs the row, on loopback, bounded in time)
measures requests/s and p50/p99 of:
  - Kiln as `kiln serve` runs it (its direct ingress: each replica answers the port itself,
    serving/direct.py). Light: one replica with one CPU.
    Medium and heavy: one replica per core, one CPU (one torch thread) each, so one replica's
    forward pass overlaps another's HTTP handling; batched (max_batch_size 64; heavy waits up
    to 20 ms for a batch to fill) and, for heavy, with batching off (max_batch_size 1). For
    reference, light also behind Serve's Python proxy (`--ingress serve` with
    RAY_SERVE_ENABLE_HA_PROXY=0);
  - the plain baseline: the same model and forward code in FastAPI under
    `uvicorn --workers <cores>`, one single-thread worker per core (the best that alternative
    does: no batching, but every core handles HTTP). The series `*_fastapi_one_process` is the
    older, weaker baseline (one uvicorn process, every core's torch threads for medium and
    heavy), kept only for comparison with earlier recorded runs; no ratio uses it;
  - the compute limit: offline batched forward passes (batch 64) on the same cores, the better
    of one process with a thread per core and one single-thread process per core, measured
    before and after the servers run; the best of these counts.
Writes benchmarks/results/serve_throughput.png (a smoke run: a temporary folder) and prints one
JSON line last; it leads with the `*_vs_limit` ratios (Kiln's requests/s at the top concurrency
over the compute limit's rows/s), then the ratios against the plain baseline.

    python benchmarks/serve_throughput.py                # about 6 minutes
    python benchmarks/serve_throughput.py --smoke-test   # 1 s per point, light model, c=1,16
    python benchmarks/serve_throughput.py --tls          # TLS arm only: light, c64, TLS vs not
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HIDDEN = {"light": [256], "medium": [4096, 4096], "heavy": [8192, 8192]}
SPECS = {
    kind: {
        "kind": "mlp",
        "task": "classification",
        "num_features": 64,
        "classes": list(range(10)),
        "hidden": hidden,
    }
    for kind, hidden in HIDDEN.items()
}
CORES = os.cpu_count() or 1
# How Kiln deploys each model: light on one single-CPU replica; the others on one single-CPU
# replica per core (measured: medium ~1,050 req/s at c64 against ~690 for one replica on both
# cores: a replica's HTTP handling and its forward pass cannot overlap, two replicas' can).
DEPLOY: dict[str, dict[str, Any]] = {
    "light": {"num_cpus": 1, "num_replicas": 1},
    "medium": {"num_cpus": 1, "num_replicas": CORES},
    "heavy": {"num_cpus": 1, "num_replicas": CORES, "batch_wait_timeout_s": 0.02},
}
ROW_JSON = ", ".join(["1.5"] * 64)
LUA = f"""wrk.method = "POST"
wrk.body = '{{"instances": [[{ROW_JSON}]]}}'
wrk.headers["Content-Type"] = "application/json"
"""


def ensure_wrk() -> str:
    """wrk from Debian's packages; installed here when missing (the benchmark's own set-up)."""
    found = shutil.which("wrk")
    if found:
        return found
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)
    return shutil.which("wrk") or "wrk"


def run_wrk(url: str, connections: int, duration_s: int, lua: str = LUA) -> dict[str, float]:
    """wrk POSTing `lua`'s body (default: one row of 64 features) for `duration_s`."""
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(lua)
    threads = min(2, connections)
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration_s}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration_s + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": latency_ms(out, "50%"),
        "p99_ms": latency_ms(out, "99%"),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def latency_ms(out: str, pct: str) -> float:
    value, unit = re.search(rf"{pct}\s+([\d.]+)(us|ms|s)", out).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def sweep(url: str, levels: list[int], duration_s: int) -> dict[str, dict[str, float]]:
    run_wrk(url, 4, 1)  # warm-up
    return {f"c{c}": run_wrk(url, c, duration_s) for c in levels}


def threads_for(kind: str) -> int:
    """Torch threads of the plain server: every core, but one for the light model."""
    return 1 if kind == "light" else CORES


def model_files(kind: str) -> dict[str, bytes]:
    from kiln.training.artifacts import model_to_files
    from kiln.training.models import build_model, set_standardization

    torch.manual_seed(0)
    spec = {**SPECS[kind], "mean": [0.0] * 64, "std": [1.0] * 64}
    model = build_model(spec)
    set_standardization(model, spec)
    return model_to_files(model.eval(), spec)


# ----------------------------------------------------------------------------- Kiln side


def kiln_side(proxy: str, kinds: list[str], levels: list[int], duration_s: int) -> dict[str, Any]:
    """Runs in its own process: Serve's proxy mode is fixed when Ray starts."""
    import ray

    from kiln.runtime import registry_for, serve_env, shutdown_ray
    from kiln.serving_control import deploy_models
    from kiln.settings import Settings

    os.environ.update(serve_env() if proxy == "ha" else {"RAY_SERVE_ENABLE_HA_PROXY": "0"})
    settings = Settings(
        kiln_home=Path(tempfile.mkdtemp(prefix="kiln-serve-bench-")),
        kiln_http_port=8431,
        kiln_ingress="auto" if proxy == "ha" else "serve",  # auto: Kiln's default, direct
    )
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    registry = registry_for(settings)
    results: dict[str, Any] = {}
    for kind in kinds:
        files = model_files(kind)
        spec = json.loads(files["spec.json"])
        ray.get(registry.register.remote(f"bench-{kind}", files, spec, {}, {}))
        modes = {"batched": 64, "unbatched": 1} if kind == "heavy" else {"batched": 64}
        for mode, max_batch in modes.items():
            url = deploy_models(
                settings, [f"bench-{kind}"], auth=False, **DEPLOY[kind], max_batch_size=max_batch
            )
            results[f"{kind}_{mode}"] = sweep(
                f"{url}/v1/models/bench-{kind}:predict", levels, duration_s
            )
    shutdown_ray()
    return results


# ----------------------------------------------------------------------------- TLS arm
# `--tls`: what TLS costs (cluster/tls.py's frontend in front of Kiln's ingress), the
# light model at c64, with and without TLS on one deployment, the two interleaved A/B/A/B
# (Serve listens on a loopback port behind the frontend: the plain side calls it there).


def tls_side(connections: int, duration_s: int, rounds: int) -> dict[str, Any]:
    """Runs in its own process, on its own embedded Ray with the HAProxy ingress."""
    import ray
    from ray.serve.context import _get_global_client

    from kiln.runtime import registry_for, serve_env, shutdown_ray
    from kiln.serving_control import current_args, deploy_models
    from kiln.settings import Settings
    from kiln.tls import TlsFiles, self_signed_files

    os.environ.update(serve_env())
    home = Path(tempfile.mkdtemp(prefix="kiln-tls-bench-"))
    settings = Settings(kiln_home=home, kiln_http_port=8432)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    registry = registry_for(settings)
    files = model_files("light")
    ray.get(registry.register.remote("bench-light", files, json.loads(files["spec.json"]), {}, {}))
    cert, key = self_signed_files(home / "tls")
    tls_url = deploy_models(
        settings, ["bench-light"], auth=False, tls=TlsFiles(cert, key), **DEPLOY["light"]
    )
    # The plain loopback port behind the frontend: the replicas' own (the direct ingress, the
    # default) or Serve's.
    inner = current_args().get("direct_port") or _get_global_client().http_config.port
    urls = {
        "tls": f"{tls_url}/v1/models/bench-light:predict",
        "plain": f"http://127.0.0.1:{inner}/v1/models/bench-light:predict",
    }
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "tls": []}
    for url in urls.values():
        run_wrk(url, 4, 1)  # warm-up, each path
    for _ in range(rounds):
        for side, url in urls.items():
            runs[side].append(run_wrk(url, connections, duration_s))
    shutdown_ray()
    best = {side: max(r["rps"] for r in figures) for side, figures in runs.items()}
    return {
        "tls_rps": best["tls"],
        "plain_rps": best["plain"],
        "tls_vs_plain": round(best["tls"] / best["plain"], 3),
        "connections": connections,
        "rounds": runs,
    }


def run_tls_arm(duration_s: int, smoke: bool) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--duration-s",
            str(duration_s),
            "--tls-side",
            "1" if smoke else "2",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if done.returncode != 0:
        raise SystemExit(f"TLS arm failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- plain side


def plain_app() -> Any:
    """The same model in FastAPI: what a user would write without Kiln (a uvicorn app factory,
    so each `--workers` process builds its own; the kind and threads come in the environment)."""
    from fastapi import FastAPI

    from kiln.training.artifacts import model_from_files
    from kiln.training.evaluate import outputs_to_predictions, predict_outputs

    torch.set_num_threads(int(os.environ["KILN_BENCH_THREADS"]))
    model, spec = model_from_files(model_files(os.environ["KILN_BENCH_KIND"]))
    app = FastAPI()

    # An async route: the forward pass runs on the worker's event loop, with no hop to
    # Starlette's thread pool. On 2026-12-07's idle machine the sync route gave 1,615 req/s
    # for light at c64 under `--workers 2` where serve_peers.py's async FastAPI gave 4,622:
    # the sync one was not the best this alternative does.
    @app.post("/predict")
    async def predict(body: dict) -> dict:
        x = np.asarray(body["instances"], dtype=np.float32)
        return {"predictions": outputs_to_predictions(predict_outputs(model, x), spec).tolist()}

    return app


def plain_server(kind: str, port: int, workers: int) -> None:
    """`uvicorn --workers N` serving `plain_app`; one worker gets every core's threads."""
    import uvicorn

    threads = threads_for(kind) if workers == 1 else max(1, CORES // workers)
    os.environ.update(KILN_BENCH_KIND=kind, KILN_BENCH_THREADS=str(threads))
    uvicorn.run(
        "benchmarks.serve_throughput:plain_app",
        factory=True,
        workers=workers,
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )


def plain_side(kind: str, levels: list[int], duration_s: int, workers: int) -> dict[str, Any]:
    import httpx

    port = 8432
    server = subprocess.Popen(
        [sys.executable, __file__, "--plain-server", kind, str(port), str(workers)]
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.post(
                    f"http://127.0.0.1:{port}/predict", json={"instances": [[0.0] * 64]}, timeout=2
                )
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        return sweep(f"http://127.0.0.1:{port}/predict", levels, duration_s)
    finally:
        server.terminate()
        server.wait(timeout=30)


def offline_rows_per_s(kind: str, threads: int, seconds: float = 3.0) -> float:
    """Batched forward passes (batch 64) in this process with `threads` torch threads."""
    from kiln.training.artifacts import model_from_files

    torch.set_num_threads(threads)
    model, _ = model_from_files(model_files(kind))
    x = torch.randn(64, 64)
    with torch.inference_mode():
        model(x)
        started, rows = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            model(x)
            rows += 64
    torch.set_num_threads(1)
    return rows / (time.perf_counter() - started)


def compute_limit(kind: str) -> dict[str, float]:
    """Offline rows/s on these cores, the better of one process using every core and one
    single-thread process per core (run side by side)."""
    one_process = offline_rows_per_s(kind, CORES)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--offline", kind], stdout=subprocess.PIPE, text=True
        )
        for _ in range(CORES)
    ]
    per_core = sum(float(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs)
    return {"one_process": one_process, "process_per_core": per_core}


def best_limit(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The ceiling for serving: the best of every measurement (this machine's speed drifts by
    10-20% over minutes, and a lower limit would flatter Kiln's ratio)."""
    return {"runs": runs, "rows_per_s": max(max(run.values()) for run in runs)}


# ----------------------------------------------------------------------------- report


def ratios(
    series: dict[str, Any], limits: dict[str, Any], kinds: list[str], levels: list[int]
) -> dict[str, float]:
    """The headline figures, `*_vs_limit` first: Kiln (batched) at the top concurrency against
    the compute limit, then against the plain baseline (`uvicorn --workers <cores>`)."""
    top = f"c{levels[-1]}"
    kiln = {kind: series[f"{kind}_batched_kiln"] for kind in kinds}
    plain = {kind: series[f"{kind}_fastapi"] for kind in kinds}
    out = {
        f"{kind}_{top}_vs_limit": kiln[kind][top]["rps"] / limits[kind]["rows_per_s"]
        for kind in kinds
    }
    for kind in kinds:
        out[f"{kind}_{top}_vs_fastapi"] = kiln[kind][top]["rps"] / plain[kind][top]["rps"]
    out["light_c1_p50_vs_fastapi"] = kiln["light"]["c1"]["p50_ms"] / plain["light"]["c1"]["p50_ms"]
    return out


def plot(out: dict[str, Any], levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("light", "medium", "heavy") if f"{k}_fastapi" in out["series"]]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for label, series in out["series"].items():
            if label.startswith(kind):
                ax.plot(levels, [series[f"c{c}"]["rps"] for c in levels], marker="o", label=label)
        limit = out.get(f"{kind}_compute_limit", {}).get("rows_per_s")
        highest = max(
            point["rps"]
            for label, series in out["series"].items()
            if label.startswith(kind)
            for point in series.values()
        )
        if limit and limit < 5 * highest:  # light's limit is far off the chart: overhead-bound
            ax.axhline(limit, linestyle="--", color="grey", label="compute limit")
            ax.axhline(limit / 2, linestyle=":", color="grey", label="half the limit")
        ax.set(
            title=f"{kind}: MLP {SPECS[kind]['hidden']}",
            xlabel="concurrent connections",
            ylabel="requests/s (one row each)",
            xscale="log",
        )
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=int, default=8)
    parser.add_argument("--smoke-test", action="store_true")
    parser.add_argument(
        "--plain-server", nargs=3, metavar=("KIND", "PORT", "WORKERS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--offline", metavar="KIND", help=argparse.SUPPRESS)
    parser.add_argument(
        "--kiln-side", nargs=3, metavar=("PROXY", "KINDS", "LEVELS"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="Only the TLS arm: light model at c64 with and without TLS, interleaved.",
    )
    parser.add_argument("--tls-side", type=int, metavar="ROUNDS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tls_side:
        print(json.dumps(tls_side(64, args.duration_s, args.tls_side)))
        return
    if args.tls:
        ensure_wrk()
        arm = run_tls_arm(1 if args.smoke_test else args.duration_s, args.smoke_test)
        print(json.dumps({**arm, "load_avg_1m": os.getloadavg()[0], "cores": CORES}))
        return
    if args.plain_server:
        kind, port, workers = args.plain_server
        plain_server(kind, int(port), int(workers))
        return
    if args.offline:
        print(offline_rows_per_s(args.offline, 1, seconds=4.0))
        return
    if args.kiln_side:
        proxy, kinds, levels = args.kiln_side
        result = kiln_side(
            proxy, kinds.split(","), [int(c) for c in levels.split(",")], args.duration_s
        )
        print(json.dumps(result))
        return

    ensure_wrk()
    kinds = ["light"] if args.smoke_test else ["light", "medium", "heavy"]
    levels = [1, 16] if args.smoke_test else [1, 16, 64]
    duration_s = 1 if args.smoke_test else args.duration_s
    # The compute limits are measured before the servers run and again after.
    limit_runs = {kind: [compute_limit(kind)] for kind in kinds}
    series: dict[str, Any] = {}
    # Serve's Python proxy only for the light model: it shows what the proxy hop costs.
    for proxy, proxy_kinds in (("ha", kinds), ("python", ["light"])):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--duration-s",
                str(duration_s),
                "--kiln-side",
                proxy,
                ",".join(proxy_kinds),
                ",".join(map(str, levels)),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if done.returncode != 0:
            raise SystemExit(f"Kiln side ({proxy} proxy) failed:\n{done.stderr[-3000:]}")
        suffix = "kiln" if proxy == "ha" else "kiln_python_proxy"
        for name, figures in json.loads(done.stdout.strip().splitlines()[-1]).items():
            series[f"{name}_{suffix}"] = figures
    for kind in kinds:
        series[f"{kind}_fastapi"] = plain_side(kind, levels, duration_s, workers=CORES)
        series[f"{kind}_fastapi_one_process"] = plain_side(kind, levels, duration_s, workers=1)
    limits = {kind: best_limit([*limit_runs[kind], compute_limit(kind)]) for kind in kinds}
    out = {
        **ratios(series, limits, kinds, levels),
        "levels": levels,
        "duration_s": duration_s,
        "cores": CORES,
        "deploy": {k: DEPLOY[k] for k in kinds},
        "fastapi_baseline": f"uvicorn --workers {CORES}, one torch thread each, no batching",
        "series": series,
        **{f"{kind}_compute_limit": limits[kind] for kind in kinds},
    }
    # A smoke run must not overwrite the recorded plot.
    results = Path(tempfile.mkdtemp()) if args.smoke_test else ROOT / "benchmarks" / "results"
    plot(out, levels, results / "serve_throughput.png")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
