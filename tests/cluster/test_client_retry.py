"""The client's retries, timeouts and connection reuse against a real HTTP server on loopback
(no Ray): a scripted `http.server` answers each request with the next status of its script.
The waits are read from a fake clock and sleep given to the `RetryPolicy`: nothing sleeps."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pandas as pd
import pytest

from kiln.client import Kiln
from kiln.errors import (
    AuthError,
    BadRequestError,
    KilnError,
    NotFoundError,
    RateLimitError,
    ServerError,
    UnavailableError,
    error_for_status,
)
from kiln.http_client import AsyncKiln, RetryPolicy, parse_retry_after
from tests.conftest import free_port

PREDICTED = {"predictions": [7], "model": "m", "model_version": 2, "ids": ["abc-0"]}


@dataclass
class Answer:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    """Bytes sent as they are (not JSON): an HTML page of a proxy, a server-sent stream."""


@dataclass
class Script:
    answers: list[Answer] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)
    """Each request: method, path, body, headers, the client's port (one per connection)."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client may reuse its connection

    def do_GET(self) -> None:
        self.answer()

    def do_POST(self) -> None:
        self.answer()

    def answer(self) -> None:
        script: Script = self.server.script  # type: ignore[attr-defined]
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        script.seen.append(
            {
                "method": self.command,
                "path": self.path,
                "body": body,
                "headers": dict(self.headers),
                "port": self.client_address[1],
            }
        )
        found = script.answers.pop(0) if script.answers else Answer(200, PREDICTED)
        content = found.raw if found.raw is not None else json.dumps(found.body).encode()
        self.send_response(found.status)
        for name, value in found.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.script = Script()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.script  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()


