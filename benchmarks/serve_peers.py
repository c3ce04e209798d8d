"""Kiln against the model servers people deploy today, on the same cores, models and load.

Each peer is installed into a venv of its own under build/peers/<peer> (created on the first
run, reused after; torch is torch==2.13.0 CPU in every one, checked with `pip install
--dry-run` before a peer's packages go in). A peer that cannot be installed or started is
skipped with its reason in the JSON; the run goes on. Peers, each at one worker and at its
best 2-core set-up (two workers or instances, one torch thread each; at one worker, one
thread per core):
  fastapi   FastAPI + `uvicorn --workers N` (uvloop, httptools), an async route, /predict
  kserve    KServe's ModelServer(workers=N), V1 `:predict`
  litserve  LitServer(workers_per_device=N), /predict
  bentoml   @bentoml.service(workers=N), /predict
  mlserver  MLServer with parallel_workers=N, V2 `infer` (JSON)
  pytriton  PyTriton: Triton's C++ HTTP front end, N model instances, its dynamic batcher
            (max batch 64, no queue delay), V2 `infer` (JSON)
Models (the same seeded weights everywhere, written from Kiln's model to a .npz the peers
read): light MLP 64->256->10 and medium MLP 64->4096->4096->10; one row per request in each
peer's own protocol. Kiln runs as a user runs it: `kiln serve` as a subprocess in a
temporary KILN_HOME with the models registered there, auth on (a key with predict:*, sent as
`Authorization: Bearer`), prediction log and metrics on (its defaults), V1 `:predict`; at its
defaults (one replica, one CPU: one torch thread) and at the peers' best topology (two
replicas). gRPC: Kiln's V2 ModelInfer against PyTriton's, light (benchmarks/grpc_load.py;
arms named `grpc:...`, compared among themselves). Every server runs alone: the previous
one is stopped (its process group) and its port is free before the next starts.

Load: wrk -t1 on loopback, a warm-up, then c1 (p50) and c64 (requests/s), each `--duration-s`
(8 s; `--quick`: 2 s). An arm with 0 requests/s, any non-2xx answer or socket errors over 1%
of its requests is invalid and never counted as a best. Prints a table as it goes and one
JSON line last: per model and concurrency Kiln's figure, the best peer's, Kiln's ratio to it
(requests/s: Kiln over peer, higher is better; p50: Kiln over peer, lower is better), every
arm's figures, versions, the CPU and its flags, the load average around each arm.

    python benchmarks/serve_peers.py             # full: about 20 minutes after the installs
    python benchmarks/serve_peers.py --quick     # 2 s per point
    python benchmarks/serve_peers.py --quick --peers fastapi,pytriton --models light
    python benchmarks/serve_peers.py --rounds 3  # each arm's best of 3 (a shared machine)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

PEERS_DIR = ROOT / "build" / "peers"
SERVERS = ROOT / "benchmarks" / "peers"
CORES = os.cpu_count() or 1
TORCH = "torch==2.13.0"
KINDS = ("light", "medium")
LEVELS = (1, 64)
ROW = [1.5] * 64
ERROR_SHARE = 0.01
"""Socket errors over this share of an arm's requests make it invalid."""
WRK_TIMEOUT_S = 5


# ----------------------------------------------------------------------------- peers


def v1_body() -> str:
    return json.dumps({"instances": [ROW]})


def v2_body() -> str:
    return json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}
    )


@dataclass(frozen=True)
class Peer:
    name: str
    packages: tuple[str, ...]
    """pip requirements, pinned; torch==2.13.0 goes in first and stays."""
    distribution: str
    """The distribution whose version the JSON reports."""
    path: str
    """The predict URL's path."""
    body: str
    setup: str
    """How the best 2-core set-up is configured (for the JSON)."""
    needs_torch: bool = True
    extra: dict[str, str] = field(default_factory=dict)

    def command(self, python: Path, workers: int, port: int, scratch: Path) -> list[str]:
        bin_dir = python.parent
        if self.name == "fastapi":
            return [
                str(python),
                "-m",
                "uvicorn",
                "fastapi_peer:app",
                "--factory",
                "--workers",
                str(workers),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ]
        if self.name == "bentoml":
            return [
                str(bin_dir / "bentoml"),
                "serve",
                "bentoml_peer:Peer",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
        if self.name == "mlserver":
            return [str(bin_dir / "mlserver"), "start", str(scratch)]
        return [str(python), f"{self.name}_peer.py"]


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer(
            "fastapi",
            ("fastapi==0.165.0", "uvicorn[standard]==0.55.0"),
            "fastapi",
            "/predict",
            v1_body(),
            "uvicorn --workers 2, async route",
        ),
        Peer(
            "kserve",
            ("kserve==0.21.0",),
            "kserve",
            "/v1/models/peer:predict",
            v1_body(),
            "ModelServer(workers=2), V1",
        ),
        Peer(
            "litserve",
            ("litserve==0.2.19",),
            "litserve",
            "/predict",
            v1_body(),
            "LitServer(workers_per_device=2)",
        ),
        Peer(
            "bentoml",
            ("bentoml==1.4.40",),
            "bentoml",
            "/predict",
            v1_body(),
            "@bentoml.service(workers=2)",
        ),
        Peer(
            "mlserver",
            ("mlserver==1.7.1", "uvloop==0.21.0"),
            "mlserver",
            "/v2/models/peer/infer",
            v2_body(),
            "parallel_workers=2, V2 JSON",
        ),
        Peer(
            "pytriton",
            ("nvidia-pytriton==0.7.0",),
            "nvidia-pytriton",
            "/v2/models/peer/infer",
            v2_body(),
            "2 model instances, dynamic batcher (max 64), Triton C++ HTTP, V2 JSON",
        ),
    )
}


