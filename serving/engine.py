"""The generation engine behind Kiln's OpenAI-compatible routes: continuous batching in plain torch.

Why it exists: `kiln.training.generate` decodes a fixed batch offline; a server receives requests
one
by one, each with its own length, sampling settings and stops, and must not make a new request
wait for the batch in flight. So the engine batches at the level of one model step (iteration-
level, "continuous" batching): a request joins the running batch at the next step and leaves
the step it finishes. The split follows vLLM's v1 engine: a `Scheduler` decides, each step,
which sequences run and how many tokens each gets (decodes first, one token each, then prompt
prefill in chunks of `prefill_chunk_tokens` within the step's token budget, so a long prompt
never stalls running streams); a `BlockManager` owns the KV memory (slots, and blocks of 16
tokens); a `ModelRunner` only executes what it is handed; a `Sampler` applies each request's
penalties, temperature, top-k/top-p and seed; an `IncrementalDetokenizer` turns tokens into
text and holds back what could still become a stop string. `Engine` wires them and gives the
web server `submit` (a `RequestHandle` to iterate), `stream`, `complete` and `abort`.

Decisions, measured on this repository's 2-core AVX2 box (torch 2.13, shared with other work,
so single figures move by 10-20%; benchmarks/engine_step.py takes each arm's best of 2 rounds):

- **Kiln's own engine, not transformers' continuous batching.** Output tokens/s over 32 prompts
  of 32-256 tokens asking 64-128 greedy tokens, 2 threads: `lm_spec("small")` 85 / 285 / 480
  at 1 / 8 / 32 requests in flight, against 77 for transformers' `generate()` one request at a
  time and 67 for its `generate_batch` (all 32 at once); SmolLM-135M's shape 12.5 / 35.6 /
  59.2 against 11.8 and 26.1. At one request the two run the same matmuls; in a batch the
  engine is 5-6x `generate()` and 2.3-7x transformers' own continuous batching on CPU.
- **KV memory: contiguous slots, block accounting on top.** The physical cache is
  `kiln.training.lm.KVCache` with one row (slot) per running sequence, each a full context; the
  block manager reserves `ceil((prompt + max_tokens) / 16)` blocks of a `kv_cache_tokens`
  budget at admission. A decode step runs over the slot rows `[0, highest busy slot]` as a
  zero-copy view, so attention reads the cache in place. A paged pool (one tensor of 16-token
  blocks, gathered per layer through a block table) would make the budget the memory, but the
  gather copies every row's keys and values each layer each step: one decode step at 200
  cached tokens, 1 thread, took 10.7 / 16.9 / 32.5 ms contiguous against 11.4 / 20.2 / 57.4 ms
  paged for `lm_spec("small")` at 1 / 8 / 32 rows, and 60 / 150 / 312 against 65 / 198 / 432
  ms for SmolLM-135M's shape (+10 to +75%). The price of contiguous slots is memory: every
  slot holds a full context, so `kv_cache_max_bytes` caps the slot count (`max_model_len`
  shortens the slots), and the block budget limits admission rather than memory. Blocks are
  reserved up front (prompt + max_tokens), never grown, so nothing is ever preempted or
  recomputed; a choice that stops early returns its blocks then. `max_tokens=None` reserves
  the rest of the context.
- **Prefill and decode run as separate forwards.** `LlamaLM.forward` takes a padded (B, T)
  batch: one forward holding a 256-token chunk and 31 decodes would compute 32 x 256
  positions for 287 real ones. So each step runs one decode forward (T = 1 over the busy
  slots; rows still prefilling sit idle with `num_new = 0`) and one forward per prompt chunk
  (a one-row view of its slot, no padding).
- **Only the logits that are sampled.** A pre-hook on `lm_head` keeps the hidden states of
  the tokens sampled from (one per decoding row, the last of a prompt's final chunk, none of
  earlier chunks). A 256-token chunk of SmolLM-135M's shape (49152-wide head) took 0.91-0.95 s
  with it against 1.10-1.20 s without (1 thread).
- **A dedicated engine thread, not `asyncio.to_thread` per step.** A round trip through
  `to_thread` cost 210-240 us per step against 30 us for a thread that hands results to the
  event loop with one `call_soon_threadsafe` per loop per step (2000 trivial steps); the
  thread also serves callers with no event loop (tests, the CLI) through `step()`. torch
  releases the GIL inside kernels, so the event loop keeps answering HTTP during a step.
- **n > 1 prefills once.** The first choice prefills; its prompt's keys and values are copied
  to the other n - 1 slots, and each samples from the same last logits with its own generator.
- **Sampling is batched across requests.** One softmax/sort over the rows that sample, with
  per-row temperature, top-k, top-p and penalties as tensors; only the uniform draw is per
  row, from each choice's own `torch.Generator` (seeded with seed + choice index), so a seeded
  request draws the same numbers whatever shares its batch. Greedy rows take the argmax.
- **Prefill chunks of 256 tokens by default**, as the issue suggests. On 2 cores a chunk of
  SmolLM-135M's shape alone takes about a second, and running streams wait that long for
  that step's token; a latency-bound CPU deployment should lower it (the trade against
  throughput is not measured here: the shared machine was too busy for a clean run).

Where the time goes (torch.profiler, SmolLM-135M's shape, 32 decoding rows at ~110 cached
tokens, 230 ms a step on 2 threads): 76% the linear layers' matmuls, 12% attention, 3% rotary
(cat, mul), 1% cache writes; the engine's own work (inputs, cache plan, sampling,
detokenising, bookkeeping) is the rest. For `lm_spec("small")` at 32 rows (1 thread) an engine
step took 32.1 ms against 29.3 ms for the bare forward: about 9% on top.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from kiln.training import lm
from kiln.training.errors import KilnError, check_options
from kiln.training.generate import TextDecoder, default_stop_ids, samples

FinishReason = Literal["stop", "length", "abort"]
"""OpenAI's "stop" and "length"; "abort" only reaches a handle whose request was aborted."""

KV_BLOCK_TOKENS = 16
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4
DEFAULT_KV_CACHE_MAX_BYTES = 2 * 2**30
REPLACEMENT_CHAR = "\ufffd"

logger = logging.getLogger(__name__)


