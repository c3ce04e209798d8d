"""The OpenAI API for served language models: `POST /v1/completions`,
`POST /v1/chat/completions` (JSON or server-sent events) and OpenAI's `GET /v1/models` fields.

This router only speaks OpenAI: it parses a request into a `GenerationRequest`, hands it to
the version's continuous-batching engine (serving/engine.py, through serving/language.py) and
shapes what comes back. Every error answers in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, so the stock `openai` client raises its own
exception types (400 BadRequestError, 401 AuthenticationError, 403 PermissionDeniedError, 404
NotFoundError, 413, 429 RateLimitError with Retry-After).

Streaming: `data: {chunk}` lines and `data: [DONE]`; text that could begin a stop string is
held back by the engine, so a stop string never reaches the client. With
`stream_options.include_usage`, a chunk with `choices: []` and the usage comes just before
`[DONE]`; every other chunk has `usage: null`. A client that disconnects aborts its request,
which frees its KV slot within one engine step.

Logging: a finished generation goes into the prediction log (sampled as `--log-sample` says),
one row per choice with id `<response id>-<choice index>`, so `POST /v1/models/NAME:feedback`
labels it by the `id` the answer carried (serving/routes/monitoring.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.serving.dependencies import AuthDep, HostDep
from kiln.serving.engine import (
    Delta,
    GenerationRequest,
    QueueFull,
    RequestHandle,
    RequestMetrics,
    TokenLogprob,
)
from kiln.serving.jsonbody import parse_json
from kiln.serving.predlog import LoggedText
from kiln.serving.schemas import RequestError
from kiln.training.errors import KilnError

logger = logging.getLogger(__name__)

router = APIRouter(tags=["openai"])

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": str(self)[:1000],
                "type": ERROR_TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


async def openai_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return exc.response()


# ----------------------------------------------------------------------------- request bodies


class StreamOptions(BaseModel):
    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("role")
    @classmethod
    def known_role(cls, role: str) -> str:
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise ValueError(
                f'unknown role "{role[:64]}"; use system, developer, user, assistant or tool'
            )
        return role

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text ones are understood
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


NUMBER_FIELDS = (
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_logprobs",
)
"""Request fields that take numbers (and `logprobs` of a completion; a chat's is a boolean)."""


class Sampling(BaseModel):
    """The parameters both endpoints share (OpenAI's names and defaults)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None
    number_fields: ClassVar[tuple[str, ...]] = NUMBER_FIELDS

    @model_validator(mode="before")
    @classmethod
    def no_booleans_for_numbers(cls, data: Any) -> Any:
        """JSON true/false is not a number here (pydantic would read true as 1), as on the
        predict routes; token ids in a prompt are checked the same way."""
        if not isinstance(data, dict):
            return data
        for key in cls.number_fields:
            if isinstance(data.get(key), bool):
                raise ValueError(f"{key} is {str(data[key]).lower()}; send a number")
        prompt = data.get("prompt")
        if isinstance(prompt, list) and any(
            isinstance(t, bool) or (isinstance(t, list) and any(isinstance(u, bool) for u in t))
            for t in prompt
        ):
            raise ValueError("prompt holds true/false; token ids are integers")
        return data

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        found = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(found) > 4 or not all(found):
            raise OpenAIError(400, "stop takes at most 4 non-empty strings", "stop")
        return found


class CompletionBody(Sampling):
    number_fields: ClassVar[tuple[str, ...]] = (*NUMBER_FIELDS, "logprobs")
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    def the_prompt(self) -> str | list[int]:
        """One prompt: a string or token ids (a batch of prompts is one request each)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise OpenAIError(400, "send one prompt per request, not a list", "prompt")
            prompt = prompt[0]  # type: ignore[assignment]
        if isinstance(prompt, str):
            return prompt
        return [int(t) for t in prompt]  # type: ignore[arg-type,union-attr]


class ChatBody(Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# ----------------------------------------------------------------------------- parsing


async def read_body(request: Request, model: type[BaseModel], max_bytes: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise OpenAIError(413, f"request body is {declared} bytes; the limit is {max_bytes}")
    raw = await request.body()
    if len(raw) > max_bytes:
        raise OpenAIError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        payload = parse_json(raw)
    except StarletteHTTPException as exc:
        raise OpenAIError(400, str(exc.detail)) from exc
    except RequestError as exc:
        raise OpenAIError(exc.status, str(exc)) from exc
    if not isinstance(payload, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p)[:64] for p in first.get("loc", ())) or None
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        raise OpenAIError(400, f"{where}: {message}" if where else message, where) from exc


async def authorized_replica(host: Any, auth: Any, request: Request, model: str) -> Any:
    """The language model `model` names, once the caller's key may use it (401/403/404/429
    in OpenAI's shape)."""
    name = model.partition("@")[0]
    if auth is not None:
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        try:
            check = await auth.authorize(
                secret.strip() if scheme.lower() == "bearer" else None, "predict", name
            )
        except StarletteHTTPException as exc:
            code = "invalid_api_key" if exc.status_code == 401 else "insufficient_scope"
            headers = dict(exc.headers) if exc.headers else None
            raise OpenAIError(exc.status_code, str(exc.detail), None, code, headers) from exc
        except RequestError as exc:
            raise OpenAIError(exc.status, str(exc), headers=exc.headers) from exc
        wait_s = host.limiter.wait_s(check.key_id or "unknown")
        if wait_s > 0:
            raise OpenAIError(
                429,
                f"rate limit of {host.args.rate_limit_per_s:g} requests/s for this key exceeded",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, round(wait_s + 0.5)))},
            )
    try:
        return host.language_for(model)
    except RequestError as exc:
        raise OpenAIError(exc.status, str(exc), "model", "model_not_found") from exc