class Skip(Exception):
    """A peer that cannot be installed or started here: the reason goes into the JSON."""


def peer_python(name: str) -> Path:
    return PEERS_DIR / name / "bin" / "python"


def pip(python: Path, *args: str, timeout_s: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )


def foreign_torch(dry_run_output: str) -> list[str]:
    """What a `pip install --dry-run` would bring that must not come: another torch, or a
    CUDA build of anything (nvidia-*-cuXX wheels)."""
    found = re.search(r"Would install (.+)", dry_run_output)
    names = found.group(1).split() if found else []
    return [
        n
        for n in names
        if (n.startswith("torch-") and n != "torch-2.13.0") or re.search(r"-cu\d+", n)
    ]


def ensure_peer(peer: Peer, log: Path) -> tuple[Path, dict[str, Any]]:
    """The peer's venv, installed on first use (a stamp names what went in); its versions and
    install time. Raises Skip with the reason when it cannot be installed."""
    python = peer_python(peer.name)
    stamp = PEERS_DIR / peer.name / ".installed"
    wanted = " ".join([TORCH, *peer.packages])
    started = time.monotonic()
    fresh = not (stamp.exists() and stamp.read_text() == wanted)
    if fresh:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(python.parent.parent)], check=True)
        steps: list[tuple[str, ...]] = [("install", "-q", "--upgrade", "pip")]
        if peer.needs_torch:
            steps.append(("install", "-q", TORCH, "numpy"))
        for step in steps:
            done = pip(python, *step)
            if done.returncode != 0:
                raise Skip(f"pip {' '.join(step)} failed: {last_line(done.stderr)}")
        dry = pip(python, "install", "--dry-run", TORCH, *peer.packages)
        log.write_text(dry.stdout + dry.stderr)
        if dry.returncode != 0:
            raise Skip(f"pip cannot resolve {' '.join(peer.packages)}: {last_line(dry.stderr)}")
        if bad := foreign_torch(dry.stdout):
            raise Skip(f"{' '.join(peer.packages)} would bring {', '.join(bad)}")
        done = pip(python, "install", "-q", TORCH, *peer.packages)
        if done.returncode != 0:
            raise Skip(f"pip install {' '.join(peer.packages)} failed: {last_line(done.stderr)}")
        stamp.write_text(wanted)
    versions = {}
    for dist in (peer.distribution, "torch", "numpy"):
        done = subprocess.run(
            [str(python), "-c", f"import importlib.metadata as m; print(m.version('{dist}'))"],
            capture_output=True,
            text=True,
        )
        versions[dist] = done.stdout.strip() or "missing"
    if versions["torch"] != "2.13.0+cpu" and peer.needs_torch:
        raise Skip(f"its venv has torch {versions['torch']}, not 2.13.0+cpu")
    return python, {
        "versions": versions,
        "install_s": round(time.monotonic() - started, 1) if fresh else 0.0,
    }


def last_line(text: str) -> str:
    """The last line that names an error (else the last line), shortened."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip(" ;")]
    errors = [line for line in lines if re.search(r"error|exception|failed", line, re.I)]
    chosen = errors[-1] if errors else lines[-1] if lines else "(no output)"
    return chosen[:300]


# ----------------------------------------------------------------------------- wrk


def parse_wrk(out: str) -> dict[str, Any]:
    """wrk --latency's report -> requests/s, p50/p99 ms, requests, socket errors, non-2xx."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50_ms": latency_ms(out, "50%"),
        "p99_ms": latency_ms(out, "99%"),
        "requests": int(total.group(1)) if total else 0,
        "socket_errors": sum(int(n) for n in sockets.groups()) if sockets else 0,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
    }


def latency_ms(out: str, pct: str) -> float | None:
    found = re.search(rf"^\s*{pct}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if not found:
        return None
    value, unit = found.groups()
    return round(float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit], 4)


