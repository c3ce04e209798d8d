"""What a Python gRPC server costs before any model work: a bare grpc.aio ModelInfer server
under benchmarks/grpc_load.py, on this machine.

The server answers every ModelInfer with one fixed ModelInferResponse and reads the call's
metadata (as Kiln does for its key): grpc.aio's own per-call work and nothing else. It runs in
a process of its own, on uvloop as a Ray Serve replica does; its CPU per call is read from
/proc. The figure is the ceiling of any Python gRPC server on these cores with this load
generator, and the floor under Kiln's gRPC figure (issue 32, docs/design-notes.md):

    python benchmarks/grpc_floor.py [--seconds 6] [--rounds 2] \\
        [--grpc-experiments -event_engine_listener]

`--grpc-experiments` sets GRPC_EXPERIMENTS in the server's process only (gRPC core's
switches; the load generator keeps its defaults), and adds an arm beside the default one.
Prints one line per arm and round, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from benchmarks.grpc_load import run_grpc_load  # noqa: E402
from benchmarks.serve_peers import cpu_info  # noqa: E402

METHODS = ("ModelInfer", "ModelMetadata", "ModelReady", "ModelConfig")
SERVER_METHODS = ("ServerReady", "ServerLive", "ServerMetadata")


def bare_server(port: int, experiments: str) -> None:
    """A grpc.aio server on uvloop whose every RPC answers one fixed response."""
    if experiments:
        os.environ["GRPC_EXPERIMENTS"] = experiments
    import grpc
    import uvloop
    from tritonclient.grpc import service_pb2 as pb

    from kiln.serving import grpc_v2

    answer = pb.ModelInferResponse(model_name="m", model_version="1")
    answer.outputs.add(name="predictions", datatype="INT64", shape=[1])
    answer.raw_output_contents.append(np.zeros(1, np.int64).tobytes())

    class Fixed:
        async def _answer(self, request: Any, context: Any) -> Any:
            context.invocation_metadata()
            return answer

    for method in METHODS + SERVER_METHODS:
        setattr(Fixed, method, Fixed._answer)

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        grpc_v2.add_inference_servicer(Fixed(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the bare gRPC server did not listen on {port} within {timeout_s} s")


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def arm(experiments: str, concurrency: int, seconds: float) -> dict[str, Any]:
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(
        target=bare_server, args=(port, experiments), daemon=True
    )
    server.start()
    try:
        wait_listening(port)
        assert server.pid is not None
        watched = psutil.Process(server.pid)
        rows = np.full((1, 64), 1.5, dtype=np.float32)
        run_grpc_load(f"127.0.0.1:{port}", "m", rows, concurrency, 1.0)  # warm
        before = cpu_s(watched)
        load = run_grpc_load(f"127.0.0.1:{port}", "m", rows, concurrency, seconds, warmup_s=0.0)
        used = cpu_s(watched) - before
    finally:
        server.terminate()
        server.join(10)
    calls = max(1, load["requests"])
    return {
        "grpc_experiments": experiments or "default",
        "concurrency": concurrency,
        "req_s": round(load["req_s"]),
        "p50_ms": round(load["p50_ms"], 3) if load["p50_ms"] else None,
        "server_cpu_us_per_call": round(used / calls * 1e6),
        "client_cpu_us_per_call": round(load["client_cpu_us_per_req"]),
        "errors": load["errors"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--grpc-experiments", default="", help="e.g. -event_engine_listener")
    args = parser.parse_args()
    settings = [""] + ([args.grpc_experiments] if args.grpc_experiments else [])
    results: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        for experiments in settings:
            for concurrency in args.concurrency:
                found = arm(experiments, concurrency, args.seconds)
                print(json.dumps(found), file=sys.stderr, flush=True)
                results.append(found)
    best: dict[str, Any] = {}
    for found in results:
        key = f"{found['grpc_experiments']} c{found['concurrency']}"
        if key not in best or found["req_s"] > best[key]["req_s"]:
            best[key] = found
    print(json.dumps({"machine": cpu_info(), "load_avg": os.getloadavg(), "best": best}))


if __name__ == "__main__":
    main()
