"""Kiln's direct HTTP ingress: each replica answers the Kiln port itself (`kiln serve --ingress
direct`).

Serve's own ingress puts two stages in front of Kiln's ASGI app: HAProxy (one process a node)
and, in the replica, Serve's uvicorn server with its proxy-header, request-id and ASGI
wrappers around the app. For an overhead-bound model they cost more than the model does
(docs/design-notes.md, issue 32: ~1 ms of CPU a request at c64 against ~0.24 ms in Kiln's
code). With the direct ingress every replica on a node opens the same port with
SO_REUSEPORT, the kernel spreads connections over them, and a request goes from the socket to
a plain uvicorn server (httptools, uvloop: the replica's loop) to the same Kiln app: the lean
predict path, auth, the prediction log and metrics all unchanged. Serve still starts, places,
health-checks, reconfigures and replaces the replicas, and its own ingress keeps answering on
a port of its own (`kiln serve` takes a free one).

What the direct ingress does not have, by construction: Serve's autoscaling counts only the
requests Serve routes (so `kiln serve` refuses `--ingress direct` with `--max-replicas`), and
a replica's connections close with it (a client's keep-alive connection to a replica that is
replaced sees its next request refused, and reconnects to a live one; a request in flight is
finished first: uvicorn's graceful shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

logger = logging.getLogger(__name__)

BACKLOG = 2048
NATIVE_FRONT = Path(__file__).resolve().parent / "native" / "kiln-grpc-front"
"""The C++ gRPC front end (serving/native/grpc_front.cc), where `make native` built it."""
FRONT_CONNECTIONS = 32
"""The native front's connections to its replica, one request in flight on each: at most this
many of its calls in the replica at once (they batch together as HTTP requests do)."""
FRONT_START_S = 30.0


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port that every replica of the node may open at once; it joins
    the port's share of connections when it listens (DirectServer._serve), not before."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Listener:
    """A server a replica runs on its own loop beside Serve's; `failed` once it ended without
    being asked to (the replica's health check then fails, and Serve replaces the replica)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.task: asyncio.Task[None] | None = None
        self.stopping = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start serving on `loop` (once: a second call, or one after stop, does nothing)."""
        if self.task is not None or self.stopping:
            return
        self.task = loop.create_task(self._serve())
        self.task.add_done_callback(self._ended)

    async def _serve(self) -> None:
        raise NotImplementedError

    @property
    def failed(self) -> bool:
        return self.task is not None and self.task.done() and not self.stopping

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("direct ingress on port %s stopped: %r", self.port, task.exception())


class DirectServer(_Listener):
    """One replica's uvicorn server on the node's shared Kiln port, on the replica's loop."""

    def __init__(self, app: Any, host: str, port: int, private: str | None = None) -> None:
        super().__init__(port)
        self.sock = reuse_port_socket(host, port)
        self.private: socket.socket | None = None
        """A Unix socket only this replica's native gRPC front connects to (`private`: its
        path); it queues connections from now, and is served with the port."""
        if private is not None:
            self.private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.private.bind(private)
            self.private.listen(BACKLOG)
            self.private.setblocking(False)
        config = uvicorn.Config(
            app,
            loop="none",  # the replica's own loop (uvloop where Ray installs it)
            http="httptools",
            lifespan="off",
            access_log=False,
            proxy_headers=False,
            server_header=False,
            date_header=False,
            log_config=None,
            timeout_graceful_shutdown=10,
        )
        self.server = _QuietServer(config)

    def requests_in_flight(self) -> int:
        """Requests read and not yet answered: uvicorn makes a task per request as it reads
        its head, and drops it once the answer is sent (ModelHost.forward's batching)."""
        return len(self.server.server_state.tasks)

    async def _serve(self) -> None:
        """Listen and serve. Started once the replica has loaded its models (KilnServer starts
        it after the first reconfigure): until it listens, the kernel hands this port's
        connections to the node's other replicas only."""
        self.sock.listen(BACKLOG)
        await self.server.serve(sockets=[self.sock] + ([self.private] if self.private else []))

    async def stop(self) -> None:
        """Stop accepting, finish the requests in flight (up to 10 s), close the socket."""
        self.stopping = self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self.task), 15)
        self.sock.close()
        if self.private is not None:
            self.private.close()