def invalid_reason(figures: dict[str, Any]) -> str | None:
    """Why an arm's figures cannot be right (None: they can)."""
    if figures.get("error"):
        return str(figures["error"])
    if figures["rps"] <= 0 or figures["requests"] <= 0:
        return "no request answered"
    if figures["non_2xx"]:
        return f"{figures['non_2xx']} non-2xx answers"
    if figures["socket_errors"] > ERROR_SHARE * figures["requests"]:
        return f"{figures['socket_errors']} socket errors in {figures['requests']} requests"
    if figures["p50_ms"] is None:
        return "no latency in wrk's report"
    return None


def lua(path: str, body: str, headers: dict[str, str]) -> str:
    lines = [
        'wrk.method = "POST"',
        f"wrk.path = {json.dumps(path)}",
        f"wrk.body = {json.dumps(body)}",
    ]
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    return "\n".join(lines) + "\n"


def wrk_command(url: str, connections: int, duration_s: int, script: Path) -> list[str]:
    return [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]


def run_wrk(url: str, connections: int, duration_s: int, script: Path) -> dict[str, Any]:
    done = subprocess.run(
        wrk_command(url, connections, duration_s, script),
        capture_output=True,
        text=True,
        timeout=duration_s + 60,
    )
    figures = parse_wrk(done.stdout)
    if done.returncode != 0:
        figures["error"] = f"wrk exited {done.returncode}: {last_line(done.stderr)}"
    return figures


def measure(url: str, script: Path, duration_s: int, warmup_s: int) -> dict[str, Any]:
    """A warm-up at c64, then each level; each level's figures with `invalid` when they are."""
    run_wrk(url, 64, warmup_s, script)
    out: dict[str, Any] = {}
    for level in LEVELS:
        figures = run_wrk(url, level, duration_s, script)
        figures["invalid"] = invalid_reason(figures)
        out[f"c{level}"] = figures
    return out


def grpc_figures(result: dict[str, Any]) -> dict[str, Any]:
    """benchmarks/grpc_load.py's result in wrk's terms (a non-OK status counts as non-2xx)."""
    return {
        "rps": float(result.get("req_s") or 0.0),
        "p50_ms": None if result.get("p50_ms") is None else round(result["p50_ms"], 3),
        "p99_ms": None if result.get("p99_ms") is None else round(result["p99_ms"], 3),
        "requests": int(result.get("requests") or 0),
        "socket_errors": 0,
        "non_2xx": int(result.get("errors") or 0),
    }