def generation_request(
    body: Sampling,
    prompt_ids: list[int],
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids=tuple(prompt_ids),
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_strings(),
        n=body.n,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        request_id=uuid.uuid4().hex,
    )


def submit(replica: Any, request: GenerationRequest) -> RequestHandle:
    """The engine's handle, or its refusal in OpenAI's shape (before any response starts)."""
    try:
        return replica.engine.submit(request)  # type: ignore[no-any-return]
    except QueueFull as exc:
        raise OpenAIError(
            429,
            str(exc),
            code="queue_full",
            headers={"Retry-After": str(max(1, round(exc.retry_after_s + 0.49)))},
        ) from exc
    except KilnError as exc:
        text = str(exc)
        param = next(
            (p for p in ("max_tokens", "temperature", "top_p", "stop", "prompt") if p in text),
            None,
        )
        code = "context_length_exceeded" if "context" in text else None
        raise OpenAIError(400, text, param, code) from exc


# ----------------------------------------------------------------------------- routes


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorBody} for code in (400, 401, 403, 404, 413, 429, 503)
}


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The body's JSON schema for /openapi.json, its nested models written in place: a
    `#/$defs/...` reference means nothing inside an OpenAPI document (clients and the
    schemathesis fuzz could not read the bodies)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline(schema)}},
        }
    }


@router.post("/v1/completions", responses=OPENAI_ERRORS, openapi_extra=body_schema(CompletionBody))
async def completions(request: Request, host: HostDep, auth: AuthDep) -> Any:
    """OpenAI's legacy completions: continue a prompt (text or token ids)."""
    started = time.perf_counter()
    body: CompletionBody = await read_body(request, CompletionBody, host.args.max_body_bytes)
    replica = await authorized_replica(host, auth, request, body.model)
    if body.echo:
        raise OpenAIError(400, "echo is not supported: the answer holds the completion", "echo")
    try:
        prompt = body.the_prompt()
        prompt_ids = replica.prompt_ids(prompt)
    except (KilnError, ValueError) as exc:
        raise OpenAIError(400, str(exc), "prompt") from exc
    top = body.logprobs or 0
    logprobs = body.logprobs is not None
    generation = generation_request(body, prompt_ids, body.max_tokens or 16, logprobs, top)
    handle = submit(replica, generation)
    shape = CompletionShape(replica, body.model, generation.request_id, body.n)
    log = GenerationLog(host, replica, shape, "completions", prompt, started)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return streamed(request, handle, shape, include_usage, replica, log)
    return await answered(request, handle, shape, replica, log)