class QueueFull(KilnError):
    """The engine's waiting queue is at `max_waiting`: the HTTP layer answers 429 with a
    Retry-After of `retry_after_s`."""

    retry_after_s: float

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineFailed(RuntimeError):
    """A step raised (a bug, or the device failed); every request in flight ends with this."""


# --- configuration and requests ----------------------------------------------------------------


@dataclass(kw_only=True)
class EngineConfig:
    """How much the engine runs at once and how much KV memory it holds."""

    max_batch: int = 32
    """Most sequences decoding together: the KV cache has one slot (row) per sequence."""
    max_model_len: int | None = None
    """Serve at most this many positions per sequence (default: the model's context)."""
    kv_cache_tokens: int | None = None
    """The block budget, in tokens (default: every slot's full context)."""
    kv_cache_max_bytes: int = DEFAULT_KV_CACHE_MAX_BYTES
    """The physical cache's cap; fewer slots than `max_batch` are made when it binds."""
    prefill_chunk_tokens: int = 256
    """Most prompt tokens one request prefills in one step."""
    max_step_tokens: int | None = None
    """Tokens one step may run, decodes included (default: max_batch + prefill_chunk_tokens)."""
    max_waiting: int = 256
    """Requests that may wait for KV memory; past it, `submit` raises `QueueFull`."""
    retry_after_s: float = 1.0
    """What a `QueueFull` tells the caller to wait."""
    device: str | None = None
    """"cuda" or "cpu"; default: CUDA when present."""

    def __post_init__(self) -> None:
        check_options(
            [
                (self.max_batch >= 1, "max_batch", self.max_batch, "at least 1"),
                (
                    self.max_model_len is None or self.max_model_len >= 2,
                    "max_model_len",
                    self.max_model_len,
                    "at least 2",
                ),
                (
                    self.kv_cache_tokens is None or self.kv_cache_tokens >= KV_BLOCK_TOKENS,
                    "kv_cache_tokens",
                    self.kv_cache_tokens,
                    f"at least {KV_BLOCK_TOKENS}",
                ),
                (
                    self.prefill_chunk_tokens >= 1,
                    "prefill_chunk_tokens",
                    self.prefill_chunk_tokens,
                    "at least 1",
                ),
                (
                    self.max_step_tokens is None or self.max_step_tokens > self.max_batch,
                    "max_step_tokens",
                    self.max_step_tokens,
                    f"more than max_batch ({self.max_batch}), so every decode fits a step",
                ),
                (self.max_waiting >= 0, "max_waiting", self.max_waiting, "at least 0"),
                (
                    self.device in (None, "cpu", "cuda"),
                    "device",
                    self.device,
                    '"cpu" or "cuda"',
                ),
            ]
        )

    @property
    def step_tokens(self) -> int:
        return self.max_step_tokens or self.max_batch + self.prefill_chunk_tokens


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One completion request, in OpenAI's terms (the router maps the JSON body to it)."""

    prompt_ids: tuple[int, ...]
    max_tokens: int | None = None
    """New tokens per choice; None: up to the end of the context."""
    temperature: float = 1.0
    """0 is greedy; up to 2."""
    top_p: float = 1.0
    top_k: int = 0
    """0 keeps every token."""
    seed: int | None = None
    """Choice i draws from a generator seeded with seed + i."""
    stop: tuple[str, ...] = ()
    """Up to 4 strings; the text ends before the first one found."""
    stop_token_ids: tuple[int, ...] | None = None
    """Default: the model's eos token(s)."""
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def check(self, context: int, vocab_size: int, has_tokenizer: bool) -> int:
        """A KilnError naming the first parameter that breaks its rule; else the tokens each
        choice may generate."""
        check_options(
            [
                (0 <= self.temperature <= 2, "temperature", self.temperature, "between 0 and 2"),
                (0 < self.top_p <= 1, "top_p", self.top_p, "above 0 and at most 1"),
                (self.top_k >= 0, "top_k", self.top_k, "at least 0 (0 keeps every token)"),
                (1 <= self.n <= MAX_N, "n", self.n, f"between 1 and {MAX_N}"),
                (
                    0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                    "top_logprobs",
                    self.top_logprobs,
                    f"between 0 and {MAX_TOP_LOGPROBS}",
                ),
                (
                    -2 <= self.presence_penalty <= 2,
                    "presence_penalty",
                    self.presence_penalty,
                    "between -2 and 2",
                ),
                (
                    -2 <= self.frequency_penalty <= 2,
                    "frequency_penalty",
                    self.frequency_penalty,
                    "between -2 and 2",
                ),
                (
                    len(self.stop) <= MAX_STOP_STRINGS,
                    "stop",
                    list(self.stop),
                    f"at most {MAX_STOP_STRINGS} strings",
                ),
                (all(self.stop), "stop", list(self.stop), "non-empty strings"),
                (
                    self.max_tokens is None or self.max_tokens >= 1,
                    "max_tokens",
                    self.max_tokens,
                    "at least 1",
                ),
            ]
        )
        if self.top_logprobs and not self.logprobs:
            raise KilnError("top_logprobs needs logprobs: set logprobs to true.")
        if self.stop and not has_tokenizer:
            raise KilnError("Stop strings need the model's tokenizer; this engine has none.")
        self.check_ids(vocab_size)
        return self.check_length(context)

    def check_ids(self, vocab_size: int) -> None:
        if not self.prompt_ids:
            raise KilnError("The prompt is empty: give at least one token.")
        for name, ids in (("prompt", self.prompt_ids), ("stop_token_ids", self.stop_token_ids)):
            bad = [i for i in ids or () if not 0 <= i < vocab_size]
            if bad:
                raise KilnError(
                    f"The {name} holds token id {bad[0]}, outside the model's vocabulary of "
                    f"{vocab_size}: use ids from 0 to {vocab_size - 1}."
                )

    def check_length(self, context: int) -> int:
        num_prompt = len(self.prompt_ids)
        room = context - num_prompt
        if room >= 1 and (self.max_tokens is None or self.max_tokens <= room):
            return room if self.max_tokens is None else self.max_tokens
        asks = "" if self.max_tokens is None else f" and max_tokens asks for {self.max_tokens}"
        fix = (
            f"shorten the prompt or ask for at most {room} tokens"
            if room >= 1
            else f"shorten the prompt to fewer than {context} tokens"
        )
        raise KilnError(
            f"This model's context is {context} tokens; the prompt has {num_prompt}{asks}: {fix}."
        )


