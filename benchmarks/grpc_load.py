"""A gRPC load generator for the Open Inference Protocol V2 (`inference.GRPCInferenceService`
ModelInfer), bounded in time, and a run of it beside wrk (HTTP V1) against a running
`kiln serve`.

Importable (benchmarks/serve_peers.py compares Kiln's gRPC with PyTriton's through it):

    from benchmarks.grpc_load import run_grpc_load
    result = run_grpc_load(
        "127.0.0.1:9000",             # host:port of the gRPC server
        "dgm",                        # model name
        np.ones((1, 64), np.float32), # the rows each request sends (FP32 `features` [N, F])
        concurrency=64,               # requests in flight at once
        seconds=8.0,                  # measured time, after `warmup_s` (1 s) unmeasured
        headers={"authorization": "Bearer kiln_..."},  # gRPC metadata, or None
    )
    # {"concurrency": 64, "requests": ..., "errors": ..., "req_s": ..., "p50_ms": ...,
    #  "p99_ms": ..., "client_cpu_us_per_req": ...}

One process, one asyncio loop (grpc.aio): `concurrency` tasks each send the same request
(serialised once, as tritonclient's binary `raw_input_contents`) and wait for the answer; a
non-OK status counts as an error, not a latency. Callers share HTTP/2 connections as Triton's
perf_analyzer does: its C++ client gives each concurrent worker a client and lets at most 6
share one channel (TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT, triton-inference-server/client
PR 55), so c64 runs on 11 connections and c1 on one (`share` changes it). The client's own CPU per
request is reported too: on a 2-core machine the generator competes with the server, as wrk
does. `input_name`/`datatype` fit other servers' models (PyTriton names its own inputs).

Against a running `kiln serve` (its gRPC and HTTP ports, a model of 64 inputs and a key),
gRPC at c1 and c64 and wrk on V1 `:predict` at c1 and c64, interleaved rounds, one JSON line
last:

    python benchmarks/grpc_load.py --grpc 127.0.0.1:9000 --http http://127.0.0.1:8000 \\
        --model dgm --key kiln_... [--seconds 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SERVICE_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def infer_request_bytes(
    model: str, rows: np.ndarray, input_name: str = "features", datatype: str = "FP32"
) -> bytes:
    """A serialised ModelInferRequest carrying `rows` as raw_input_contents."""
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype=datatype, shape=list(rows.shape))
    request.raw_input_contents.append(np.ascontiguousarray(rows).tobytes())
    return request.SerializeToString()  # type: ignore[no-any-return]


def run_grpc_load(
    host_port: str,
    model: str,
    rows_payload: np.ndarray,
    concurrency: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    warmup_s: float = 1.0,
    input_name: str = "features",
    datatype: str = "FP32",
    share: int = 6,
) -> dict[str, Any]:
    """`concurrency` callers sending ModelInfer for `seconds` (after `warmup_s`), at most
    `share` of them on one connection; see the module's docstring for the result."""
    payload = infer_request_bytes(model, rows_payload, input_name, datatype)
    metadata = tuple((k.lower(), v) for k, v in (headers or {}).items())
    channels = -(-concurrency // max(1, share))
    return asyncio.run(
        _load(host_port, payload, metadata, concurrency, channels, seconds, warmup_s)
    )


async def _load(
    host_port: str,
    payload: bytes,
    metadata: tuple[tuple[str, str], ...],
    concurrency: int,
    channels: int,
    seconds: float,
    warmup_s: float,
) -> dict[str, Any]:
    import grpc

    identity = lambda raw: raw  # noqa: E731 (bytes in, bytes out: no client-side parsing)
    # A local subchannel pool: channels with the same target and options would otherwise
    # share one TCP connection (gRPC core's global pool).
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
    opened = [grpc.aio.insecure_channel(host_port, options=options) for _ in range(channels)]
    try:
        calls = [
            channel.unary_unary(
                SERVICE_METHOD, request_serializer=identity, response_deserializer=identity
            )
            for channel in opened
        ]
        for call in calls:  # connect each, and fail early
            await call(payload, metadata=metadata or None, timeout=30)
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + seconds
        latencies: list[float] = []
        errors = [0]
        answered = [0]  # every call answered, warm-up included: the CPU spans them all

        async def caller(call: Any) -> None:
            while True:
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                try:
                    await call(payload, metadata=metadata or None, timeout=30)
                except grpc.aio.AioRpcError:
                    if sent >= measure_from:
                        errors[0] += 1
                    continue
                answered[0] += 1
                if sent >= measure_from:
                    latencies.append(time.perf_counter() - sent)

        await asyncio.sleep(0)
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(caller(calls[i % channels]) for i in range(concurrency)))
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        for channel in opened:
            await channel.close()
    done = len(latencies)
    ms = np.asarray(latencies) * 1000.0
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "concurrency": concurrency,
        "connections": channels,
        "requests": done,
        "errors": errors[0],
        "req_s": done / seconds,
        "p50_ms": float(np.percentile(ms, 50)) if done else None,
        "p99_ms": float(np.percentile(ms, 99)) if done else None,
        "client_cpu_us_per_req": cpu_s / max(1, answered[0]) * 1e6,
    }


def http_wrk(url: str, model: str, key: str, connections: int, seconds: int) -> dict[str, Any]:
    """wrk on V1 :predict with one row of 64 features and the key (serve_throughput's runner)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.serve_throughput import LUA, run_wrk

    lua = LUA + f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    return run_wrk(f"{url}/v1/models/{model}:predict", connections, seconds, lua)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpc", required=True, help="host:port of kiln serve's gRPC")
    parser.add_argument("--http", help="kiln serve's HTTP base URL: wrk on V1 beside gRPC")
    parser.add_argument("--model", required=True)
    parser.add_argument("--key", default=os.environ.get("KILN_API_KEY"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--features", type=int, default=64)
    args = parser.parse_args()
    headers = {"authorization": f"Bearer {args.key}"} if args.key else None
    rows = np.full((1, args.features), 1.5, dtype=np.float32)
    use_wrk = bool(args.http) and shutil.which("wrk") is not None
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(args.rounds):
        for c in (1, 64):
            load = os.getloadavg()[0]
            result = run_grpc_load(args.grpc, args.model, rows, c, args.seconds, headers)
            result["load_avg"] = load
            runs.setdefault(f"grpc_c{c}", []).append(result)
            print(f"round {round_} grpc c{c}: {json.dumps(result)}", flush=True)
            if use_wrk:
                load = os.getloadavg()[0]
                http = http_wrk(args.http, args.model, args.key, c, int(args.seconds))
                http["load_avg"] = load
                runs.setdefault(f"http_c{c}", []).append(http)
                print(f"round {round_} http c{c}: {json.dumps(http)}", flush=True)
    summary: dict[str, Any] = {"cpu_count": os.cpu_count()}
    for name, results in runs.items():  # the best round of each (the machine is shared)
        rate = "req_s" if name.startswith("grpc") else "rps"
        best = max(results, key=lambda r: r[rate])
        summary[f"{name}_req_s"] = round(best[rate], 1)
        summary[f"{name}_p50_ms"] = round(best["p50_ms"], 3)
        summary[f"{name}_p99_ms"] = round(best["p99_ms"], 3)
        summary[f"{name}_load_avg"] = best["load_avg"]
    if "http_c64_req_s" in summary:
        summary["grpc_vs_http_c64"] = round(
            summary["grpc_c64_req_s"] / summary["http_c64_req_s"], 3
        )
        summary["grpc_vs_http_c1_p50"] = round(
            summary["grpc_c1_p50_ms"] / summary["http_c1_p50_ms"], 3
        )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