def measure_grpc(
    target: str,
    model: str,
    input_name: str,
    headers: dict[str, str] | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """V2 ModelInfer over gRPC (benchmarks/grpc_load.py: grpc.aio, at most 6 callers on one
    connection, as perf_analyzer) at each level, one row per request as raw FP32 contents;
    its own 1 s warm-up before each level."""
    import numpy as np

    from benchmarks.grpc_load import run_grpc_load

    rows = np.asarray([ROW], dtype=np.float32)
    out: dict[str, Any] = {"load_before": load_avg(), "cpu_wait_pct_before": cpu_pressure()}
    for level in LEVELS:
        try:
            result = run_grpc_load(
                target, model, rows, level, float(args.duration_s), headers, input_name=input_name
            )
            figures = grpc_figures(result)
        except Exception as exc:  # noqa: BLE001 (grpc's AioRpcError and kin: the arm is invalid)
            figures = {**grpc_figures({}), "error": f"{type(exc).__name__}: {exc}"[:300]}
        figures["invalid"] = invalid_reason(figures)
        out[f"c{level}"] = figures
    out["load_after"] = load_avg()
    out["cpu_wait_pct_after"] = cpu_pressure()
    return out


# ----------------------------------------------------------------------------- processes


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    from kiln.runtime import free_port as kiln_free_port

    return kiln_free_port()


def wait_port_free(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not port_free(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port} still taken {timeout_s} s after its server stopped")
        time.sleep(0.2)


@dataclass
class Server:
    """A peer's server in a process group of its own; stopped with the group (and any
    descendant that left it), nothing else."""

    command: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    process: subprocess.Popen | None = None
    seen: dict[int, float] = field(default_factory=dict)

    def start(self) -> Server:
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdout=self.log_path.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def record(self) -> None:
        import psutil

        assert self.process is not None
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self.seen[child.pid] = child.create_time()
        except psutil.Error:
            pass

    def wait_ready(self, url: str, body: str, headers: dict[str, str], timeout_s: float) -> None:
        import httpx

        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Skip(f"exited {self.process.returncode}: {last_line(self.log())}")
            try:
                answer = httpx.post(url, content=body, headers=headers, timeout=10)
                if answer.status_code == 200:
                    self.record()
                    return
                last = f"{answer.status_code} {answer.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise Skip(f"not ready in {timeout_s} s ({last}); log: {last_line(self.log())}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 30) -> None:
        import psutil

        if self.process is None:
            return
        self.record()
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=grace_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
            except psutil.Error:
                continue


# ----------------------------------------------------------------------------- models


def model_files(kind: str) -> dict[str, bytes]:
    from benchmarks.serve_throughput import model_files as seeded_files

    return seeded_files(kind)


def write_weights(kind: str, path: Path) -> None:
    """Kiln's seeded model (as registered) -> the .npz every peer builds the same MLP from."""
    import numpy as np
    import torch

    from kiln.training.artifacts import model_from_files

    model, spec = model_from_files(model_files(kind))
    linears: list[Any] = [m for m in model.body.modules() if isinstance(m, torch.nn.Linear)]
    arrays: dict[str, Any] = {
        "layers": np.array(len(linears)),
        "mean": np.asarray(spec["mean"], dtype=np.float32),
        "std": np.asarray(spec["std"], dtype=np.float32),
        "classes": np.asarray(spec["classes"], dtype=np.int64),
    }
    for i, linear in enumerate(linears):
        arrays[f"w{i}"] = linear.weight.detach().numpy().astype(np.float32)
        arrays[f"b{i}"] = linear.bias.detach().numpy().astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def kiln_answer(kind: str) -> list[int]:
    """Kiln's own prediction for the benchmark's row (every peer must answer the same)."""
    import numpy as np

    from kiln.training.artifacts import model_from_files
    from kiln.training.evaluate import outputs_to_predictions, predict_outputs

    model, spec = model_from_files(model_files(kind))
    rows = np.asarray([ROW], dtype=np.float32)
    return [int(v) for v in outputs_to_predictions(predict_outputs(model, rows), spec).tolist()]


# ----------------------------------------------------------------------------- arms


def conditions(load_before: float, wait_before: float | None) -> dict[str, Any]:
    """The machine's load and CPU pressure before an arm (given) and after it (now)."""
    return {
        "load_before": load_before,
        "load_after": load_avg(),
        "cpu_wait_pct_before": wait_before,
        "cpu_wait_pct_after": cpu_pressure(),
    }


def cpu_pressure() -> float | None:
    """Linux PSI: the share of the last 10 s in which some runnable task waited for a CPU (%):
    on a shared machine it says more about an arm's conditions than the load average."""
    try:
        text = Path("/proc/pressure/cpu").read_text()
    except OSError:
        return None
    found = re.search(r"some avg10=([\d.]+)", text)
    return float(found.group(1)) if found else None


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def run_peer_arm(
    peer: Peer,
    python: Path,
    kind: str,
    workers: int,
    args: argparse.Namespace,
    scratch: Path,
    grpc_out: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The peer's server for `kind` at `workers`, measured with wrk; with `grpc_out` (PyTriton)
    its gRPC port measured too, into `grpc_out`."""
    port = free_port()
    threads = max(1, CORES // workers)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV", "PYTHON"))
    }
    env.update(
        PATH=f"{python.parent}:{env.get('PATH', '')}",
        PEER_KIND=kind,
        PEER_WEIGHTS=str(scratch / f"weights-{kind}.npz"),
        PEER_THREADS=str(threads),
        OMP_NUM_THREADS=str(threads),
        PEER_WORKERS=str(workers),
        PEER_PORT=str(port),
        PEER_GRPC_PORT=str(free_port()),
        PEER_METRICS_PORT=str(free_port()),
        PYTHONPATH=str(SERVERS),
        BENTOML_HOME=str(scratch / "bentoml"),
        BENTOML_DO_NOT_TRACK="True",
    )
    settings = scratch / f"{peer.name}-{kind}-{workers}"
    settings.mkdir(parents=True, exist_ok=True)
    if peer.name == "mlserver":
        write_mlserver_settings(settings, env, workers)
    if peer.name == "pytriton":
        # Triton's Python-backend stub links libpython3.11.so.1.0: without this it finds the
        # system's (Debian's 3.11.2) under this interpreter's 3.11.7 standard library, and
        # multiprocessing fails in the stub (RLock._recursion_count).
        libdir = sysconfig.get_config_var("LIBDIR")
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
    server = Server(
        peer.command(python, workers, port, settings),
        env,
        SERVERS,
        scratch / f"{peer.name}-{kind}-{workers}.log",
    )
    url = f"http://127.0.0.1:{port}{peer.path}"
    headers = {"Content-Type": "application/json"}
    before, wait_before = load_avg(), cpu_pressure()
    try:
        server.start().wait_ready(url, peer.body, headers, timeout_s=args.start_timeout_s)
        check_answer(url, peer.body, headers, args.expected[kind])
        script = scratch / f"{peer.name}.lua"
        script.write_text(lua(peer.path, peer.body, headers))
        figures = measure(f"http://127.0.0.1:{port}", script, args.duration_s, args.warmup_s)
        if grpc_out is not None:
            target = f"127.0.0.1:{env['PEER_GRPC_PORT']}"
            grpc_out.update(measure_grpc(target, "peer", "x", None, args))
    finally:
        server.stop()
        wait_port_free(port)
    return {**figures, **conditions(before, wait_before), "threads": threads}


def check_answer(
    url: str, body: str, headers: dict[str, str], expected: list[int], timeout_s: float = 120
) -> None:
    """The server answers the row 200 with Kiln's class (the same model, not just a 200),
    within `timeout_s` (a replica may still be starting behind a ready front)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            answer = httpx.post(url, content=body, headers=headers, timeout=30)
        except httpx.HTTPError as exc:
            last = repr(exc)
        else:
            if answer.status_code == 200:
                found = answer.json()
                labels = found.get("predictions")
                if labels is None and "outputs" in found:  # V2
                    labels = found["outputs"][0]["data"]
                if flatten(labels) != expected:
                    raise Skip(f"answered {found} for the row; Kiln's model says {expected}")
                return
            last = f"{answer.status_code} {answer.text[:200]}"
        time.sleep(0.5)
    raise Skip(f"no 200 answer in {timeout_s} s: {last}")


def flatten(value: Any) -> list[int]:
    """[[3]], [3] or 3 -> [3]: the labels, whatever nesting a protocol gives them."""
    if isinstance(value, list):
        return [label for item in value for label in flatten(item)]
    return [int(value)]


def write_mlserver_settings(folder: Path, env: dict[str, str], workers: int) -> None:
    (folder / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": int(env["PEER_PORT"]),
                "grpc_port": int(env["PEER_GRPC_PORT"]),
                "metrics_port": int(env["PEER_METRICS_PORT"]),
                "parallel_workers": workers,
                "debug": False,
            }
        )
    )
    (folder / "model-settings.json").write_text(
        json.dumps({"name": "peer", "implementation": "mlserver_peer.TorchMLP"})
    )