# --- outputs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model's raw logits, and the likeliest
    alternatives (`top_logprobs` of them, likeliest first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    """Tokens the model generated for every choice, a stop token included."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, kw_only=True)
class Delta:
    """What one step adds to one choice. Text is held back while it could still become a
    stop string (or is half a UTF-8 character); token ids and logprobs come with the text they
    decode to. A choice's last delta has its `finish_reason`; the request's last has `usage`."""

    request_id: str
    index: int
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: FinishReason


@dataclass(frozen=True)
class Result:
    request_id: str
    choices: tuple[Choice, ...]
    usage: Usage


@dataclass
class RequestMetrics:
    """Latencies of one request, in seconds of the engine's clock."""

    arrival_s: float
    admitted_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    """Gaps between a choice's consecutive tokens, all choices together."""

    @property
    def queue_wait_s(self) -> float | None:
        return None if self.admitted_s is None else self.admitted_s - self.arrival_s

    @property
    def time_to_first_token_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s


@dataclass(frozen=True)
class EngineStats:
    """The engine's gauges and counters, for Prometheus."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_steps: int
    num_generated_tokens: int


# --- incremental detokenising and stop strings -------------------------------------------------


class IncrementalDetokenizer:
    """One sequence's text, token by token. Decoding from an offset (`prefix_offset`) keeps the
    work per token small; a decode that ends in U+FFFD is half a UTF-8 character split across
    byte-level tokens, and waits for the next token. Each token is released with the text that
    contains it, and text that could begin a stop string is held back until it cannot."""

    def __init__(self, tokenizer: TextDecoder | None, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""
        """The text decoded so far; ends before a stop string once one is found."""
        self.token_ends: list[int] = []
        """For each decoded token, the length of `text` once it was decoded."""
        self.prefix_offset = 0
        self.read_offset = 0
        self.sent_chars = 0
        self.sent_tokens = 0
        self.stopped_by: str | None = None

    def add(self, token_id: int) -> str | None:
        """Take one token; the stop string it completes, if any."""
        self.token_ids.append(token_id)
        if self.tokenizer is None:
            self.token_ends.append(0)
            return None
        if not self.decode_new(final=False):
            return None
        return self.find_stop()

    def decode_new(self, final: bool) -> bool:
        """Decode the tokens since `read_offset` against the context before them; whether
        they are complete (a trailing U+FFFD is half a character, unless the sequence ended).
        A token that decodes to nothing (a skipped special token) is complete too, but does
        not move the offsets, so the next one still decodes with its context."""
        prefix = self.decode(self.read_offset)
        full = self.decode(len(self.token_ids))
        if full.endswith(REPLACEMENT_CHAR) and not final:
            return False
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.token_ends += [len(self.text)] * (len(self.token_ids) - len(self.token_ends))
        return True

    def decode(self, end: int) -> str:
        assert self.tokenizer is not None
        ids = self.token_ids[self.prefix_offset : end]
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def find_stop(self) -> str | None:
        """Any stop string starts at or after `sent_chars`: held-back text is every suffix
        that could begin one, so none starts earlier (the text before it was released)."""
        found = [(self.text.find(s, self.sent_chars), s) for s in self.stop]
        found = [(at, s) for at, s in found if at >= 0]
        if not found:
            return None
        at, self.stopped_by = min(found)
        self.text = self.text[:at]
        return self.stopped_by

    def flush(self) -> None:
        """The sequence ended: decode whatever waited for more bytes."""
        if self.tokenizer is None or self.stopped_by is not None:
            return
        if len(self.token_ends) < len(self.token_ids):
            self.decode_new(final=True)
            self.find_stop()

    def release(self, final: bool) -> tuple[str, int]:
        """The text to send now and how many more tokens it completes. While running, text
        that could begin a stop string stays back; once final, only the stop itself is cut."""
        end = len(self.text) if final or self.stopped_by else len(self.text) - self.held_back()
        text = self.text[self.sent_chars : end]
        num_tokens = 0
        for token_end in self.token_ends[self.sent_tokens :]:
            if token_end > end:
                break
            num_tokens += 1
        if final and self.stopped_by is None:
            num_tokens = len(self.token_ids) - self.sent_tokens
        self.sent_chars, self.sent_tokens = end, self.sent_tokens + num_tokens
        return text, num_tokens

    def held_back(self) -> int:
        """The length of the longest unsent suffix that is a proper prefix of a stop string."""
        unsent = self.text[self.sent_chars :]
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(unsent)), longest, -1):
                if unsent.endswith(stop[:size]):
                    longest = size
                    break
        return longest


# --- requests in flight ------------------------------------------------------------------------


@dataclass(eq=False)
class SequenceState:
    """One choice of a request: its slot, blocks, tokens, text and sampling state."""

    request: RequestState
    index: int
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    slot: int = -1
    blocks: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    last_token_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class RequestState:
    """A request from arrival to its last delta."""

    request: GenerationRequest
    max_tokens: int
    stop_ids: frozenset[int]
    metrics: RequestMetrics
    handle: RequestHandle
    sequences: list[SequenceState] = field(default_factory=list)
    num_computed: int = 0
    """Prompt tokens already in the cache."""
    aborted: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefilled(self) -> bool:
        return self.num_computed == self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return all(sequence.finished for sequence in self.sequences)

    @property
    def tokens_per_sequence(self) -> int:
        """Positions each choice may fill: the prompt and every new token."""
        return self.num_prompt_tokens + self.max_tokens


def new_request_state(
    request: GenerationRequest,
    max_tokens: int,
    stop_ids: Iterable[int],
    tokenizer: TextDecoder | None,
    device: torch.device,
    now_s: float,
    loop: asyncio.AbstractEventLoop | None = None,
) -> RequestState:
    state = RequestState(
        request=request,
        max_tokens=max_tokens,
        stop_ids=frozenset(stop_ids),
        metrics=RequestMetrics(arrival_s=now_s),
        handle=RequestHandle(request.request_id, loop),
    )
    for index in range(request.n):
        generator = None
        if samples(request.temperature):
            generator = torch.Generator(device=device)
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed((request.seed + index) % 2**64)  # any int is a seed
        detokenizer = IncrementalDetokenizer(tokenizer, request.stop)
        state.sequences.append(SequenceState(state, index, detokenizer, generator))
    return state


class RequestHandle:
    """The caller's side of one request: its deltas, in order, as they are made. Iterate it
    with `async for` on the event loop it was submitted from, or call `get` from a thread."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None) -> None:
        self.request_id = request_id
        self.loop = loop
        self._deltas: queue.SimpleQueue[Delta | BaseException] = queue.SimpleQueue()
        self._event: asyncio.Event | None = None
        self._done = False
        self.abort: Callable[[], object] = lambda: None
        """Set by the engine: abort this request."""

    def put(self, item: Delta | BaseException) -> None:
        """Engine side; the event loop is woken by the engine, once per step."""
        self._deltas.put(item)

    def wake(self) -> None:
        if self._event is not None:
            self._event.set()

    def get(self, timeout_s: float | None = None) -> Delta:
        """The next delta, waiting up to `timeout_s` (queue.Empty after it)."""
        return self.unwrap(self._deltas.get(timeout=timeout_s))

    def drain(self) -> list[Delta]:
        """Every delta made so far, without waiting."""
        deltas = []
        while not self._deltas.empty():
            deltas.append(self.unwrap(self._deltas.get_nowait()))
        return deltas

    def unwrap(self, item: Delta | BaseException) -> Delta:
        if isinstance(item, BaseException):
            self._done = True
            raise EngineFailed(f"Generation failed: {item}") from item
        if is_last(item):
            self._done = True
        return item

    @property
    def done(self) -> bool:
        """The caller has read the last delta."""
        return self._done

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self.deltas()

    async def deltas(self) -> AsyncIterator[Delta]:
        """The deltas until the last one; leaving early (a client disconnect) aborts."""
        try:
            while not self._done:
                yield await self.next_async()
        finally:
            if not self._done:
                self.abort()

    async def next_async(self) -> Delta:
        if self._event is None:
            self._event = asyncio.Event()
        while True:
            try:
                return self.unwrap(self._deltas.get_nowait())
            except queue.Empty:
                pass
            self._event.clear()
            if self._deltas.empty():
                await self._event.wait()

    async def result(self) -> Result:
        builder = ResultBuilder(self.request_id)
        async for delta in self.deltas():
            builder.add(delta)
        return builder.build()

    def collect(self, timeout_s: float | None = None) -> Result:
        """The whole result, from a thread (the engine's own thread must be running)."""
        builder = ResultBuilder(self.request_id)
        while not self._done:
            builder.add(self.get(timeout_s))
        return builder.build()


def is_last(delta: Delta) -> bool:
    return delta.usage is not None or delta.finish_reason == "abort"


class ResultBuilder:
    """A request's deltas folded into its `Result`."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.texts: dict[int, list[str]] = {}
        self.token_ids: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[TokenLogprob] | None] = {}
        self.finish_reasons: dict[int, FinishReason] = {}
        self.usage: Usage | None = None

    def add(self, delta: Delta) -> None:
        self.texts.setdefault(delta.index, []).append(delta.text)
        self.token_ids.setdefault(delta.index, []).extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs.setdefault(delta.index, []).extend(delta.logprobs)  # type: ignore[union-attr]
        if delta.finish_reason is not None:
            self.finish_reasons[delta.index] = delta.finish_reason
        self.usage = delta.usage or self.usage

    def build(self) -> Result:
        choices = tuple(
            Choice(
                index=index,
                text="".join(self.texts[index]),
                token_ids=tuple(self.token_ids[index]),
                logprobs=tuple(self.logprobs[index] or ()) if index in self.logprobs else None,
                finish_reason=self.finish_reasons.get(index, "abort"),
            )
            for index in sorted(self.texts)
        )
        return Result(self.request_id, choices, self.usage or Usage(0, 0))


# --- KV memory ---------------------------------------------------------------------------------


class BlockManager:
    """Owns the KV cache's memory: slots (cache rows, one per running sequence) and the block
    budget (16-token blocks). Lowest free slot first, so busy slots stay packed at the top of
    the cache and a decode step's view of rows [0, highest busy slot] has few idle rows."""

    def __init__(
        self, num_slots: int, num_blocks: int, block_tokens: int = KV_BLOCK_TOKENS
    ) -> None:
        self.num_slots, self.num_blocks, self.block_tokens = num_slots, num_blocks, block_tokens
        self.free_slots = list(range(num_slots))  # a heap
        self.free_blocks = deque(range(num_blocks))

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_tokens)

    def can_allocate(self, num_sequences: int, tokens_each: int) -> bool:
        needed = num_sequences * self.blocks_for(tokens_each)
        return num_sequences <= len(self.free_slots) and needed <= len(self.free_blocks)

    def allocate(self, tokens_each: int) -> tuple[int, list[int]]:
        """A slot and the blocks for one sequence of `tokens_each` positions."""
        assert self.can_allocate(1, tokens_each), "allocate only what can_allocate allows"
        blocks = [self.free_blocks.popleft() for _ in range(self.blocks_for(tokens_each))]
        return heapq.heappop(self.free_slots), blocks

    def free(self, slot: int, blocks: list[int]) -> None:
        assert slot not in self.free_slots, f"slot {slot} freed twice"
        heapq.heappush(self.free_slots, slot)
        self.free_blocks.extend(blocks)
        blocks.clear()

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def highest_busy_slot(self) -> int:
        busy = set(range(self.num_slots)) - set(self.free_slots)
        return max(busy, default=-1)