@router.post("/v1/chat/completions", responses=OPENAI_ERRORS, openapi_extra=body_schema(ChatBody))
async def chat_completions(request: Request, host: HostDep, auth: AuthDep) -> Any:
    """OpenAI's chat completions: answer a conversation, rendered by the model's template."""
    started = time.perf_counter()
    body: ChatBody = await read_body(request, ChatBody, host.args.max_body_bytes)
    replica = await authorized_replica(host, auth, request, body.model)
    if not body.messages:
        raise OpenAIError(400, "messages is empty; send at least one message", "messages")
    try:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = replica.chat_prompt(messages)
        prompt_ids = replica.prompt_ids(prompt)
    except (KilnError, ValueError) as exc:
        raise OpenAIError(400, str(exc), "messages") from exc
    max_tokens = body.max_completion_tokens or body.max_tokens
    generation = generation_request(
        body, prompt_ids, max_tokens, body.logprobs, body.top_logprobs or 0
    )
    handle = submit(replica, generation)
    shape = ChatShape(replica, body.model, generation.request_id, body.n)
    log = GenerationLog(host, replica, shape, "chat.completions", prompt, started)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return streamed(request, handle, shape, include_usage, replica, log)
    return await answered(request, handle, shape, replica, log)


# ----------------------------------------------------------------------------- answers


class GenerationLog:
    """What the prediction log keeps of one generation, when `--log-sample` picks it: the
    prompt, each choice's completion, tokens, and the engine's latencies for the request."""

    def __init__(
        self, host: Any, replica: Any, shape: Any, endpoint: str, prompt: Any, started: float
    ) -> None:
        log = getattr(host, "log", None)
        self.log = log if log is not None and log.sampled() else None
        self.replica, self.shape, self.endpoint, self.started = replica, shape, endpoint, started
        self.prompt = prompt
        self.texts: dict[int, list[str]] = {}
        self.finish_reasons: dict[int, str | None] = {}
        self.tokens: dict[int, int] = {}

    def add(self, delta: Delta) -> None:
        """A streamed delta's text and tokens, kept for the log."""
        if self.log is None or delta.finish_reason == "abort":
            return
        self.texts.setdefault(delta.index, []).append(delta.text)
        self.tokens[delta.index] = self.tokens.get(delta.index, 0) + len(delta.token_ids)
        if delta.finish_reason is not None:
            self.finish_reasons[delta.index] = delta.finish_reason

    def add_result(self, result: Any) -> None:
        for choice in result.choices:
            self.texts[choice.index] = [choice.text]
            self.tokens[choice.index] = len(choice.token_ids)
            self.finish_reasons[choice.index] = choice.finish_reason

    def finish(self, usage: Any) -> None:
        """Log the generation once the engine has told its latencies (see FinishedRequests)."""
        if self.log is None:
            return
        prompt = self.prompt
        if isinstance(prompt, list):  # token ids: logged as the text they decode to
            prompt = self.replica.tokenizer.decode(prompt)
        indices = sorted(self.texts)
        record = self.replica.record
        item = LoggedText(
            model=record.name,
            version=record.version,
            response_id=self.shape.id,
            ts=time.time(),
            latency_ms=(time.perf_counter() - self.started) * 1000.0,
            endpoint=self.endpoint,
            prompt=str(prompt),
            completions=["".join(self.texts[i]) for i in indices],
            finish_reasons=[self.finish_reasons.get(i) for i in indices],
            prompt_tokens=int(usage.prompt_tokens),
            completion_tokens=choice_tokens(
                [self.tokens.get(i, 0) for i in indices],
                [self.finish_reasons.get(i) for i in indices],
                int(usage.completion_tokens),
            ),
        )
        engine = self.replica.stats.engine
        if engine is not None:
            item.queue_depth = engine.num_waiting
            item.kv_cache_usage = engine.kv_blocks_used / max(engine.kv_blocks_total, 1)
        loop, log = asyncio.get_running_loop(), self.log

        def with_metrics(metrics: RequestMetrics) -> None:  # any thread
            ttft = metrics.time_to_first_token_s
            item.ttft_ms = None if ttft is None else ttft * 1000.0
            item.inter_token_ms = [gap * 1000.0 for gap in metrics.inter_token_s]
            loop.call_soon_threadsafe(log.record, item)

        self.replica.stats.finished.when_finished(self.shape.request_id, with_metrics)


def choice_tokens(counts: list[int], finish_reasons: list[str | None], total: int) -> list[int]:
    """Each choice's generated tokens, summing to the usage's: a choice's visible tokens leave
    out the stop token it ended on, which the usage counts (one per choice that stopped)."""
    found = list(counts)
    missing = total - sum(found)
    for i, reason in enumerate(finish_reasons):
        if missing <= 0:
            break
        if reason == "stop":
            found[i] += 1
            missing -= 1
    if found and missing > 0:
        found[0] += missing
    return found