@dataclass
class KilnHome:
    """A temporary KILN_HOME with both models registered and a predict key."""

    home: Path
    secret: str

    @classmethod
    def create(cls, kinds: list[str]) -> KilnHome:
        from kiln.actors.registry import RegistryService
        from kiln.settings import Settings
        from tests.e2e.kiln_process import kiln_env, kiln_json

        home = Path(tempfile.mkdtemp(prefix="kiln-peers-"))
        settings = Settings(kiln_home=home)
        registry = RegistryService(str(settings.registry_db), settings.storage_uri)
        for kind in kinds:
            files = model_files(kind)
            registry.register(f"bench-{kind}", files, json.loads(files["spec.json"]), {}, {})
        made = kiln_json(kiln_env(home, free_port()), "keys", "create", "--scope", "predict:*")
        return cls(home, made["secret"])


def run_kiln_arm(
    home: KilnHome,
    kind: str,
    replicas: int | None,
    args: argparse.Namespace,
    scratch: Path,
    grpc_out: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`kiln serve bench-KIND [--num-replicas N]` as a user starts it, measured with wrk (and
    on its gRPC port into `grpc_out`, when given); Ctrl-C after."""
    from tests.e2e.kiln_process import KilnServe, kiln_env

    port = free_port()
    extra = ["--num-replicas", str(replicas)] if replicas else []
    # gRPC stays on (a default) on a port of its own: 9000 may be another server's.
    grpc_port = free_port()
    env = kiln_env(home.home, port, KILN_GRPC_PORT=str(grpc_port))
    serve = KilnServe(env, [f"bench-{kind}", *extra], scratch / f"kiln-{kind}-{replicas}.log")
    path = f"/v1/models/bench-{kind}:predict"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {home.secret}"}
    before, wait_before = load_avg(), cpu_pressure()
    try:
        try:
            serve.start(timeout_s=args.start_timeout_s)
        except AssertionError as exc:
            raise Skip(f"kiln serve did not start: {last_line(str(exc))}") from None
        check_answer(f"{serve.url}{path}", v1_body(), headers, args.expected[kind])
        script = scratch / f"kiln-{kind}.lua"
        script.write_text(lua(path, v1_body(), headers))
        figures = measure(serve.url, script, args.duration_s, args.warmup_s)
        if grpc_out is not None:
            auth = {"authorization": f"Bearer {home.secret}"}
            grpc_out.update(
                measure_grpc(f"127.0.0.1:{grpc_port}", f"bench-{kind}", "features", auth, args)
            )
    finally:
        try:
            serve.interrupt()
        except Exception:  # noqa: BLE001 (it may have died already: kill what it left)
            pass
        serve.kill()
        wait_port_free(port)
    return {**figures, **conditions(before, wait_before)}


# ----------------------------------------------------------------------------- report


def best_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm measured in several rounds: at each level its best valid point (most requests/s
    at c64, the lowest p50 at c1), with every round's headline figures beside it."""
    measured = [r for r in results if "skipped" not in r]
    if len(results) == 1 or not measured:
        return results[-1]
    out: dict[str, Any] = {k: v for k, v in measured[0].items() if not k.startswith("c")}
    out["load_before"] = min(r["load_before"] for r in measured)
    out["load_after"] = max(r["load_after"] for r in measured)
    for level in LEVELS:
        points = [r[f"c{level}"] for r in measured if f"c{level}" in r]
        valid = [p for p in points if not p.get("invalid")]
        if level == 1:
            chosen = min(valid, key=lambda p: p["p50_ms"]) if valid else points[0]
        else:
            chosen = max(valid, key=lambda p: p["rps"]) if valid else points[0]
        out[f"c{level}"] = chosen
    out["rounds"] = [
        {
            "c1_p50_ms": r.get("c1", {}).get("p50_ms"),
            "c64_rps": r.get("c64", {}).get("rps"),
            "load": [r["load_before"], r["load_after"]],
            "cpu_wait_pct": [r.get("cpu_wait_pct_before"), r.get("cpu_wait_pct_after")],
        }
        for r in measured
    ]
    out["skipped_rounds"] = [r["skipped"] for r in results if "skipped" in r]
    return out


def figure(arm: dict[str, Any], level: int) -> float | None:
    """The arm's headline figure at `level` (req/s at c64, p50 ms at c1), None if invalid."""
    point = arm.get(f"c{level}")
    if not point or point.get("invalid"):
        return None
    return point["p50_ms"] if level == 1 else point["rps"]  # type: ignore[no-any-return]


def better(level: int, a: float, b: float) -> bool:
    """Is figure `a` better than `b`: more requests/s at c64, a lower p50 at c1."""
    return a < b if level == 1 else a > b


def compare(
    arms: dict[str, dict[str, Any]], kiln_arm: str, kind: str, level: int, transport: str = ""
) -> dict[str, Any]:
    """Kiln's figure, the best valid peer arm's, and Kiln's ratio to it (Kiln / peer); among
    HTTP arms, or among arms named `grpc:...` with transport="grpc:"."""
    best_name, best = None, None
    for name, arm in arms.items():
        plain = name.removeprefix(transport)
        if (transport and plain == name) or (not transport and name.startswith("grpc:")):
            continue
        if plain.startswith("kiln") or not plain.endswith(f"/{kind}"):
            continue
        value = figure(arm, level)
        if value is not None and (best is None or better(level, value, best)):
            best_name, best = name, value
    kiln_value = figure(arms.get(f"{transport}{kiln_arm}/{kind}", {}), level)
    return {
        "kiln": kiln_value,
        "best_peer": best_name.removeprefix(transport).rsplit("/", 1)[0] if best_name else None,
        "best": best,
        "ratio": round(kiln_value / best, 3) if kiln_value and best else None,
    }


def summary(arms: dict[str, dict[str, Any]], kinds: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in kinds:
        for level in LEVELS:
            key = f"{kind}_c{level}_{'p50_ms' if level == 1 else 'rps'}"
            out[key] = compare(arms, "kiln", kind, level)
            same = compare(arms, "kiln-2-replicas", kind, level)
            out[key]["kiln_2_replicas"] = same["kiln"]
            out[key]["ratio_2_replicas"] = same["ratio"]
            if any(name.startswith("grpc:") and name.endswith(f"/{kind}") for name in arms):
                out[f"grpc_{key}"] = compare(arms, "kiln", kind, level, "grpc:")
                same = compare(arms, "kiln-2-replicas", kind, level, "grpc:")
                out[f"grpc_{key}"]["kiln_2_replicas"] = same["kiln"]
                out[f"grpc_{key}"]["ratio_2_replicas"] = same["ratio"]
    return out


def row(name: str, arm: dict[str, Any]) -> str:
    cells = []
    for level in LEVELS:
        point = arm.get(f"c{level}")
        if not point:
            cells.append(f"{'-':>24}")
            continue
        text = f"{point['rps']:8.0f}/s p50 {point['p50_ms'] or 0:6.2f} ms"
        cells.append(text + (" INVALID" if point.get("invalid") else ""))
    load = f"load {arm.get('load_before', '?')}->{arm.get('load_after', '?')}"
    wait = f"cpu wait {arm.get('cpu_wait_pct_before', '?')}->{arm.get('cpu_wait_pct_after', '?')}%"
    return f"{name:<28} " + "  ".join(cells) + f"  {load}  {wait}"


def cpu_info() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", text)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
    return {
        "cpu": model.group(1).strip() if model else "unknown",
        "cores": CORES,
        "flags": [f for f in wanted if f in flags],
    }


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- main


def grpc_available() -> bool:
    """The gRPC arm needs benchmarks/grpc_load.py and tritonclient's gRPC stubs here."""
    import importlib.util

    return (ROOT / "benchmarks" / "grpc_load.py").exists() and all(
        importlib.util.find_spec(m) is not None for m in ("grpc", "tritonclient.grpc")
    )


PANELS = [
    ("light", "c64", "rps", "light c64, requests/s (higher is better)"),
    ("light", "c1", "p50_ms", "light c1, p50 ms (lower is better)"),
    ("medium", "c64", "rps", "medium c64, requests/s"),
    ("grpc", "c64", "rps", "gRPC light c64, calls/s"),
]


Bars = list[tuple[str, list[float | None]]]


def panel_bars(arms: dict[str, Any]) -> list[Bars]:
    """Per panel (PANELS), each server that has a valid figure there with its pair of figures
    (one worker or replica, two; None where that arm is missing or invalid), Kiln last."""

    def value(name: str, kind: str, level: str, metric: str) -> float | None:
        arm = arms.get(f"grpc:{name}/light" if kind == "grpc" else f"{name}/{kind}", {})
        point = arm.get(level) or {}
        return None if arm.get("invalid") or point.get("invalid") else point.get(metric)

    servers = [*dict.fromkeys(n.split("/")[0].split(":")[-1].rsplit("-", 1)[0] for n in arms)]
    servers = [s for s in servers if s not in ("kiln", "kiln-2")] + ["kiln"]
    panels: list[Bars] = []
    for kind, level, metric, _ in PANELS:
        bars: Bars = []
        for name in servers:
            one, two = ("kiln", "kiln-2-replicas") if name == "kiln" else (f"{name}-1", f"{name}-2")
            pair = [value(one, kind, level, metric), value(two, kind, level, metric)]
            if any(v is not None for v in pair):
                bars.append((name, pair))
        panels.append(bars)
    return panels


def plot_result(result_path: Path, png: Path) -> None:
    """Every server's figures from a run's JSON line (the last line of RESULT): a panel per
    model and concurrency, a pair of bars per server (one worker or replica, and two)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [line for line in result_path.read_text().splitlines() if line[:1] == "{"]
    result = json.loads(lines[-1])
    panels = panel_bars(result["arms"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), dpi=100)
    for ax, (_, _, metric, title), bars in zip(axes.flat, PANELS, panels, strict=True):
        for i, (name, pair) in enumerate(bars):
            color = "tab:orange" if name == "kiln" else "tab:blue"
            for j, figure_ in enumerate(pair):
                if figure_ is not None:
                    at = i + (j - 0.5) * 0.38
                    ax.barh(at, figure_, 0.36, color=color, alpha=1 - 0.45 * j)
                    label = f" {figure_:.2f}" if metric == "p50_ms" else f" {figure_:,.0f}"
                    ax.text(figure_, at, label, va="center", fontsize=7)
        ax.set_yticks(range(len(bars)), [name for name, _ in bars])
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.margins(x=0.18)
    peers = {name for bars in panels for name, _ in bars} - {"kiln"}
    fig.suptitle(
        f"Kiln and {len(peers)} model servers on one {result.get('cpu', '?')}, "
        f"{result.get('cores', '?')} cores ({', '.join(result.get('flags', []))}); "
        "each pair: 1 worker or replica, then 2",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s per point (trying it out).")
    parser.add_argument("--duration-s", type=int, default=8)
    parser.add_argument("--peers", default=",".join(PEERS), help="Comma-separated peers.")
    parser.add_argument("--models", default=",".join(KINDS), help="light,medium")
    parser.add_argument("--no-kiln", action="store_true", help="Peers only.")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Measure every arm this many times (every other round in reverse order) and keep "
        "each arm's best valid point: on a shared machine other work only slows an arm down.",
    )
    parser.add_argument("--start-timeout-s", type=float, default=240)
    parser.add_argument(
        "--no-grpc",
        dest="grpc",
        action="store_false",
        help="Skip the gRPC arm (Kiln's V2 gRPC against PyTriton's, light model).",
    )
    parser.add_argument(
        "--plot",
        nargs=2,
        metavar=("RESULT", "PNG"),
        help="Draw a run's JSON line (the last line of RESULT) as bar charts; runs nothing.",
    )
    args = parser.parse_args()
    if args.plot:
        plot_result(Path(args.plot[0]), Path(args.plot[1]))
        return
    if args.grpc and not grpc_available():
        say("gRPC arm skipped: benchmarks/grpc_load.py or tritonclient[grpc] is missing")
        args.grpc = False
    if args.quick:
        args.duration_s = 2
    args.warmup_s = 1 if args.quick else 3
    kinds = [k for k in args.models.split(",") if k]
    names = [p for p in args.peers.split(",") if p]
    if unknown := [n for n in names if n not in PEERS]:
        raise SystemExit(f"Got {', '.join(unknown)} for --peers. Choose from: {', '.join(PEERS)}.")
    if shutil.which("wrk") is None:
        from benchmarks.serve_throughput import ensure_wrk

        ensure_wrk()
    scratch = Path(tempfile.mkdtemp(prefix="serve-peers-"))
    for kind in kinds:
        write_weights(kind, scratch / f"weights-{kind}.npz")
    args.expected = {kind: kiln_answer(kind) for kind in kinds}
    runs: dict[str, list[dict[str, Any]]] = {}
    peers_out: dict[str, Any] = {}
    say(f"{'arm':<28} {'c1':>24}  {'c64':>24}")

    def record(name: str, arm: dict[str, Any], round_: int) -> None:
        runs.setdefault(name, []).append(arm)
        tag = f" r{round_ + 1}" if args.rounds > 1 else ""
        if "skipped" in arm:
            say(f"{name}{tag}: skipped: {arm['skipped']}")
        else:
            say(row(name + tag, arm))

    installed: dict[str, Path] = {}
    for name in names:
        peer = PEERS[name]
        info: dict[str, Any] = {"setup": peer.setup, "protocol": peer.path}
        peers_out[name] = info
        try:
            python, facts = ensure_peer(peer, scratch / f"{name}-dry-run.txt")
            info.update(facts)
            installed[name] = python
        except (Skip, subprocess.SubprocessError, OSError) as exc:
            info["skipped"] = str(exc)
            say(f"{name}: skipped: {exc}")

    def attempt(run: Callable[..., dict[str, Any]], *run_args: Any) -> dict[str, Any]:
        """An arm, tried twice (a start can time out on a busy machine); never raises."""
        reason = ""
        for _ in range(2):
            try:
                return run(*run_args)
            except Exception as exc:  # noqa: BLE001 (one arm never ends the run)
                reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, Skip) else str(exc)
        return {"skipped": reason}

    def peer_arms(name: str, round_: int) -> None:
        for kind in kinds:
            for workers in (1, 2):
                arm_name = f"{name}-{workers}/{kind}"
                wants = args.grpc and name == "pytriton" and kind == "light"
                grpc_arm: dict[str, Any] | None = {} if wants else None
                arm = attempt(
                    run_peer_arm,
                    PEERS[name],
                    installed[name],
                    kind,
                    workers,
                    args,
                    scratch,
                    grpc_arm,
                )
                record(arm_name, arm, round_)
                if grpc_arm:
                    record(f"grpc:{arm_name}", grpc_arm, round_)

    kiln_out: dict[str, Any] = {}
    home = None if args.no_kiln else KilnHome.create(kinds)

    def kiln_arms(round_: int) -> None:
        assert home is not None
        for replicas, label in ((None, "kiln"), (2, "kiln-2-replicas")):
            for kind in kinds:
                arm_name = f"{label}/{kind}"
                wants = args.grpc and kind == "light"
                grpc_arm: dict[str, Any] | None = {} if wants else None
                arm = attempt(run_kiln_arm, home, kind, replicas, args, scratch, grpc_arm)
                record(arm_name, arm, round_)
                if grpc_arm:
                    record(f"grpc:{arm_name}", grpc_arm, round_)

    units = [*installed, *([] if home is None else ["kiln"])]
    for round_ in range(args.rounds):
        # Every other round in reverse: drift of a shared machine falls on both ends alike.
        for unit in units if round_ % 2 == 0 else units[::-1]:
            if unit == "kiln":
                kiln_arms(round_)
            else:
                peer_arms(unit, round_)
    arms = {name: best_of(results) for name, results in runs.items()}
    if home is not None:
        kiln_out = {
            "defaults": "kiln serve bench-KIND: 1 replica, 1 CPU (one torch thread), auth on, "
            "prediction log 1.0, metrics on, max_batch_size 64",
            "same_topology": "kiln serve bench-KIND --num-replicas 2 (the peers' best: 2 workers)",
        }
    from importlib.metadata import version

    out = {
        **summary(arms, kinds),
        "grpc": (
            "Kiln's V2 ModelInfer (kiln serve's gRPC port, the key as metadata) against "
            "PyTriton's (Triton's C++ gRPC front end), light; benchmarks/grpc_load.py: "
            "grpc.aio, at most 6 callers per connection (perf_analyzer's channel sharing), "
            "raw FP32 contents"
            if args.grpc
            else "not run"
        ),
        **cpu_info(),
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "rounds": args.rounds,
        "wrk": " ".join(wrk_command("URL", 64, args.duration_s, Path("PEER.lua"))),
        "kiln": {**kiln_out, "version": version("kiln-maas"), "torch": version("torch")},
        "peers": peers_out,
        "arms": arms,
        "load_avg_end": list(os.getloadavg()),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