# --- scheduling --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillChunk:
    request: RequestState
    start: int
    stop: int

    @property
    def last(self) -> bool:
        """The chunk ends the prompt: its last logits give the first new token."""
        return self.stop == self.request.num_prompt_tokens


@dataclass
class SchedulerOutput:
    decodes: list[SequenceState] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    admitted: list[RequestState] = field(default_factory=list)
    aborted: list[RequestState] = field(default_factory=list)
    freed_slots: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.stop - c.start for c in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """Decides each step which sequences run and how many tokens each gets: every decoding
    sequence one token, then prompt chunks (at most `prefill_chunk_tokens` each) in arrival
    order, first for requests already admitted, then for new ones, while the step's token
    budget lasts. A request is admitted, in arrival order, once the block manager holds a slot
    and its blocks for each of its n choices; it waits otherwise, in a queue of at most
    `max_waiting`. Pure bookkeeping: no model, no tensors."""

    def __init__(self, config: EngineConfig, blocks: BlockManager) -> None:
        self.config, self.blocks = config, blocks
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []

    def add(self, request: RequestState) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(
                f"The engine is at capacity ({len(self.running)} requests running, "
                f"{len(self.waiting)} waiting): retry in {self.config.retry_after_s:g} s.",
                self.config.retry_after_s,
            )
        self.waiting.append(request)

    def fits_at_all(self, request: RequestState) -> bool:
        """Whether the request could ever be admitted, with the cache empty."""
        n, blocks_each = request.request.n, self.blocks.blocks_for(request.tokens_per_sequence)
        return n <= self.blocks.num_slots and n * blocks_each <= self.blocks.num_blocks

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        self.drop_aborted(output)
        budget = self.config.step_tokens
        for request in self.running:
            if request.prefilled:
                output.decodes += [s for s in request.sequences if not s.finished]
        budget -= len(output.decodes)
        for request in self.running:
            if not request.prefilled and budget > 0:
                budget -= self.schedule_prefill(request, budget, output)
        while self.waiting and budget > 0 and self.admit(self.waiting[0]):
            request = self.waiting.popleft()
            output.admitted.append(request)
            budget -= self.schedule_prefill(request, budget, output)
        return output

    def schedule_prefill(self, request: RequestState, budget: int, output: SchedulerOutput) -> int:
        start = request.num_computed
        size = min(request.num_prompt_tokens - start, self.config.prefill_chunk_tokens, budget)
        output.prefills.append(PrefillChunk(request, start, start + size))
        request.num_computed += size
        return size

    def admit(self, request: RequestState) -> bool:
        if not self.blocks.can_allocate(request.request.n, request.tokens_per_sequence):
            return False
        for sequence in request.sequences:
            sequence.slot, sequence.blocks = self.blocks.allocate(request.tokens_per_sequence)
        self.running.append(request)
        return True

    def drop_aborted(self, output: SchedulerOutput) -> None:
        for request in [r for r in self.running if r.aborted]:
            output.aborted.append(request)
            for sequence in request.sequences:
                output.freed_slots += self.finish(sequence, "abort")

    def finish(self, sequence: SequenceState, reason: FinishReason) -> list[int]:
        """End one choice and free its memory; the request leaves once all its choices end.
        The slots freed, for the runner to clear."""
        if sequence.finished and sequence.slot < 0:
            return []
        sequence.finish_reason = sequence.finish_reason or reason
        freed = []
        if sequence.slot >= 0:
            self.blocks.free(sequence.slot, sequence.blocks)
            freed.append(sequence.slot)
            sequence.slot = -1
        if sequence.request.finished and sequence.request in self.running:
            self.running.remove(sequence.request)
        return freed

    def remove_waiting(self, request: RequestState) -> bool:
        if request in self.waiting:
            self.waiting.remove(request)
            return True
        return False


