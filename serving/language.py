"""A language-model version inside a Serve replica: its engine, its prompt formats, its
numbers.

`LanguageReplica` loads a verified version (weights, tokenizer, chat template), starts a
continuous-batching `Engine` (serving/engine.py) on it, turns OpenAI prompts and chat messages
into token ids, and keeps the version's serving numbers: requests, prompt and completion
tokens, time to first token and inter-token latency (p50/p99 over the recent requests),
output tokens/s, queue depth and KV-cache use. The same numbers go to Prometheus as
`ray_kiln_lm_*` (Ray prefixes `ray_`).

Chat prompts use the version's own template (`chat_template` of an imported
`tokenizer_config.json`), rendered in Jinja2's immutable sandbox: a template can format
messages, never reach Python. A model without one gets Kiln's template, `DEFAULT_CHAT_TEMPLATE`:
one `role: content` line block per message and `assistant:` to answer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import numpy as np

from kiln.actors.catalog import VersionRecord
from kiln.actors.registry import read_verified_files
from kiln.serving.engine import Engine, EngineConfig, EngineStats, RequestMetrics
from kiln.training.artifacts import model_from_files
from kiln.training.errors import KilnError
from kiln.training.tokenizer import prompt_token_ids

logger = logging.getLogger(__name__)

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""Kiln's chat format for a model without a template of its own (docs/openai.md)."""
RECENT_REQUESTS = 1000
"""Requests the latency percentiles are taken over."""
KEPT_FINISHED = 256
"""Finished requests whose latencies wait for their route to ask (the prediction log)."""


class FinishedRequests:
    """Hands a finished request's latencies (the engine thread's `on_finish`) to whoever asks
    for them by id (the route logging it), in whichever order the two come: the answer's last
    delta and `on_finish` are not ordered across the threads."""

    def __init__(self, kept: int = KEPT_FINISHED) -> None:
        self.lock = threading.Lock()
        self.kept = kept
        self.finished: OrderedDict[str, RequestMetrics] = OrderedDict()
        self.waiting: dict[str, Callable[[RequestMetrics], None]] = {}

    def add(self, request_id: str, metrics: RequestMetrics) -> None:
        with self.lock:
            callback = self.waiting.pop(request_id, None)
            if callback is None:
                self.finished[request_id] = metrics
                while len(self.finished) > self.kept:  # requests nobody asked about
                    self.finished.popitem(last=False)
        if callback is not None:
            callback(metrics)

    def when_finished(self, request_id: str, callback: Callable[[RequestMetrics], None]) -> None:
        """Call `callback(metrics)` now if the request has finished, else when it does."""
        with self.lock:
            metrics = self.finished.pop(request_id, None)
            if metrics is None:
                self.waiting[request_id] = callback
                return
        callback(metrics)


