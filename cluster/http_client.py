"""The Python client of a served Kiln app: predict, explain, feedback, metrics and the OpenAI
routes over HTTP, with retries, timeouts and one connection pool per client.

    from kiln import Kiln
    kiln = Kiln(url="http://127.0.0.1:8000", key=KEY)
    answer = kiln.predict("churn", frame)      # a DataFrame in, a DataFrame out
    kiln.feedback("churn", answer["id"], labels)

Each call is planned as HTTP requests (`Call`s) and a function that turns their JSON answers
into the result (cluster/client_types.py); `ServingCalls` (mixed into `Kiln`) sends them with
an `httpx.Client`, `AsyncKiln` with an `httpx.AsyncClient`, so the two cannot drift apart.

Retries (`RetryPolicy`): a 429 or a 503 is sent again after the server's `Retry-After`, or
after an exponential backoff when it gives none, up to `max_attempts` requests and within
`deadline_s` from the first; a refused connection likewise (the request never left). Kiln's
own 503 *without* `Retry-After` says the actor behind it is gone for good ("retrying will not
help", serving/errors.py): it is not retried. A 503 that is not Kiln's JSON (HAProxy while
replicas restart) is. Nothing else is retried: a 4xx is the request's fault, a timeout may
have run the request already. The policy carries its clock and sleep, so the tests check the
waits with a fake clock and no real sleeping.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import httpx

from kiln import client_types as types
from kiln.client_types import (
    Completion,
    Explanations,
    FeedbackResult,
    MetricsReport,
)
from kiln.errors import KilnError, UnavailableError, error_for_status

__all__ = ["AsyncKiln", "RetryPolicy", "ServingCalls"]

logger = logging.getLogger(__name__)

STICKY_HEADER = "x-kiln-session"
"""Requests with one value stay on one side of a canary split (ServeArgs.sticky_header): the
batches of one call are answered by one version."""
RETRIED_STATUSES = (429, 503)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """When a failed request is sent again, and how long the client waits first."""

    max_attempts: int = 5
    """Requests in all, the first included; 1 turns retries off."""
    deadline_s: float = 60.0
    """No retry starts, nor a wait, past this long after the first request."""
    backoff_s: float = 0.5
    """The first wait when the server gives no Retry-After; doubled each attempt."""
    max_backoff_s: float = 8.0
    jitter: float = 0.1
    """A backoff is stretched by up to this share, at random (callers apart in time)."""
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    async_sleep: Callable[[float], Awaitable[None]] = field(
        default=asyncio.sleep, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise KilnError(f'Got "{self.max_attempts}" for max_attempts; it must be at least 1.')
        if self.deadline_s < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise KilnError("deadline_s, backoff_s and max_backoff_s must be 0 or more.")

    def wait_s(self, attempt: int, retry_after_s: float | None, elapsed_s: float) -> float | None:
        """How long to wait before attempt `attempt + 1`, or None to stop retrying."""
        if attempt >= self.max_attempts:
            return None
        if retry_after_s is not None:
            wait = max(0.0, retry_after_s)
        else:
            wait = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
            wait *= 1 + self.jitter * random.random()
        if elapsed_s + wait > self.deadline_s:
            return None
        return wait


@dataclass(frozen=True)
class Call:
    """One HTTP request of a client call."""

    method: str
    path: str
    body: dict[str, Any] | None = None
    params: dict[str, str] | None = None
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class Failure:
    """An error answer: what the client raises, and whether sending it again may help."""

    status: int
    message: str
    retry_after_s: float | None
    retryable: bool

    def error(self, call: Call, url: str, attempts: int) -> KilnError:
        found = error_for_status(self.status, self.message, self.retry_after_s)
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        found.add_note(f"{call.method} {url}{call.path} answered {self.status}{tries}")
        return found


def parse_retry_after(value: str | None, now_epoch_s: float | None = None) -> float | None:
    """`Retry-After` as seconds: a number of seconds, or an HTTP date."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = now_epoch_s if now_epoch_s is not None else time.time()
    return max(0.0, when.timestamp() - now)


def failure_of(status: int, headers: httpx.Headers, content: bytes) -> Failure:
    """The server's message (`{"error": "..."}`, or OpenAI's `{"error": {"message"}}`) and
    whether the answer invites a retry."""
    retry_after = parse_retry_after(headers.get("retry-after"))
    kiln_json = False
    try:
        body = json.loads(content)
        error = body.get("error") if isinstance(body, dict) else None
    except ValueError:
        error = None
    if isinstance(error, dict):
        message, kiln_json = str(error.get("message", error)), True
    elif isinstance(error, str):
        message, kiln_json = error, True
    else:
        text = content.decode(errors="replace").strip()
        message = text[:300] or f"HTTP {status}"
    # Kiln's 503 without Retry-After: the actor is gone for good, a retry cannot help.
    permanent = status == 503 and kiln_json and retry_after is None
    retryable = status in RETRIED_STATUSES and not permanent
    return Failure(status, message, retry_after, retryable)