class FakeTime:
    """A clock that moves only when the client sleeps; every wait is recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)

    def policy(self, **overrides: Any) -> RetryPolicy:
        settings = {"jitter": 0.0, **overrides}
        return RetryPolicy(
            clock=self.clock, sleep=self.sleep, async_sleep=self.async_sleep, **settings
        )


def kiln_error(status: int, message: str, **headers: str) -> Answer:
    return Answer(status, {"error": message}, headers)


def test_a_503_with_retry_after_is_sent_again_after_that_wait(server):
    url, script = server
    script.answers = [kiln_error(503, "the key registry is restarting", **{"Retry-After": "2"})]
    fake = FakeTime()
    with Kiln(url=url, key="kiln_k", retry=fake.policy()) as kiln:
        found = kiln.predict("m", [[1.0, 2.0]])
    assert (found.predictions, found.ids, found.model_version) == ([7], ["abc-0"], 2)
    assert fake.waits == [2.0]
    assert [s["body"] for s in script.seen] == [{"instances": [[1.0, 2.0]]}] * 2
    assert script.seen[0]["headers"]["Authorization"] == "Bearer kiln_k"


def test_a_429_waits_as_told_and_an_http_date_counts_too(server):
    url, script = server
    script.answers = [
        kiln_error(429, "rate limit of 5 requests/s for this key exceeded", **{"Retry-After": "3"}),
        kiln_error(429, "again", **{"Retry-After": "1"}),
    ]
    fake = FakeTime()
    with Kiln(url=url, retry=fake.policy()) as kiln:
        assert kiln.predict("m", [[1.0]]).predictions == [7]
    assert fake.waits == [3.0, 1.0] and len(script.seen) == 3
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now_epoch_s=1445412500.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_a_client_error_is_raised_at_once_with_the_servers_message(server):
    url, script = server
    message = "instance 0 has 3 values; this model takes 64 (f0, f1, ...)"
    script.answers = [kiln_error(422, message)]
    fake = FakeTime()
    with Kiln(url=url, retry=fake.policy()) as kiln:
        with pytest.raises(BadRequestError) as raised:
            kiln.predict("m", [[1, 2, 3]])
    assert str(raised.value) == message and raised.value.http_status == 422
    assert fake.waits == [] and len(script.seen) == 1
    script.answers = [kiln_error(400, "request body is not valid JSON")]
    with Kiln(url=url, retry=fake.policy()) as kiln, pytest.raises(BadRequestError):
        kiln.predict("m", [[1]])
    assert fake.waits == [] and len(script.seen) == 2


def test_each_status_is_its_own_error_type():
    kinds = {
        400: BadRequestError,
        401: AuthError,
        403: AuthError,
        404: NotFoundError,
        409: BadRequestError,
        413: BadRequestError,
        422: BadRequestError,
        429: RateLimitError,
        500: ServerError,
        503: UnavailableError,
    }
    for status, kind in kinds.items():
        error = error_for_status(status, "why", 4.0)
        assert type(error) is kind and isinstance(error, KilnError), status
        assert (str(error), error.http_status, error.retry_after_s) == ("why", status, 4.0)


def test_retries_stop_at_max_attempts_and_the_error_says_so(server):
    url, script = server
    script.answers = [kiln_error(429, "slow down", **{"Retry-After": "1"})] * 5
    fake = FakeTime()
    with Kiln(url=url, retry=fake.policy(max_attempts=3)) as kiln:
        with pytest.raises(RateLimitError, match="slow down") as raised:
            kiln.predict("m", [[1.0]])
    assert fake.waits == [1.0, 1.0] and len(script.seen) == 3
    assert raised.value.retry_after_s == 1.0
    assert "answered 429 after 3 attempts" in raised.value.__notes__[0]


def test_no_wait_runs_past_the_deadline(server):
    url, script = server
    script.answers = [
        kiln_error(503, "restarting", **{"Retry-After": "20"}),
        kiln_error(503, "restarting", **{"Retry-After": "20"}),
    ]
    fake = FakeTime()
    with Kiln(url=url, retry=fake.policy(deadline_s=30)) as kiln:
        with pytest.raises(UnavailableError) as raised:
            kiln.predict("m", [[1.0]])
    assert fake.waits == [20.0] and len(script.seen) == 2  # a second 20 s would end at 40 s
    assert raised.value.retry_after_s == 20.0


def test_kilns_own_503_without_retry_after_is_final_a_proxys_is_retried(server):
    url, script = server
    gone = "the key registry has stopped and will not come back; retrying will not help"
    script.answers = [kiln_error(503, gone)]
    fake = FakeTime()
    with Kiln(url=url, retry=fake.policy()) as kiln:
        with pytest.raises(UnavailableError, match="will not come back"):
            kiln.predict("m", [[1.0]])
        assert fake.waits == [] and len(script.seen) == 1
        page = b"<html><body><h1>503 Service Unavailable</h1></body></html>"
        script.answers = [Answer(503, raw=page), Answer(503, raw=page)]
        assert kiln.predict("m", [[1.0]]).predictions == [7]
    assert fake.waits == [0.5, 1.0]  # backoff_s, doubled


def test_a_refused_connection_is_retried_then_unavailable():
    fake = FakeTime()
    url = f"http://127.0.0.1:{free_port()}"
    with Kiln(url=url, retry=fake.policy(max_attempts=3)) as kiln:
        with pytest.raises(UnavailableError, match="cannot reach .* is kiln serve running"):
            kiln.predict("m", [[1.0]])
    assert fake.waits == [0.5, 1.0]


def test_one_connection_serves_a_clients_calls(server):
    url, script = server
    with Kiln(url=url, retry=FakeTime().policy()) as kiln:
        for _ in range(5):
            kiln.predict("m", [[1.0]])
    assert len({s["port"] for s in script.seen}) == 1


def test_rows_beyond_batch_rows_go_in_requests_of_one_session(server):
    url, script = server
    frame = pd.DataFrame({"a": [1.0, 2.0, None], "b": ["x", "y", "z"]}, index=[10, 20, 30])
    script.answers = [
        Answer(200, {**PREDICTED, "predictions": [1, 2], "ids": ["r1-0", "r1-1"]}),
        Answer(200, {**PREDICTED, "predictions": [3], "ids": ["r2-0"]}),
    ]
    with Kiln(url=url, retry=FakeTime().policy()) as kiln:
        found = kiln.predict("m", frame, batch_rows=2)
    assert found.to_dict("index") == {
        10: {"prediction": 1, "id": "r1-0", "model_version": 2},
        20: {"prediction": 2, "id": "r1-1", "model_version": 2},
        30: {"prediction": 3, "id": "r2-0", "model_version": 2},
    }
    bodies = [s["body"]["instances"] for s in script.seen]
    assert bodies == [[{"a": 1.0, "b": "x"}, {"a": 2.0, "b": "y"}], [{"a": None, "b": "z"}]]
    sessions = {s["headers"]["x-kiln-session"] for s in script.seen}
    assert len(sessions) == 1  # both sides of a canary split cannot answer one call


def test_a_chat_stream_yields_the_pieces_after_a_429(server):
    url, script = server
    events = [
        {"choices": [{"delta": {"role": "assistant"}}]},
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]},
    ]
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    script.answers = [
        Answer(
            429,
            {"error": {"message": "queue full", "type": "rate_limit_error"}},
            {"Retry-After": "1"},
        ),
        Answer(200, raw=stream.encode(), headers={"Content-Type": "text/event-stream"}),
    ]
    fake = FakeTime()
    with Kiln(url=url, retry=fake.policy()) as kiln:
        pieces = list(kiln.chat("lm", [{"role": "user", "content": "hi"}], stream=True, seed=1))
    assert pieces == ["Hel", "lo"] and fake.waits == [1.0]
    assert script.seen[-1]["body"] == {
        "seed": 1,
        "model": "lm",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    script.answers = [Answer(404, {"error": {"message": "model lm2 is not served here"}})]
    with Kiln(url=url, retry=fake.policy()) as kiln:
        with pytest.raises(NotFoundError, match="lm2 is not served"):
            kiln.chat("lm2", [], stream=True)  # raised by the call, before any piece


def test_the_async_twin_retries_alike(server):
    url, script = server
    script.answers = [
        kiln_error(503, "restarting", **{"Retry-After": "2"}),
        kiln_error(429, "slow down", **{"Retry-After": "1"}),
        Answer(200, PREDICTED),
        kiln_error(400, "request body is not valid JSON"),
    ]
    fake = FakeTime()

    async def calls() -> Any:
        async with AsyncKiln(url=url, key="kiln_k", retry=fake.policy()) as kiln:
            found = await kiln.predict("m", [[1.0]])
            with pytest.raises(BadRequestError, match="not valid JSON"):
                await kiln.predict("m", [[1.0]])
            return found

    found = asyncio.run(calls())
    assert found.predictions == [7] and fake.waits == [2.0, 1.0]
    assert len(script.seen) == 4 and script.seen[0]["headers"]["Authorization"] == "Bearer kiln_k"


def test_no_answer_within_timeout_s_is_unavailable():
    """A server that accepts the connection and never answers (a listening socket that nobody
    reads): the client gives up after timeout_s, and a timeout is not retried."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        fake = FakeTime()
        with Kiln(url=url, timeout_s=0.2, retry=fake.policy()) as kiln:
            with pytest.raises(UnavailableError, match="no answer within 0.2 s"):
                kiln.predict("m", [[1.0]])
        assert fake.waits == []


def test_bad_inputs_are_refused_before_sending(server):
    url, script = server
    with Kiln(url=url, retry=FakeTime().policy()) as kiln:
        with pytest.raises(BadRequestError, match="infinite"):
            kiln.predict("m", [[float("inf")]])
        with pytest.raises(BadRequestError, match="send a list of rows"):
            kiln.predict("m", {"a": 1})
        with pytest.raises(KilnError, match="max_attempts"):
            RetryPolicy(max_attempts=0)
    assert script.seen == []
