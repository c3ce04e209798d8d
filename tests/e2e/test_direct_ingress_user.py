"""`kiln serve`'s HTTP ingress as a user runs it (serving/direct.py, issue 32).

The default on the embedded Ray is the direct ingress: every replica opens the Kiln port
itself (SO_REUSEPORT) and the kernel spreads connections over them. These tests start `kiln
serve` as a subprocess and check what a user would: both replicas answer, keyed requests
still answer after the key cache expired, a killed replica loses no new connection and comes
back, and `--ingress serve` (Ray Serve's HAProxy) answers the same requests.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton

from kiln.serving.direct import NATIVE_FRONT
from kiln.serving.schemas import ServeArgs
from tests.conftest import free_port, wait_for
from tests.e2e.kiln_process import KilnServe, kiln, kiln_env, kiln_json
from tests.e2e.test_serve_user import digits_rows

KEY_CACHE_S = ServeArgs.model_fields["auth_cache_ttl_s"].default


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("e2e-direct")
    env = kiln_env(home, free_port())
    kiln_json(env, "train", "--data", "sklearn:digits", "--model", "mlp", "--register", "dgm")
    made = kiln_json(env, "keys", "create", "--scope", "predict:dgm")
    return {"home": home, "secret": made["secret"]}


@pytest.fixture
def two_replicas(trained_home: dict[str, Any], tmp_path: Path) -> Iterator[KilnServe]:
    env = kiln_env(trained_home["home"], free_port(), KILN_GRPC_PORT=str(free_port()))
    server = KilnServe(env, ["dgm", "--num-replicas", "2", "--num-cpus", "0.5"], tmp_path / "s.log")
    try:
        yield server.start()
    finally:
        server.kill()


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def listeners(server: KilnServe, variable: str = "KILN_HTTP_PORT") -> list[psutil.Process]:
    """The processes under `kiln serve` listening on its HTTP (or other) port."""
    assert server.process is not None
    port = int(server.env[variable])
    found = []
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            conns = child.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            found.append(child)
    return found


def grpc_owners(server: KilnServe) -> set[int]:
    """The replicas answering the gRPC port: each itself (grpc.aio) or through its native front,
    a child of its own (serving/native/)."""
    return {
        p.ppid() if p.name() == NATIVE_FRONT.name else p.pid
        for p in listeners(server, "KILN_GRPC_PORT")
    }


def predict_fresh(url: str, secret: str, count: int) -> list[str]:
    """`count` predictions, each on a new connection (the kernel picks a replica per
    connection); returns each answer's id prefix, which names the process that answered
    (serving/ids.py)."""
    rows, labels = digits_rows(1)
    prefixes = []
    for _ in range(count):
        answer = httpx.post(
            f"{url}/v1/models/dgm:predict",
            json={"instances": rows},
            headers={"Authorization": f"Bearer {secret}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == labels
        prefixes.append(answer.json()["ids"][0].rsplit("-", 1)[0][:12])
    return prefixes


@contextlib.contextmanager
def calls_in_a_loop(url: str, secret: str) -> Iterator[list[int]]:
    """Predict calls, each on a fresh connection, in a thread for the with-block; the status
    of each (0: the connection failed)."""
    statuses: list[int] = []
    stop = threading.Event()
    rows, _ = digits_rows(1)

    def call() -> None:
        while not stop.is_set():
            try:
                statuses.append(
                    httpx.post(
                        f"{url}/v1/models/dgm:predict",
                        json={"instances": rows},
                        headers={"Authorization": f"Bearer {secret}"},
                        timeout=30,
                    ).status_code
                )
            except httpx.HTTPError:
                statuses.append(0)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    try:
        yield statuses
    finally:
        stop.set()
        caller.join(timeout=60)


@pytest.mark.slow  # two replicas, a killed one and its replacement: about a minute
def test_two_replicas_share_the_port_and_a_killed_one_loses_no_connection(
    two_replicas: KilnServe, trained_home: dict[str, Any]
) -> None:
    server, secret = two_replicas, trained_home["secret"]
    assert "HTTP ingress: direct" in server.log()
    replicas = listeners(server)
    assert len(replicas) == 2, [p.name() for p in replicas]  # no HAProxy on the port
    assert len(set(predict_fresh(server.url, secret, 40))) == 2  # both answer
    # gRPC too: the same two replicas open the gRPC port, and tritonclient is answered.
    assert grpc_owners(server) == {p.pid for p in replicas}
    rows, labels = digits_rows(3)
    client = triton.InferenceServerClient(f"127.0.0.1:{server.env['KILN_GRPC_PORT']}")
    tensor = triton.InferInput("features", [3, 64], "FP32")
    tensor.set_data_from_numpy(np.asarray(rows, dtype=np.float32))
    answer = client.infer("dgm", [tensor], headers={"authorization": f"Bearer {secret}"})
    assert answer.as_numpy("predictions").tolist() == labels

    victim = replicas[0]
    victim_children = victim.children()  # its native gRPC front, where built
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    # The front dies with its replica (it would hold the gRPC port with nothing behind it).
    assert wait_for(lambda: not any(alive(c) for c in victim_children), 10)
    # New connections go to the live replica at once: none refused, every answer right.
    assert len(set(predict_fresh(server.url, secret, 50))) == 1
    # Serve replaces the killed replica, which opens the port again and answers. Calls on
    # fresh connections all through the replacement: the new replica takes none before its
    # model is loaded (it once answered 404 "not served" while it loaded).
    with calls_in_a_loop(server.url, secret) as statuses:
        assert wait_for(lambda: len(listeners(server)) == 2, timeout_s=120), server.log()[-2000:]
        assert wait_for(lambda: len(set(predict_fresh(server.url, secret, 20))) == 2, 60)
    assert len(statuses) > 20 and set(statuses) == {200}, sorted(set(statuses))
    # The replacement answers gRPC as well.
    assert wait_for(lambda: len(grpc_owners(server)) == 2, 60)
    for _ in range(8):  # fresh channels: the kernel spreads their connections
        fresh = triton.InferenceServerClient(f"127.0.0.1:{server.env['KILN_GRPC_PORT']}")
        again = fresh.infer("dgm", [tensor], headers={"authorization": f"Bearer {secret}"})
        assert again.as_numpy("predictions").tolist() == labels
    # Past the key cache with traffic, keyed requests still answer (issue 29's regression).
    deadline = time.monotonic() + 2 * KEY_CACHE_S + 1
    while time.monotonic() < deadline:
        predict_fresh(server.url, secret, 1)
        time.sleep(0.25)  # pacing of the traffic, not a wait for a condition
    refused = httpx.post(f"{server.url}/v1/models/dgm:predict", json={"instances": [[0] * 64]})
    assert refused.status_code == 401
    assert server.interrupt() == 0
    assert server.survivors() == []


@pytest.mark.slow
def test_ingress_serve_answers_through_serves_haproxy(
    trained_home: dict[str, Any], tmp_path: Path
) -> None:
    env = kiln_env(trained_home["home"], free_port())
    server = KilnServe(env, ["dgm", "--ingress", "serve"], tmp_path / "s.log")
    try:
        server.start()
        assert "HTTP ingress: Ray Serve's HAProxy" in server.log()
        assert [p.name() for p in listeners(server)] == ["haproxy"]
        assert len(predict_fresh(server.url, trained_home["secret"], 5)) == 5
        assert server.interrupt() == 0
    finally:
        server.kill()


def test_bad_ingress_choices_are_one_line_before_ray_starts(trained_home: dict[str, Any]) -> None:
    env = kiln_env(trained_home["home"], free_port())
    done = kiln(env, "serve", "dgm", "--ingress", "fast", timeout_s=60)
    assert done.returncode == 2
    assert 'Got "fast" for --ingress. Use auto, serve, direct.' in done.stderr
    done = kiln(env, "serve", "dgm", "--ingress", "direct", "--max-replicas", "2", timeout_s=60)
    assert done.returncode == 2
    assert "--ingress direct serves a fixed number of replicas" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.slow
def test_the_port_answers_only_once_the_model_is_loaded(
    trained_home: dict[str, Any], tmp_path: Path
) -> None:
    """A script that waits for `GET /v1/models` to answer 200 and then calls the model (as
    examples/lm_openai.py does) finds it served: the replica listens after it loaded it."""
    env = kiln_env(trained_home["home"], free_port())
    server = KilnServe(env, ["dgm"], tmp_path / "s.log")
    headers = {"Authorization": f"Bearer {trained_home['secret']}"}
    try:
        server.start_in_background()
        deadline = time.monotonic() + 180
        listed = None
        while listed is None and time.monotonic() < deadline:
            assert server.process is not None and server.process.poll() is None, server.log()
            try:
                answer = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=5)
                if answer.status_code == 200:
                    listed = [m["name"] for m in answer.json()["models"]]
            except httpx.HTTPError:
                time.sleep(0.01)  # polling as fast as a script would, not a wait for a condition
        assert listed == ["dgm"], server.log()[-2000:]
        assert wait_for(lambda: "Ctrl-C stops" in server.log(), timeout_s=60)
        assert server.interrupt() == 0
    finally:
        server.kill()