# ---------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    """A client call as requests, and how their JSON answers become its result."""

    calls: list[Call]
    finish: Callable[[list[Any]], Any]


def predict_plan(
    name: str,
    data: Any,
    probabilities: bool,
    by_name: bool | None,
    batch_rows: int,
) -> Plan:
    rows = types.as_rows(data, by_name)
    chunks = types.batches(rows.instances, batch_rows)
    extra: dict[str, Any] = {"return": "probabilities"} if probabilities else {}
    headers = {STICKY_HEADER: uuid.uuid4().hex} if len(chunks) > 1 else None
    path = f"/v1/models/{name}:predict"
    calls = [Call("POST", path, {"instances": c, **extra}, headers=headers) for c in chunks]
    return Plan(
        calls, lambda answers: types.shaped_predictions(types.merge_predictions(answers), rows)
    )


def explain_plan(
    name: str,
    data: Any,
    method: str,
    target: Any,
    n_steps: int | None,
    by_name: bool | None,
) -> Plan:
    rows = types.as_rows(data, by_name)
    chunks = types.batches(rows.instances, types.EXPLAIN_BATCH_ROWS)
    extra: dict[str, Any] = {"method": method}
    if target is not None:
        extra["target"] = types.clean(target)
    if n_steps is not None:
        extra["n_steps"] = n_steps
    headers = {STICKY_HEADER: uuid.uuid4().hex} if len(chunks) > 1 else None
    path = f"/v1/models/{name}:explain"
    calls = [Call("POST", path, {"instances": c, **extra}, headers=headers) for c in chunks]
    return Plan(calls, types.merge_explanations)


def feedback_plan(name: str, ids: Any, labels: Any) -> Plan:
    body = {"ids": types.ids_of(ids), "labels": types.labels_of(labels)}
    call = Call("POST", f"/v1/models/{name}:feedback", body)
    return Plan([call], lambda answers: FeedbackResult(**answers[0]))


def metrics_plan(name: str, window: str) -> Plan:
    call = Call("GET", f"/v1/models/{name}/metrics", params={"window": window})
    return Plan([call], lambda answers: types.metrics_report(name, answers[0]))


def complete_plan(name: str, prompt: str, params: dict[str, Any]) -> Plan:
    call = Call("POST", "/v1/completions", {**params, "model": name, "prompt": prompt})
    return Plan([call], lambda answers: types.completion(answers[0]))


def chat_call(
    name: str, messages: list[dict[str, Any]], stream: bool, params: dict[str, Any]
) -> Call:
    body = {**params, "model": name, "messages": messages}
    if stream:
        body["stream"] = True
    return Call("POST", "/v1/chat/completions", body)


def chat_text(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["message"]["content"])