def private_socket_path() -> str:
    """A fresh path for a replica's private Unix socket (short: a path has 107 bytes)."""
    return str(Path(tempfile.mkdtemp(prefix="kiln-front-")) / "replica.sock")


def native_front(choice: str) -> Path | None:
    """The native gRPC front to run for `choice` (ServeArgs.grpc_front): auto takes it where
    it is built; native insists (a replica without it fails to start, and says why)."""
    built = NATIVE_FRONT.is_file() and os.access(NATIVE_FRONT, os.X_OK)
    if choice == "python":
        return None
    if choice == "native" and not built:
        raise RuntimeError(
            f"grpc_front native: {NATIVE_FRONT} is not built on this node; run `make native`"
        )
    if not built:
        logger.warning(
            "the native gRPC front is not built (%s; `make native`): gRPC is answered by "
            "grpc.aio in the replica, at about twice the replica's CPU a call",
            NATIVE_FRONT,
        )
    return NATIVE_FRONT if built else None


class DirectGrpc(_Listener):
    """One replica's gRPC server (Open Inference Protocol V2, serving/grpc_v2.py) on the
    node's shared gRPC port, both kinds with SO_REUSEPORT (gRPC's default on Linux).

    With `front` (the native front's binary) the replica starts it as a child process that
    listens on the port and hands each message to `bridge` over the replica's private Unix
    socket `private` (serving/native/grpc_front.cc); it dies with the replica (PDEATHSIG),
    and a front that exits on its own fails the replica's health check. Without it, a
    grpc.aio server on the replica's loop answers (`DirectServicer`)."""

    def __init__(
        self,
        kiln: Any,
        host: str,
        port: int,
        front: Path | None = None,
        private: str | None = None,
        token: str = "",
    ) -> None:
        super().__init__(port)
        self.kiln, self.host = kiln, host
        self.front, self.private, self.token = front, private, token
        self.server: Any = None
        self.servicer: Any = None
        self.process: asyncio.subprocess.Process | None = None

    def requests_in_flight(self) -> int:
        """ModelInfer calls begun and not yet answered (grpc.aio's; the native front's are
        HTTP requests on the private socket, which the HTTP server counts)."""
        return 0 if self.servicer is None else int(self.servicer.calls_in_flight)

    async def _serve(self) -> None:
        if self.front is not None:
            await self._serve_native(self.front)
            return
        import grpc

        from kiln.serving import grpc_v2

        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        self.servicer = grpc_v2.DirectServicer(self.kiln)
        grpc_v2.add_inference_servicer(self.servicer, self.server, streaming=True)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.server.add_insecure_port(f"{host}:{self.port}")
        await self.server.start()
        await self.server.wait_for_termination()

    async def _serve_native(self, front: Path) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.process = await asyncio.create_subprocess_exec(
            str(front),
            "--listen",
            f"{host}:{self.port}",
            "--upstream",
            str(self.private),
            "--connections",
            str(FRONT_CONNECTIONS),
            env={**os.environ, "KILN_GRPC_FRONT_TOKEN": self.token},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), FRONT_START_S)
        if line.strip() != b"listening":
            said = (await self.process.stderr.read()).decode(errors="replace").strip()
            raise RuntimeError(f"kiln-grpc-front did not start on port {self.port}: {said}")
        logger.info("native gRPC front (pid %d) on port %d", self.process.pid, self.port)
        said = (await self.process.stderr.read()).decode(errors="replace").strip()
        code = await self.process.wait()
        if not self.stopping:
            raise RuntimeError(f"kiln-grpc-front on port {self.port} exited {code}: {said}")

    async def stop(self) -> None:
        """Refuse new calls, give those in flight up to 10 s."""
        self.stopping = True
        if self.server is not None:
            await self.server.stop(10)
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
        if self.private is not None:
            shutil.rmtree(Path(self.private).parent, ignore_errors=True)


class _QuietServer(uvicorn.Server):
    """uvicorn's server, leaving the process's signal handlers alone (they are Ray's)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