# --- running the model -------------------------------------------------------------------------


class SlotView(lm.KVCache):
    """Rows [start, stop) of a cache, as a cache: the model writes through to the parent."""

    def __init__(self, parent: lm.KVCache, start: int, stop: int) -> None:
        # No super().__init__: that would allocate; these are views of the parent's tensors.
        self.k = parent.k[:, start:stop]
        self.v = parent.v[:, start:stop]
        self.lengths = parent.lengths[start:stop]


class ModelRunner:
    """Executes a scheduled step on the model: one decode forward over the busy slots, one
    forward per prompt chunk; returns only the logits that are sampled from."""

    def __init__(self, model: lm.CausalLM, num_slots: int, max_len: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(num_slots, max_len)
        self.token_buffer = torch.zeros(num_slots, 1, dtype=torch.long, device=self.device)
        self.num_new_buffer = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.keep: tuple[torch.Tensor, torch.Tensor] | None = None
        head = model.get_submodule("lm_head")
        head.register_forward_pre_hook(self.select_hidden)

    def select_hidden(self, _: nn.Module, args: tuple[torch.Tensor, ...]) -> Any:
        """lm_head's input cut to the (row, column) pairs the step samples from: (N, 1, C)."""
        if self.keep is None:
            return None
        rows, columns = self.keep
        return (args[0][rows, columns][:, None],)

    def forward(
        self, view: lm.KVCache, ids: torch.Tensor, num_new: torch.Tensor, keep: Any
    ) -> torch.Tensor:
        self.keep = keep
        try:
            return self.model(ids, cache=view, num_new=num_new)[:, 0]  # (N, V)
        finally:
            self.keep = None

    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        """Feed each slot its last token; the next logits, (N, V) in `slots` order."""
        rows = torch.tensor(slots, device=self.device)
        num_rows = max(slots) + 1
        ids, num_new = self.token_buffer[:num_rows], self.num_new_buffer[:num_rows]
        num_new.zero_()
        num_new[rows] = 1
        ids[rows, 0] = torch.tensor(token_ids, device=self.device)
        view = SlotView(self.cache, 0, num_rows)
        return self.forward(view, ids, num_new, (rows, torch.zeros_like(rows)))

    def prefill(self, slot: int, token_ids: list[int], want_logits: bool) -> torch.Tensor:
        """Append a prompt chunk to one slot; the logits after its last token, (1, V), or
        (0, V) when none are wanted."""
        ids = torch.tensor([token_ids], device=self.device)  # (1, T)
        keep_rows = torch.zeros(int(want_logits), dtype=torch.long, device=self.device)
        keep = (keep_rows, torch.full_like(keep_rows, len(token_ids) - 1))
        view = SlotView(self.cache, slot, slot + 1)
        return self.forward(view, ids, torch.tensor([len(token_ids)], device=self.device), keep)

    def fork(self, source: int, targets: list[int], length: int) -> None:
        """Copy a prefilled prompt's keys and values to other slots (n > 1)."""
        index = torch.tensor(targets, device=self.device)
        self.cache.k[:, index, :, :length] = self.cache.k[:, source : source + 1, :, :length]
        self.cache.v[:, index, :, :length] = self.cache.v[:, source : source + 1, :, :length]
        self.cache.lengths[index] = length

    def clear(self, slots: list[int]) -> None:
        if slots:
            self.cache.lengths[slots] = 0


# --- sampling ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampledTokens:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    """Next tokens for a batch of rows, each with its own request's settings. OpenAI's
    penalties subtract `frequency_penalty * count + presence_penalty * (count > 0)` from each
    token's logit, counting the tokens the choice has generated; logprobs are the log-softmax
    of the raw logits, before penalties and temperature."""

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device) -> None:
        self.device = device
        self.counts = torch.zeros(num_slots, vocab_size, dtype=torch.int32, device=device)

    def reset(self, slots: list[int]) -> None:
        if slots:
            self.counts[slots] = 0

    def sample(self, logits: torch.Tensor, rows: list[SequenceState]) -> SampledTokens:
        """logits (N, V), one row per sequence in `rows`."""
        raw = logits.float()  # (N, V)
        params = [row.request.request for row in rows]
        scores = self.penalise(raw, rows, params)
        token_ids = scores.argmax(dim=-1)  # (N,) greedy
        sampled = [i for i, p in enumerate(params) if samples(p.temperature)]
        if sampled:
            index = torch.tensor(sampled, device=self.device)
            draws = self.draw(scores[index], [rows[i] for i in sampled])
            token_ids = token_ids.index_put((index,), draws)
        penalised = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
        if penalised:
            slots = torch.tensor([rows[i].slot for i in penalised], device=self.device)
            chosen = token_ids[torch.tensor(penalised, device=self.device)]
            self.counts.index_put_(
                (slots, chosen), torch.ones_like(chosen, dtype=torch.int32), accumulate=True
            )
        return SampledTokens(token_ids.tolist(), self.logprobs(raw, token_ids, params))

    def penalise(
        self, raw: torch.Tensor, rows: list[SequenceState], params: list[GenerationRequest]
    ) -> torch.Tensor:
        penalised = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
        if not penalised:
            return raw
        index = torch.tensor(penalised, device=self.device)
        slots = torch.tensor([rows[i].slot for i in penalised], device=self.device)
        counts = self.counts[slots].float()  # (P, V)
        frequency = self.column([params[i].frequency_penalty for i in penalised])  # (P, 1)
        presence = self.column([params[i].presence_penalty for i in penalised])  # (P, 1)
        penalty = frequency * counts + presence * (counts > 0)  # (P, V)
        return raw.index_put((index,), raw[index] - penalty)

    def draw(self, scores: torch.Tensor, rows: list[SequenceState]) -> torch.Tensor:
        """One token per row from softmax(scores / temperature) after top-k and top-p: the
        inverse CDF at a uniform drawn from the row's own generator."""
        params = [row.request.request for row in rows]
        scores = scores / self.column([p.temperature for p in params])  # (S, V)
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            top_k = torch.tensor([p.top_k for p in params], device=self.device)
            top_p = torch.tensor([p.top_p for p in params], device=self.device)
            scores = keep_top_k_top_p(scores, top_k, top_p)
        cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)  # (S, V)
        uniforms = torch.stack(
            [torch.rand((), generator=row.generator, device=self.device) for row in rows]
        )  # (S,)
        total = cdf[:, -1]  # (S,) 1 up to rounding
        # Below the total, so the first cdf entry above the target is a token of some mass.
        targets = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, targets[:, None], right=True)[:, 0]  # (S,)

    def column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)[:, None]  # (S, 1)

    def logprobs(
        self, raw: torch.Tensor, token_ids: torch.Tensor, params: list[GenerationRequest]
    ) -> list[TokenLogprob | None]:
        wanted = [i for i, p in enumerate(params) if p.logprobs]
        out: list[TokenLogprob | None] = [None] * len(params)
        if not wanted:
            return out
        index = torch.tensor(wanted, device=self.device)
        log_probs = torch.log_softmax(raw[index], dim=-1)  # (W, V)
        chosen = log_probs.gather(1, token_ids[index][:, None])[:, 0].tolist()
        k = max(params[i].top_logprobs for i in wanted)
        top_values, top_ids = log_probs.topk(k, dim=-1) if k else (log_probs[:, :0],) * 2
        top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
        for j, i in enumerate(wanted):
            n = params[i].top_logprobs
            top = tuple(zip(top_ids_list[j][:n], top_values_list[j][:n], strict=True))
            out[i] = TokenLogprob(int(token_ids[i]), chosen[j], top)
        return out