def stream_piece(line: str) -> str | None:
    """The text a server-sent event of a chat stream adds (None for the others)."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    choices = json.loads(line[6:]).get("choices") or []
    pieces = [c.get("delta", {}).get("content") or "" for c in choices]
    return "".join(pieces) or None


# ---------------------------------------------------------------------------------- transport


def client_headers(key: str | None) -> dict[str, str]:
    headers = {"User-Agent": "kiln-python"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def request_of(client: httpx.Client | httpx.AsyncClient, call: Call) -> httpx.Request:
    content = types.json_body(call.body) if call.body is not None else None
    headers = dict(call.headers or {})
    if content is not None:
        headers["Content-Type"] = "application/json"
    return client.build_request(
        call.method, call.path, content=content, params=call.params, headers=headers
    )


class Transport:
    """One `httpx.Client` (its pool reuses connections) and the retry loop."""

    def __init__(self, url: str, key: str | None, timeout_s: float, retry: RetryPolicy) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retry = retry
        self.client = httpx.Client(
            base_url=self.url, headers=client_headers(key), timeout=timeout_s
        )

    def send(self, call: Call, stream: bool = False) -> httpx.Response:
        """The answer to `call` once it is a success, else the error it ends with."""
        started = self.retry.clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.client.send(request_of(self.client, call), stream=stream)
            except httpx.ConnectError as exc:
                failure = unreachable(self.url, exc)
            except httpx.TimeoutException as exc:
                raise timed_out(self.url, call, self.timeout_s) from exc
            else:
                if response.status_code < 400:
                    return response
                content = response.read()
                response.close()
                failure = failure_of(response.status_code, response.headers, content)
            wait = None
            if failure.retryable:
                wait = self.retry.wait_s(
                    attempt, failure.retry_after_s, self.retry.clock() - started
                )
            if wait is None:
                raise failure.error(call, self.url, attempt)
            logger.info(
                "%s %s answered %s; retry in %.2f s", call.method, call.path, failure.status, wait
            )
            self.retry.sleep(wait)

    def json(self, call: Call) -> Any:
        return self.send(call).json()

    def close(self) -> None:
        self.client.close()


class AsyncTransport:
    """`Transport` on an `httpx.AsyncClient`."""

    def __init__(self, url: str, key: str | None, timeout_s: float, retry: RetryPolicy) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retry = retry
        self.client = httpx.AsyncClient(
            base_url=self.url, headers=client_headers(key), timeout=timeout_s
        )

    async def send(self, call: Call, stream: bool = False) -> httpx.Response:
        started = self.retry.clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self.client.send(request_of(self.client, call), stream=stream)
            except httpx.ConnectError as exc:
                failure = unreachable(self.url, exc)
            except httpx.TimeoutException as exc:
                raise timed_out(self.url, call, self.timeout_s) from exc
            else:
                if response.status_code < 400:
                    return response
                content = await response.aread()
                await response.aclose()
                failure = failure_of(response.status_code, response.headers, content)
            wait = None
            if failure.retryable:
                wait = self.retry.wait_s(
                    attempt, failure.retry_after_s, self.retry.clock() - started
                )
            if wait is None:
                raise failure.error(call, self.url, attempt)
            logger.info(
                "%s %s answered %s; retry in %.2f s", call.method, call.path, failure.status, wait
            )
            await self.retry.async_sleep(wait)

    async def json(self, call: Call) -> Any:
        return (await self.send(call)).json()

    async def close(self) -> None:
        await self.client.aclose()


def unreachable(url: str, exc: Exception) -> Failure:
    """A refused connection: the request never left, so it is retried like a 503."""
    message = f"cannot reach {url} ({exc}); is kiln serve running there?"
    return Failure(503, message, None, retryable=True)


def timed_out(url: str, call: Call, timeout_s: float) -> UnavailableError:
    error = UnavailableError(
        f"{call.method} {url}{call.path} gave no answer within {timeout_s:g} s; "
        "a larger timeout_s waits longer"
    )
    return error


# ---------------------------------------------------------------------------------- clients


def default_url(url: str | None) -> str:
    if url is not None:
        return url
    from kiln.settings import Settings

    settings = Settings()
    return f"http://{settings.kiln_http_host}:{settings.kiln_http_port}"


class ServingCalls:
    """The served-app half of `Kiln` (cluster/client.py): blocking calls over one pool."""

    url: str | None
    key: str | None
    timeout_s: float
    retry: RetryPolicy
    _transports: dict[str, Transport]

    def _serving(self, url: str | None = None) -> Transport:
        base = (url or self.url or default_url(None)).rstrip("/")
        if base not in self._transports:
            self._transports[base] = Transport(base, self.key, self.timeout_s, self.retry)
        return self._transports[base]

    def _run(self, plan: Plan, url: str | None = None) -> Any:
        transport = self._serving(url)
        return plan.finish([transport.json(call) for call in plan.calls])

    def _close_serving(self) -> None:
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()

    def predict(
        self,
        name: str,
        data: Any,
        *,
        probabilities: bool = False,
        by_name: bool | None = None,
        batch_rows: int = types.PREDICT_BATCH_ROWS,
    ) -> Any:
        """Predictions of served model `name` (`NAME`, `NAME@3`, `NAME@alias`) for `data`.

        `data`: a list of rows (one value per input, in the model's order) or of objects by
        input name, a 2-D numpy array, a pandas DataFrame or a pyarrow Table. A DataFrame or
        Table comes back as the same kind, columns `prediction`, `id`, `model_version` (and
        `probabilities` with `probabilities=True`), a DataFrame with the input's index; a
        list or array comes back as `Predictions`. More than `batch_rows` rows go as several
        requests, all answered by one version.
        """
        return self._run(predict_plan(name, data, probabilities, by_name, batch_rows))

    def explain(
        self,
        name: str,
        data: Any,
        *,
        method: str = "integrated_gradients",
        target: Any = None,
        n_steps: int | None = None,
        by_name: bool | None = None,
    ) -> Explanations:
        """Each row's prediction and Captum's attribution per input (`:explain`)."""
        return self._run(explain_plan(name, data, method, target, n_steps, by_name))  # type: ignore[no-any-return]

    def feedback(self, name: str, ids: Any, labels: Any, url: str | None = None) -> FeedbackResult:
        """True labels for served predictions, by the ids their answers carried (a list, a
        `Predictions`, or a predict DataFrame's `id` column)."""
        return self._run(feedback_plan(name, ids, labels), url)  # type: ignore[no-any-return]

    def metrics(self, name: str, window: str = "1h") -> MetricsReport:
        """The served model's traffic, latency, quality, drift and cost over `window`."""
        return self._run(metrics_plan(name, window))  # type: ignore[no-any-return]

    def complete(self, name: str, prompt: str, url: str | None = None, **params: Any) -> Completion:
        """`POST /v1/completions`; `params` are OpenAI's (max_tokens, temperature, stop, ...)."""
        return self._run(complete_plan(name, prompt, params), url)  # type: ignore[no-any-return]

    @overload
    def chat(
        self,
        name: str,
        messages: list[dict[str, Any]],
        stream: Literal[False] = False,
        url: str | None = None,
        **params: Any,
    ) -> str: ...

    @overload
    def chat(
        self,
        name: str,
        messages: list[dict[str, Any]],
        stream: Literal[True],
        url: str | None = None,
        **params: Any,
    ) -> Iterator[str]: ...

    def chat(
        self,
        name: str,
        messages: list[dict[str, Any]],
        stream: bool = False,
        url: str | None = None,
        **params: Any,
    ) -> str | Iterator[str]:
        """The assistant's answer to `messages`: its text, or with `stream=True` an iterator
        of the pieces as the model writes them. An error answer raises here, before any."""
        call = chat_call(name, messages, stream, params)
        transport = self._serving(url)
        if not stream:
            return chat_text(transport.json(call))
        return stream_pieces(transport.send(call, stream=True))


def stream_pieces(response: httpx.Response) -> Iterator[str]:
    try:
        for line in response.iter_lines():
            piece = stream_piece(line)
            if piece:
                yield piece
    finally:
        response.close()


async def astream_pieces(response: httpx.Response) -> AsyncIterator[str]:
    try:
        async for line in response.aiter_lines():
            piece = stream_piece(line)
            if piece:
                yield piece
    finally:
        await response.aclose()


class AsyncKiln:
    """The client of a served Kiln app for asyncio services: `Kiln`'s serving calls, awaited.

        async with AsyncKiln(url="http://127.0.0.1:8000", key=KEY) as kiln:
            answer = await kiln.predict("digits-mlp", rows)
            async for piece in await kiln.chat("pylm", messages, stream=True): ...

    One `httpx.AsyncClient` per instance: make one per service and share it.
    """

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        if key is None:
            from kiln.settings import Settings

            key = Settings().kiln_api_key
        self.url = default_url(url).rstrip("/")
        self.key = key
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._transport = AsyncTransport(self.url, key, timeout_s, self.retry)

    async def __aenter__(self) -> AsyncKiln:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.close()

    async def _run(self, plan: Plan) -> Any:
        return plan.finish([await self._transport.json(call) for call in plan.calls])

    async def predict(
        self,
        name: str,
        data: Any,
        *,
        probabilities: bool = False,
        by_name: bool | None = None,
        batch_rows: int = types.PREDICT_BATCH_ROWS,
    ) -> Any:
        """As `Kiln.predict`."""
        return await self._run(predict_plan(name, data, probabilities, by_name, batch_rows))

    async def explain(
        self,
        name: str,
        data: Any,
        *,
        method: str = "integrated_gradients",
        target: Any = None,
        n_steps: int | None = None,
        by_name: bool | None = None,
    ) -> Explanations:
        return await self._run(explain_plan(name, data, method, target, n_steps, by_name))  # type: ignore[no-any-return]

    async def feedback(self, name: str, ids: Any, labels: Any) -> FeedbackResult:
        return await self._run(feedback_plan(name, ids, labels))  # type: ignore[no-any-return]

    async def metrics(self, name: str, window: str = "1h") -> MetricsReport:
        return await self._run(metrics_plan(name, window))  # type: ignore[no-any-return]

    async def complete(self, name: str, prompt: str, **params: Any) -> Completion:
        return await self._run(complete_plan(name, prompt, params))  # type: ignore[no-any-return]

    @overload
    async def chat(
        self,
        name: str,
        messages: list[dict[str, Any]],
        stream: Literal[False] = False,
        **params: Any,
    ) -> str: ...

    @overload
    async def chat(
        self,
        name: str,
        messages: list[dict[str, Any]],
        stream: Literal[True],
        **params: Any,
    ) -> AsyncIterator[str]: ...

    async def chat(
        self,
        name: str,
        messages: list[dict[str, Any]],
        stream: bool = False,
        **params: Any,
    ) -> str | AsyncIterator[str]:
        """The answer's text, or with `stream=True` an async iterator of its pieces."""
        call = chat_call(name, messages, stream, params)
        if not stream:
            return chat_text(await self._transport.json(call))
        return astream_pieces(await self._transport.send(call, stream=True))
