"""kiln-grpc-front (serving/native/grpc_front.cc) without Ray: the C++ front in its own process
against a stand-in replica (uvicorn on a Unix socket, answering as GrpcBridge does), called
with grpc's generic stubs. What it must do: hand every message's bytes and the call's
metadata over unchanged, with the token; answer with the replica's status and message; keep a
stream's answers in order; say UNAVAILABLE when the replica is gone and go on; hold at most
its connections' worth of calls in the replica; die with the process that started it.
The served path (tritonclient against `kiln serve`) is tests/e2e/test_grpc_user.py."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import uvicorn

from kiln.serving.direct import NATIVE_FRONT
from tests.conftest import wait_for

SERVICE = "/inference.GRPCInferenceService/"
TOKEN = "t0ken"

pytestmark = pytest.mark.skipif(
    not NATIVE_FRONT.is_file(), reason="the native gRPC front is not built (make native)"
)


class StandIn:
    """A replica's bridge as the front sees it: records each request, answers by method."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.hold_s = 0.0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"]]
        self.seen.append({"path": scope["path"], "headers": headers, "body": body})
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.hold_s)
        finally:
            self.in_flight -= 1
        method = scope["path"].rsplit("/", 1)[1]
        status, text, payload = 0, "", body[::-1]
        if method == "ModelReady":
            status, text, payload = 5, 'model "x" not found: café 100%', b""
        answer = [
            (b"content-length", str(len(payload)).encode()),
            (b"grpc-status", str(status).encode()),
            (b"grpc-message", urllib.parse.quote(text, safe=' "').encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": answer})
        await send({"type": "http.response.body", "body": payload})


class Replica:
    """The stand-in served by uvicorn on a Unix socket, in a thread of this process."""

    def __init__(self, path: str) -> None:
        self.app = StandIn()
        config = uvicorn.Config(self.app, uds=path, log_config=None, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert wait_for(lambda: self.server.started, 10)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_front(port: int, upstream: str, connections: int = 32) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            str(NATIVE_FRONT),
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            upstream,
            "--connections",
            str(connections),
        ],
        env={**os.environ, "KILN_GRPC_FRONT_TOKEN": TOKEN},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == b"listening\n"
    return process


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Replica, grpc.Channel, str]]:
    upstream = str(tmp_path / "replica.sock")
    replica = Replica(upstream)
    port = free_port()
    front = start_front(port, upstream, connections=8)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield replica, channel, upstream
    finally:
        channel.close()
        front.send_signal(signal.SIGTERM)
        assert front.wait(15) == 0
        replica.stop()


def unary(channel: grpc.Channel, method: str) -> Any:
    return channel.unary_unary(SERVICE + method)


def test_a_message_and_its_metadata_reach_the_replica_unchanged(setup):
    replica, channel, _ = setup
    message = bytes(range(256)) * 40  # every byte value, 10 KiB
    metadata = [("authorization", "Bearer k3y"), ("x-kiln-sticky", "a"), ("trace-bin", b"\x00\x01")]
    answer = unary(channel, "ModelInfer")(message, metadata=metadata, timeout=10)
    assert answer == message[::-1]
    (seen,) = replica.app.seen
    headers = dict(seen["headers"])
    assert seen["path"] == "/v2/grpc/ModelInfer" and seen["body"] == message
    assert headers["x-kiln-front"] == TOKEN
    assert headers["authorization"] == "Bearer k3y" and headers["x-kiln-sticky"] == "a"
    assert "trace-bin" not in headers  # binary metadata is not a header


def test_the_replicas_status_and_message_reach_the_client(setup):
    _, channel, _ = setup
    with pytest.raises(grpc.RpcError) as caught:
        unary(channel, "ModelReady")(b"", timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == 'model "x" not found: café 100%'


def test_methods_outside_the_service_are_unimplemented_without_reaching_the_replica(setup):
    replica, channel, _ = setup
    for path in (SERVICE + "RepositoryIndex", "/other.Service/ModelInfer"):
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(path)(b"x", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert replica.app.seen == []


def test_a_stream_is_answered_message_by_message_in_order(setup):
    replica, channel, _ = setup
    stream = channel.stream_stream(SERVICE + "ModelStreamInfer")
    sent = [f"request {i}".encode() for i in range(6)]
    answers = list(stream(iter(sent), timeout=10))
    assert answers == [m[::-1] for m in sent]
    assert [s["path"] for s in replica.app.seen] == ["/v2/grpc/ModelStreamInfer"] * 6


def test_many_calls_at_once_are_all_answered_within_the_front_connections(setup):
    replica, channel, _ = setup
    replica.app.hold_s = 0.02  # a batch's time in the replica
    call = unary(channel, "ModelInfer")
    futures = [call.future(f"call {i}".encode(), timeout=30) for i in range(64)]
    assert [f.result() for f in futures] == [f"call {i}".encode()[::-1] for i in range(64)]
    assert 1 < replica.app.most_in_flight <= 8  # --connections 8


def test_a_gone_replica_is_unavailable_and_the_front_goes_on(setup, tmp_path):
    replica, channel, upstream = setup
    assert unary(channel, "ModelInfer")(b"ab", timeout=10) == b"ba"
    replica.stop()
    with pytest.raises(grpc.RpcError) as caught:
        unary(channel, "ModelInfer")(b"ab", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    if os.path.exists(upstream):
        os.unlink(upstream)
    back = Replica(upstream)  # a connection opened afresh on the next call
    try:
        assert unary(channel, "ModelInfer")(b"cd", timeout=10) == b"dc"
    finally:
        back.stop()


def test_the_front_dies_with_the_process_that_started_it(tmp_path):
    upstream, port = str(tmp_path / "replica.sock"), free_port()
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import subprocess, sys, os, time\n"
                f"p = subprocess.Popen([{str(NATIVE_FRONT)!r}, '--listen', '127.0.0.1:{port}', "
                f"'--upstream', {upstream!r}], env={{**os.environ, 'KILN_GRPC_FRONT_TOKEN': 't'}}, "
                "stdout=subprocess.PIPE)\n"
                "p.stdout.readline()\nprint(p.pid, flush=True)\ntime.sleep(600)\n"
            ),
        ],
        stdout=subprocess.PIPE,
    )
    assert parent.stdout is not None
    front_pid = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: no cleanup of its own
    parent.wait(10)

    def gone() -> bool:
        try:
            os.kill(front_pid, 0)
        except ProcessLookupError:
            return True
        # A zombie waits for its parent's reaper (init): it no longer holds the port.
        with open(f"/proc/{front_pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"

    assert wait_for(gone, 10)
    with socket.socket() as sock:  # the port is free again
        sock.bind(("127.0.0.1", port))


def test_bad_arguments_are_one_line_and_exit_2(tmp_path):
    done = subprocess.run([str(NATIVE_FRONT), "--listen", "127.0.0.1:1"], capture_output=True)
    assert done.returncode == 2
    assert done.stderr.decode().splitlines()[0] == (
        "kiln-grpc-front: --listen and --upstream are needed"
    )
    done = subprocess.run(
        [str(NATIVE_FRONT), "--listen", "127.0.0.1:1", "--upstream", str(tmp_path / "s")],
        capture_output=True,
        env={k: v for k, v in os.environ.items() if k != "KILN_GRPC_FRONT_TOKEN"},
    )
    assert done.returncode == 2 and b"KILN_GRPC_FRONT_TOKEN is not set" in done.stderr