def keep_top_k_top_p(
    scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Scores (S, V) with, per row, all but the top_k highest (0: all; ties kept) and then all
    but the fewest likeliest whose probabilities reach top_p set to -inf: the same rules as
    `kiln.training.generate.keep_top_k` and `keep_top_p`, for rows of different settings."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)  # (S, V)
    vocab_size = scores.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)  # (S,)
    kth = sorted_scores.gather(1, (k - 1)[:, None])  # (S, 1)
    sorted_scores = sorted_scores.masked_fill(sorted_scores < kth, float("-inf"))
    sorted_probs = torch.softmax(sorted_scores, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (S, V)
    drop_sorted = (mass_before >= top_p[:, None]) | sorted_scores.isneginf()
    # The likeliest token always stays, even for a top_p that is 0.0 in float32 (5e-324).
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (S, V)
    return scores.masked_fill(drop, float("-inf"))


# --- the engine --------------------------------------------------------------------------------


def pick_device(name: str | None) -> torch.device:
    """CUDA when asked for or, by default, when present; the CPU otherwise."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise KilnError('Got "cuda" for device, but torch sees no GPU: use device "cpu".')
    return torch.device(name)


def kv_bytes_per_token(model: lm.CausalLM, dtype: torch.dtype) -> int:
    """Keys and values of every layer for one position."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * element_size


class Engine:
    """One model, its tokenizer and its KV cache, generating for many requests at once.

    `submit` checks a request and queues it (a `RequestHandle` back, or `KilnError` /
    `QueueFull` at once, before any response has started); `abort` ends one; `step` runs one
    model step. `start` runs steps on a thread of their own whenever there is work (`stream`
    and `complete` start it); without it, a caller drives `step` itself (tests, offline use).
    """

    def __init__(
        self,
        model: lm.CausalLM,
        spec: dict[str, Any],
        tokenizer: TextDecoder | None = None,
        config: EngineConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_step: Callable[[EngineStats], None] | None = None,
        on_finish: Callable[[str, RequestMetrics], None] | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.spec, self.tokenizer, self.clock = spec, tokenizer, clock
        self.on_step, self.on_finish = on_step, on_finish
        self.device = pick_device(self.config.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = self.place(model)
        self.context = min(lm.context_length(spec), self.config.max_model_len or 2**62)
        self.vocab_size = int(spec["vocab_size"])
        num_slots, num_blocks = self.size_cache()
        self.blocks = BlockManager(num_slots, num_blocks)
        self.scheduler = Scheduler(self.config, self.blocks)
        with torch.inference_mode():
            self.runner = ModelRunner(self.model, num_slots, self.context)
            self.sampler = Sampler(num_slots, self.vocab_size, self.device)
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.requests: dict[str, RequestState] = {}
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.thread: threading.Thread | None = None
        self.stopping = False

    def place(self, model: lm.CausalLM) -> lm.CausalLM:
        """The model on the engine's device and dtype; rotary frequencies stay float32
        (in bf16 they would lose the precision long positions need)."""
        model = model.to(device=self.device, dtype=self.dtype).eval()
        for module in model.modules():
            if isinstance(module, lm.Rotary):
                frequencies = lm.rope_frequencies(self.spec, model.head_dim).to(self.device)
                module.register_buffer("inv_freq", frequencies, persistent=False)
        return model

    def size_cache(self) -> tuple[int, int]:
        """Slots (each a full context) within the memory cap, and blocks of the budget."""
        per_slot = self.context * kv_bytes_per_token(self.model, self.dtype)
        num_slots = max(1, min(self.config.max_batch, self.config.kv_cache_max_bytes // per_slot))
        if num_slots < self.config.max_batch:
            logger.info(
                "The KV cache holds %d slots of %d positions within %d bytes (max_batch %d).",
                num_slots,
                self.context,
                self.config.kv_cache_max_bytes,
                self.config.max_batch,
            )
        budget = min(self.config.kv_cache_tokens or 2**62, num_slots * self.context)
        return num_slots, budget // KV_BLOCK_TOKENS

    # --- the caller's side ---------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Check and queue a request. Raises KilnError for a bad request, QueueFull when
        `max_waiting` requests already wait. Called on an event loop, the handle is iterated
        there with `async for`, and the engine thread starts (the loop cannot drive `step`)."""
        max_tokens = request.check(self.context, self.vocab_size, self.tokenizer is not None)
        stop_ids = request.stop_token_ids
        state = new_request_state(
            request,
            max_tokens,
            default_stop_ids(self.spec) if stop_ids is None else stop_ids,
            self.tokenizer,
            self.device,
            self.clock(),
            running_loop(),
        )
        self.check_fits(state)
        with self.lock:
            if request.request_id in self.requests:
                raise KilnError(f'A request with id "{request.request_id}" is already running.')
            self.scheduler.add(state)
            self.requests[request.request_id] = state
            self.work.notify()
        state.handle.abort = lambda: self.abort(request.request_id)
        if state.handle.loop is not None:
            self.start()
        return state.handle

    def check_fits(self, state: RequestState) -> None:
        n, blocks_each = state.request.n, self.blocks.blocks_for(state.tokens_per_sequence)
        if n > self.blocks.num_slots:
            raise KilnError(
                f"n is {n}; this engine runs at most {self.blocks.num_slots} sequences at "
                f"once: ask for n of at most {self.blocks.num_slots}."
            )
        if not self.scheduler.fits_at_all(state):
            raise KilnError(
                f"The request needs {n * blocks_each} KV blocks of {KV_BLOCK_TOKENS} tokens "
                f"(n={n}, prompt and max_tokens {state.tokens_per_sequence}); the engine holds "
                f"{self.blocks.num_blocks}: lower max_tokens or n."
            )

    def abort(self, request_id: str) -> bool:
        """End a request (its client left): a waiting one at once, a running one's slots and
        blocks at the start of the next step. Whether the request was in flight."""
        with self.lock:
            state = self.requests.get(request_id)
            if state is None or state.aborted:
                return False
            state.aborted = True
            waiting = self.scheduler.remove_waiting(state)
            if waiting:
                for sequence in state.sequences:
                    sequence.finish_reason = "abort"
                self.end_request(state)
            self.work.notify()
        if waiting:
            wake_handles([state.handle])
        return True

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """The request's deltas as they come. Errors are raised
        on the first iteration; a router that must answer them before streaming calls
        `submit` and iterates the handle."""
        async for delta in self.submit(request):
            yield delta

    async def complete(self, request: GenerationRequest) -> Result:
        return await self.submit(request).result()

    def stats(self) -> EngineStats:
        with self.lock:
            return self.stats_unlocked()

    def stats_unlocked(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.blocks.num_used_blocks,
            kv_blocks_total=self.blocks.num_blocks,
            num_steps=self.num_steps,
            num_generated_tokens=self.num_generated_tokens,
        )

    # --- the engine thread ---------------------------------------------------------------------

    def start(self) -> None:
        """Run steps on a thread of the engine's own (idempotent)."""
        with self.lock:
            if self.thread is not None:
                return
            self.stopping = False
            self.thread = threading.Thread(target=self.run_forever, name="kiln-engine", daemon=True)
            self.thread.start()

    def close(self) -> None:
        """Stop the thread; every request in flight ends with finish_reason "abort"."""
        with self.lock:
            self.stopping = True
            self.work.notify()
            thread = self.thread
        if thread is not None:
            thread.join()
        with self.lock:
            self.thread = None
            request_ids = list(self.requests)
        for request_id in request_ids:
            self.abort(request_id)
        self.step()  # frees the running ones' slots and tells their handles

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def run_forever(self) -> None:
        # torch's thread count is process-wide (the replica sets it to its num_cpus); said once
        # here because this thread is the one computing.
        logger.info("Engine thread computing on %d torch threads.", torch.get_num_threads())
        while True:
            with self.work:
                while not self.stopping and not self.has_work():
                    self.work.wait()
                if self.stopping:
                    return
            try:
                self.step()
            except Exception as error:  # a bug or a device failure: fail what is in flight
                logger.exception("An engine step failed; ending every request in flight.")
                self.fail_all(error)

    def run_until_idle(self, max_steps: int = 100_000) -> int:
        """Step until nothing runs or waits (no thread needed); the steps run."""
        for done in range(max_steps):
            if not self.has_work():
                return done
            self.step()
        raise RuntimeError(f"The engine still had work after {max_steps} steps.")

    def fail_all(self, error: BaseException) -> None:
        with self.lock, torch.inference_mode():
            states = list(self.requests.values())
            for state in states:
                for sequence in state.sequences:
                    if sequence.slot >= 0:
                        self.blocks.free(sequence.slot, sequence.blocks)
                        sequence.slot = -1
                    sequence.finish_reason = sequence.finish_reason or "abort"
                state.handle.put(error)
            self.scheduler.running.clear()
            self.scheduler.waiting.clear()
            self.requests.clear()
            self.runner.clear(list(range(self.blocks.num_slots)))
        wake_handles([state.handle for state in states])

    # --- one step ------------------------------------------------------------------------------

    def step(self) -> bool:
        """Schedule, run the model, sample, and hand each request its delta. Whether any
        tokens ran."""
        with torch.inference_mode():
            with self.lock:
                output = self.scheduler.schedule()
                published = self.after_schedule(output)
            if not output.empty:
                rows, logits = self.execute(output)
                sampled = self.sampler.sample(logits, rows) if logits is not None else None
                with self.lock:
                    published += self.process(rows, sampled)
                    self.num_steps += 1
        wake_handles(published)
        if self.on_step is not None and not output.empty:
            self.on_step(self.stats())
        return not output.empty

    def after_schedule(self, output: SchedulerOutput) -> list[RequestHandle]:
        self.runner.clear(output.freed_slots)
        now = self.clock()
        for state in output.admitted:
            state.metrics.admitted_s = now
            if state.request.presence_penalty or state.request.frequency_penalty:
                self.sampler.reset([sequence.slot for sequence in state.sequences])
        for state in output.aborted:
            self.end_request(state)
        return [state.handle for state in output.aborted]

    def execute(self, output: SchedulerOutput) -> tuple[list[SequenceState], torch.Tensor | None]:
        """Run the scheduled forwards; the sequences that sample now and their logits (N, V)."""
        rows: list[SequenceState] = []
        parts: list[torch.Tensor] = []
        if output.decodes:
            slots = [sequence.slot for sequence in output.decodes]
            last_tokens = [sequence.generated[-1] for sequence in output.decodes]
            parts.append(self.runner.decode(slots, last_tokens))
            rows += output.decodes
        for chunk in output.prefills:
            sequences = chunk.request.sequences
            prompt = list(chunk.request.request.prompt_ids[chunk.start : chunk.stop])
            logits = self.runner.prefill(sequences[0].slot, prompt, want_logits=chunk.last)
            if chunk.last:
                if len(sequences) > 1:
                    targets = [sequence.slot for sequence in sequences[1:]]
                    self.runner.fork(sequences[0].slot, targets, chunk.request.num_prompt_tokens)
                parts.append(logits.expand(len(sequences), -1))
                rows += sequences
        return rows, torch.cat(parts) if parts else None

    def process(
        self, rows: list[SequenceState], sampled: SampledTokens | None
    ) -> list[RequestHandle]:
        """Take each row's new token: stops, text, the delta; free what finished."""
        if sampled is None:
            return []
        now = self.clock()
        freed: list[int] = []
        touched: dict[str, RequestState] = {}
        for sequence, token, logprob in zip(rows, sampled.token_ids, sampled.logprobs, strict=True):
            state = sequence.request
            if state.aborted or sequence.finished:
                continue
            self.record_time(sequence, now)
            reason = self.accept(sequence, token, logprob)
            if reason is not None:
                freed += self.scheduler.finish(sequence, reason)
                sequence.detokenizer.flush()
            self.publish_delta(sequence, final=reason is not None)
            touched[state.request_id] = state
        self.runner.clear(freed)
        for state in touched.values():
            if state.finished:
                self.end_request(state, publish=False)
        return [state.handle for state in touched.values()]

    def accept(self, sequence: SequenceState, token: int, logprob: TokenLogprob | None) -> Any:
        """Append a token; the finish reason it brings, if any."""
        state = sequence.request
        sequence.generated.append(token)
        self.num_generated_tokens += 1
        if token in state.stop_ids:
            return "stop"
        if logprob is not None:
            sequence.logprobs.append(logprob)
        if sequence.detokenizer.add(token) is not None:
            return "stop"
        if len(sequence.generated) >= state.max_tokens:
            return "length"
        return None

    def record_time(self, sequence: SequenceState, now: float) -> None:
        metrics = sequence.request.metrics
        if metrics.first_token_s is None:
            metrics.first_token_s = now
        if sequence.last_token_s is not None:
            metrics.inter_token_s.append(now - sequence.last_token_s)
        sequence.last_token_s = now

    def publish_delta(self, sequence: SequenceState, final: bool) -> None:
        state = sequence.request
        detokenizer = sequence.detokenizer
        text, num_tokens = detokenizer.release(final)
        if not text and not num_tokens and not final:
            return
        first = detokenizer.sent_tokens - num_tokens
        token_ids = tuple(detokenizer.token_ids[first : detokenizer.sent_tokens])
        logprobs = None
        if state.request.logprobs:
            logprobs = tuple(sequence.logprobs[first : detokenizer.sent_tokens])
        usage = None
        if final and state.finished:
            completion = sum(len(s.generated) for s in state.sequences)
            usage = Usage(state.num_prompt_tokens, completion)
        state.handle.put(
            Delta(
                request_id=state.request_id,
                index=sequence.index,
                text=text,
                token_ids=token_ids,
                logprobs=logprobs,
                finish_reason=sequence.finish_reason if final else None,
                usage=usage,
            )
        )

    def end_request(self, state: RequestState, publish: bool = True) -> None:
        """The request leaves the engine (lock held); an aborted one tells its handle."""
        state.metrics.finished_s = self.clock()
        self.requests.pop(state.request_id, None)
        if publish:
            state.handle.put(Delta(request_id=state.request_id, index=0, finish_reason="abort"))
        if self.on_finish is not None:
            self.on_finish(state.request_id, state.metrics)


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def wake_handles(handles: list[RequestHandle]) -> None:
    """Wake the event loops waiting on these handles: one call per loop per step."""
    by_loop: dict[asyncio.AbstractEventLoop, list[RequestHandle]] = {}
    for handle in handles:
        if handle.loop is not None:
            by_loop.setdefault(handle.loop, []).append(handle)
    for loop, waiting in by_loop.items():
        try:
            loop.call_soon_threadsafe(wake_all, waiting)
        except RuntimeError:  # the loop closed: its callers are gone
            for handle in waiting:
                handle.abort()


def wake_all(handles: list[RequestHandle]) -> None:
    for handle in handles:
        handle.wake()