class LanguageStats:
    """A version's serving numbers on this replica, fed by the engine's callbacks."""

    def __init__(self, name: str, version: int, prometheus: bool) -> None:
        self.tags = {"model": name, "version": str(version)}
        self.lock = threading.Lock()
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft_s: deque[float] = deque(maxlen=RECENT_REQUESTS)
        self.itl_s: deque[float] = deque(maxlen=RECENT_REQUESTS * 16)
        self.started = time.monotonic()
        self.engine: EngineStats | None = None
        self.metrics = LanguageMetrics() if prometheus else None
        self.finished = FinishedRequests()

    def request_finished(self, request_id: str, metrics: RequestMetrics) -> None:
        """The engine's callback as a request leaves it (its latencies)."""
        self.finished.add(request_id, metrics)
        with self.lock:
            self.requests += 1
            if metrics.time_to_first_token_s is not None:
                self.ttft_s.append(metrics.time_to_first_token_s)
            self.itl_s.extend(metrics.inter_token_s)
        if self.metrics is not None:
            self.metrics.record(self.tags, metrics)

    def add_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The router's count of a finished request's tokens (its `usage`)."""
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
        if self.metrics is not None:
            self.metrics.tokens(self.tags, prompt_tokens, completion_tokens)

    def engine_step(self, stats: EngineStats) -> None:
        self.engine = stats
        if self.metrics is not None:
            self.metrics.gauge(self.tags, stats)

    def report(self) -> dict[str, Any]:
        with self.lock:
            ttft, itl = np.array(self.ttft_s), np.array(self.itl_s)
            elapsed = max(time.monotonic() - self.started, 1e-9)
            found: dict[str, Any] = {
                "alive_s": elapsed,
                "requests": self.requests,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "output_tokens_per_s": self.completion_tokens / elapsed,
                "time_to_first_token_ms": percentiles_ms(ttft),
                "inter_token_latency_ms": percentiles_ms(itl),
            }
        engine = self.engine
        if engine is not None:
            found.update(
                queue_depth=engine.num_waiting,
                running=engine.num_running,
                kv_cache_usage=engine.kv_blocks_used / max(engine.kv_blocks_total, 1),
            )
        return found


def percentiles_ms(values: np.ndarray) -> dict[str, float | None]:
    if not len(values):
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(values * 1000.0, [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


class LanguageMetrics:
    """The `ray_kiln_lm_*` Prometheus series (made once per replica process)."""

    made: LanguageMetrics | None = None

    def __new__(cls) -> LanguageMetrics:
        if cls.made is None:  # Ray registers each metric name once per process
            cls.made = super().__new__(cls)
            cls.made.setup()
        return cls.made

    def setup(self) -> None:
        from ray.serve import metrics

        keys: Any = ("model", "version")
        self.requests = metrics.Counter(
            "kiln_lm_requests_total", description="Generation requests.", tag_keys=keys
        )
        self.prompt_tokens = metrics.Counter(
            "kiln_lm_prompt_tokens_total", description="Prompt tokens.", tag_keys=keys
        )
        self.completion_tokens = metrics.Counter(
            "kiln_lm_completion_tokens_total", description="Generated tokens.", tag_keys=keys
        )
        bounds = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30]
        self.ttft = metrics.Histogram(
            "kiln_lm_time_to_first_token_s",
            description="Time to first token (s).",
            boundaries=bounds,
            tag_keys=keys,
        )
        self.itl = metrics.Histogram(
            "kiln_lm_inter_token_latency_s",
            description="Time between a sequence's tokens (s).",
            boundaries=bounds,
            tag_keys=keys,
        )
        self.queue = metrics.Gauge(
            "kiln_lm_queue_depth", description="Requests waiting for KV memory.", tag_keys=keys
        )
        self.kv = metrics.Gauge(
            "kiln_lm_kv_cache_usage", description="Share of KV blocks in use.", tag_keys=keys
        )

    def record(self, tags: dict[str, str], metrics: RequestMetrics) -> None:
        self.requests.inc(1, tags)
        if metrics.time_to_first_token_s is not None:
            self.ttft.observe(metrics.time_to_first_token_s, tags)
        for gap in metrics.inter_token_s[-64:]:  # a long answer's gaps, sampled at its end
            self.itl.observe(gap, tags)

    def tokens(self, tags: dict[str, str], prompt: int, completion: int) -> None:
        if prompt:
            self.prompt_tokens.inc(prompt, tags)
        if completion:
            self.completion_tokens.inc(completion, tags)

    def gauge(self, tags: dict[str, str], stats: EngineStats) -> None:
        self.queue.set(stats.num_waiting, tags)
        self.kv.set(stats.kv_blocks_used / max(stats.kv_blocks_total, 1), tags)


class LanguageReplica:
    """A verified language-model version with a running continuous-batching engine."""

    def __init__(
        self,
        record: VersionRecord,
        storage_uri: str,
        gpu: str = "auto",
        config: EngineConfig | None = None,
        prometheus: bool = False,
    ) -> None:
        from kiln.training.tokenizer import tokenizer_from_bytes

        files = read_verified_files(storage_uri, record)
        model, spec = model_from_files(files)
        if "tokenizer.json" not in files:
            raise KilnError(f"{record.ref} has no tokenizer.json; it cannot be served")
        self.record, self.spec = record, spec
        self.tokenizer = tokenizer_from_bytes(files["tokenizer.json"])
        self.tokenizer_config = read_json(files.get("tokenizer_config.json"))
        self.chat_template = self.tokenizer_config.get("chat_template") or DEFAULT_CHAT_TEMPLATE
        self.stats = LanguageStats(record.name, record.version, prometheus)
        device = "cpu" if gpu == "off" else None
        engine_config = config or EngineConfig()
        if device and engine_config.device is None:
            engine_config.device = device
        self.engine = Engine(
            model,  # type: ignore[arg-type]  # a language model's spec builds a CausalLM
            spec,
            self.tokenizer,
            engine_config,
            on_step=self.stats.engine_step,
            on_finish=self.stats.request_finished,
        )
        logger.info("loaded %s on %s", record.ref, self.engine.device)

    @property
    def context(self) -> int:
        return int(self.engine.context)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A text prompt's tokens after the model's prompt prefix; token ids as they are."""
        if isinstance(prompt, list):
            return [int(t) for t in prompt]
        return prompt_token_ids(self.spec, self.tokenizer, prompt)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The messages rendered by the version's chat template (Jinja2's sandbox)."""
        return render_chat(self.chat_template, messages, self.special_tokens())

    def special_tokens(self) -> dict[str, str]:
        found = {}
        for role in ("bos", "eos", "pad"):
            value = self.tokenizer_config.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found[f"{role}_token"] = value
        return found

    def check_health(self) -> None:
        if self.engine.thread is not None and not self.engine.thread.is_alive():
            if not self.engine.stopping:
                raise RuntimeError(f"the generation engine of {self.record.ref} stopped")

    def close(self) -> None:
        self.engine.close()


def read_json(data: bytes | None) -> dict[str, Any]:
    if not data:
        return {}
    try:
        found = json.loads(data)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def render_chat(template: str, messages: list[dict[str, Any]], special: dict[str, str]) -> str:
    """A chat template applied as transformers applies it (messages, add_generation_prompt and
    the special tokens in scope), in an immutable sandbox; a template error is a KilnError."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = template_exception
    try:
        return environment.from_string(template).render(
            messages=messages, add_generation_prompt=True, **special
        )
    except TemplateError as exc:
        raise KilnError(f"the model's chat template failed on these messages: {exc}") from exc


def template_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)