async def answered(
    request: Request, handle: RequestHandle, shape: Any, replica: Any, log: GenerationLog
) -> Any:
    """The whole answer as one JSON body (the request is aborted if the client leaves)."""
    try:
        result = await handle.result()
    except KilnError as exc:
        raise OpenAIError(400, str(exc)) from exc
    finally:
        if not handle.done:
            handle.abort()
    replica.stats.add_usage(result.usage.prompt_tokens, result.usage.completion_tokens)
    log.add_result(result)
    log.finish(result.usage)
    return JSONResponse(shape.full(result))


def streamed(
    request: Request,
    handle: RequestHandle,
    shape: Any,
    include_usage: bool,
    replica: Any,
    log: GenerationLog,
) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        usage = None
        try:
            for first in shape.opening():
                yield sse(first)
            async for delta in handle:
                if delta.usage is not None:
                    usage = delta.usage
                log.add(delta)
                chunk = shape.chunk(delta)
                if chunk is not None:
                    yield sse(chunk)
            if usage is not None:
                replica.stats.add_usage(usage.prompt_tokens, usage.completion_tokens)
                log.finish(usage)
                if include_usage:
                    yield sse(shape.usage_chunk(usage))
            yield b"data: [DONE]\n\n"
        finally:
            if not handle.done:  # the client went away mid-stream: free its slot
                handle.abort()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def usage_dict(usage: Any) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


class CompletionShape:
    """`text_completion` objects."""

    object = "text_completion"

    def __init__(self, replica: Any, model: str, request_id: str, n: int = 1) -> None:
        self.replica, self.model, self.n = replica, model, n
        self.request_id = request_id
        self.id, self.created = f"cmpl-{request_id}", int(time.time())

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model}

    def opening(self) -> list[dict[str, Any]]:
        return []

    def logprobs(self, items: tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
        if items is None:
            return None
        decode = self.replica.tokenizer.decode
        return {
            "tokens": [decode([t.token_id]) for t in items],
            "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [{decode([i]): lp for i, lp in t.top} for t in items],
            "text_offset": [],
        }

    def chunk(self, delta: Delta) -> dict[str, Any] | None:
        if delta.finish_reason == "abort":
            return None
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return None
        choice = {
            "index": delta.index,
            "text": delta.text,
            "logprobs": self.logprobs(delta.logprobs),
            "finish_reason": delta.finish_reason,
        }
        return {**self.head(), "choices": [choice], "usage": None}

    def usage_chunk(self, usage: Any) -> dict[str, Any]:
        return {**self.head(), "choices": [], "usage": usage_dict(usage)}

    def full(self, result: Any) -> dict[str, Any]:
        choices = [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": self.logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for c in result.choices
        ]
        return {**self.head(), "choices": choices, "usage": usage_dict(result.usage)}


class ChatShape(CompletionShape):
    """`chat.completion` and `chat.completion.chunk` objects."""

    object = "chat.completion"

    def __init__(self, replica: Any, model: str, request_id: str, n: int = 1) -> None:
        super().__init__(replica, model, request_id, n)
        self.id = f"chatcmpl-{request_id}"

    def head(self, chunk: bool = True) -> dict[str, Any]:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def opening(self) -> list[dict[str, Any]]:
        """The first chunk of each choice carries the assistant role."""
        n = self.n
        return [
            {
                **self.head(),
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(n)
                ],
                "usage": None,
            }
        ]

    def logprobs(self, items: tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
        if items is None:
            return None
        decode = self.replica.tokenizer.decode

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, p) for i, p in t.top]}
                for t in items
            ]
        }

    def chunk(self, delta: Delta) -> dict[str, Any] | None:
        if delta.finish_reason == "abort":
            return None
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return None
        content = {"content": delta.text} if delta.text else {}
        choice = {
            "index": delta.index,
            "delta": content,
            "logprobs": self.logprobs(delta.logprobs),
            "finish_reason": delta.finish_reason,
        }
        return {**self.head(), "choices": [choice], "usage": None}

    def full(self, result: Any) -> dict[str, Any]:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self.logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for c in result.choices
        ]
        return {**self.head(False), "choices": choices, "usage": usage_dict(result.usage)}
