"""The prediction log of one Serve replica: buffered here, flushed to the FeedbackStore shards.

A request only appends a reference to its arrays (inputs and raw outputs) to a list
(`record`, a few microseconds); a task on the replica's event loop computes the predictions of
every buffered request at once (`fill_predictions`), turns the buffer into Arrow tables every
`flush_interval_s` or `max_rows` rows and sends each shard its rows (actors/feedback.py).
A flush the store did not acknowledge (a store being restarted, say) stays in the buffer and
goes again with the next one; past `max_buffered_rows` the oldest rows are dropped and
counted, so a store that stays down costs memory up to a bound, never requests.

A language model's generations are logged as `LoggedText` (one row per choice, the prompt
and completion texts in their own columns: actors/feedback.py `TEXT_PREDICTION_SCHEMA`).

Every `usage_interval_s` the replica also reports that it was alive, with its CPUs and GPUs
and the models it serves: the cost per prediction is computed from these rows.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from kiln.actors.feedback import (
    PREDICTION_SCHEMA,
    TEXT_PREDICTION_SCHEMA,
    USAGE_SCHEMA,
    shard_of,
    table_to_ipc,
)
from kiln.training.evaluate import outputs_to_predictions

logger = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0
FLUSH_MAX_ROWS = 1000
MAX_BUFFERED_ROWS = 200_000
USAGE_INTERVAL_S = 30.0


@dataclass
class Logged:
    """One request's rows, as the route saw them (arrays are not copied)."""

    model: str
    version: int
    request_id: str
    ts: float
    status: int
    latency_ms: float
    batch_rows: int
    x: np.ndarray | None  # (N, num_inputs) float32; None for a failed request
    predictions: np.ndarray | None  # (N,) class indices or values
    outputs: np.ndarray | None = None
    """The raw outputs (N, K), when `predictions` is left for the flush to compute (one
    `outputs_to_predictions` per model and flush instead of one per request)."""
    spec: dict[str, Any] | None = None
    """The model's spec, which turns `outputs` into predictions."""


@dataclass
class LoggedText:
    """One generation of a language model (serving/routes/openai.py), one entry per choice."""

    model: str
    version: int
    response_id: str
    """The `id` the OpenAI answer carries (`cmpl-...`, `chatcmpl-...`)."""
    ts: float
    latency_ms: float
    endpoint: str
    prompt: str
    completions: list[str]
    finish_reasons: list[str | None]
    prompt_tokens: int
    completion_tokens: list[int]
    ttft_ms: float | None = None
    inter_token_ms: list[float] | None = None
    queue_depth: int | None = None
    kv_cache_usage: float | None = None
    status: int = 200

    def num_rows(self) -> int:
        return max(1, len(self.completions))


def rows_of(item: Logged | LoggedText) -> int:
    if isinstance(item, LoggedText):
        return item.num_rows()
    return len(item.x) if item.x is not None else 1


def text_rows_table(items: list[LoggedText]) -> pa.Table:
    """TEXT_PREDICTION_SCHEMA rows: one per choice; the request's figures on choice 0."""
    rows: dict[str, list[Any]] = {field.name: [] for field in TEXT_PREDICTION_SCHEMA}
    for item in items:
        for choice in range(item.num_rows()):
            first = choice == 0
            values = {
                "id": f"{item.response_id}-{choice}",
                "request_id": item.response_id,
                "ts": item.ts,
                "version": item.version,
                "status": item.status,
                "latency_ms": item.latency_ms,
                "endpoint": item.endpoint,
                "choice": choice,
                "prompt": item.prompt,
                "completion": item.completions[choice] if item.completions else None,
                "finish_reason": item.finish_reasons[choice] if item.finish_reasons else None,
                "prompt_tokens": item.prompt_tokens if first else None,
                "completion_tokens": (
                    item.completion_tokens[choice] if item.completion_tokens else None
                ),
                "ttft_ms": item.ttft_ms if first else None,
                "inter_token_ms": item.inter_token_ms if first else None,
                "queue_depth": item.queue_depth,
                "kv_cache_usage": item.kv_cache_usage,
            }
            for key, value in values.items():
                rows[key].append(value)
    return pa.table(rows, schema=TEXT_PREDICTION_SCHEMA)


def fill_predictions(items: list[Logged | LoggedText]) -> None:
    """Set `predictions` of the items logged with raw `outputs` only: one
    `outputs_to_predictions` per model version and flush, over the outputs concatenated."""
    groups: dict[tuple[str, int, int], list[Logged]] = {}
    for item in items:
        if isinstance(item, Logged) and item.predictions is None and item.outputs is not None:
            groups.setdefault((item.model, item.version, item.outputs.shape[1]), []).append(item)
    for group in groups.values():
        spec = group[0].spec
        assert spec is not None
        outputs = np.concatenate([item.outputs for item in group])  # type: ignore[misc]
        predictions = outputs_to_predictions(outputs, spec)
        start = 0
        for item in group:
            end = start + len(item.outputs)  # type: ignore[arg-type]
            item.predictions, item.outputs = predictions[start:end], None
            start = end


def rows_table(items: list[Logged]) -> pa.Table:
    """PREDICTION_SCHEMA rows: one per instance of a served request, one per failed request.

    Built column by column from the concatenated arrays (about 2 us a row; row by row it was
    170 us), so a flush holds the replica's event loop for milliseconds.
    """
    served = [item for item in items if item.x is not None and item.predictions is not None]
    failed = [item for item in items if item.x is None or item.predictions is None]
    tables = []
    widths = {item.x.shape[1] for item in served}  # type: ignore[union-attr]
    for width in sorted(widths):
        group = [item for item in served if item.x.shape[1] == width]  # type: ignore[union-attr]
        tables.append(served_rows(group, width))
    if failed:
        tables.append(failed_rows(failed))
    if not tables:
        return PREDICTION_SCHEMA.empty_table()
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def served_rows(items: list[Logged], width: int) -> pa.Table:
    counts = np.array([len(item.x) for item in items])  # type: ignore[arg-type]
    x = np.concatenate([item.x for item in items]).astype(np.float32, copy=False)  # type: ignore[misc]
    offsets = np.arange(0, len(x) * width + 1, width, dtype=np.int32)
    inputs = pa.ListArray.from_arrays(pa.array(offsets), pa.array(x.reshape(-1)))

    def repeated(values: list[Any], dtype: Any) -> np.ndarray:
        return np.repeat(np.asarray(values, dtype=dtype), counts)

    request_ids = [item.request_id for item in items]
    return pa.table(
        {
            "id": [
                f"{r}-{j}"
                for r, n in zip(request_ids, counts.tolist(), strict=True)
                for j in range(n)
            ],
            # Python strings, not a numpy object array (pyarrow would import pandas for it).
            "request_id": [
                r for r, n in zip(request_ids, counts.tolist(), strict=True) for _ in range(n)
            ],
            "ts": repeated([item.ts for item in items], np.float64),
            "version": repeated([item.version for item in items], np.int32),
            "status": repeated([item.status for item in items], np.int16),
            "latency_ms": repeated([item.latency_ms for item in items], np.float32),
            "batch_rows": repeated([item.batch_rows for item in items], np.int32),
            "inputs": inputs,
            "prediction": np.concatenate(
                [np.asarray(item.predictions, dtype=np.float64) for item in items]
            ),
        },
        schema=PREDICTION_SCHEMA,
    )


def failed_rows(items: list[Logged]) -> pa.Table:
    return pa.table(
        {
            "id": [f"{item.request_id}-error" for item in items],
            "request_id": [item.request_id for item in items],
            "ts": [item.ts for item in items],
            "version": [item.version for item in items],
            "status": [item.status for item in items],
            "latency_ms": [item.latency_ms for item in items],
            "batch_rows": [0] * len(items),
            "inputs": pa.nulls(len(items), pa.list_(pa.float32())),
            "prediction": [float("nan")] * len(items),
        },
        schema=PREDICTION_SCHEMA,
    )


class PredictionLog:
    """Buffer and flusher of one replica's prediction log (see the module docstring)."""

    def __init__(
        self,
        stores: Callable[[], list[Any]],
        sample: float = 1.0,
        retention_days: int = 30,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        max_rows: int = FLUSH_MAX_ROWS,
        max_buffered_rows: int = MAX_BUFFERED_ROWS,
        on_drop: Callable[[int], Any] | None = None,
        served_models: Callable[[], list[str]] = list,
        masker: Callable[[Any], Any] | None = None,
    ) -> None:
        self._stores = stores
        self.handles: list[Any] | None = None
        self.sample = sample
        self.retention_days = retention_days
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.flush_interval_s = flush_interval_s
        self.max_rows = max_rows
        self.max_buffered_rows = max_buffered_rows
        self.buffer: list[Logged | LoggedText] = []
        self.buffered_rows = 0
        self.pending: dict[tuple[str, int], pa.Table] = {}
        """Rows built into tables whose flush has not been acknowledged, by (model, shard)."""
        self.dropped_rows = 0
        self.on_drop = on_drop
        """Told how many rows were dropped (the replica's Prometheus counter)."""
        self.flushed_rows = 0
        self.replica_id = uuid.uuid4().hex[:12]
        self.usage_since = time.time()
        self.served_models = served_models
        self.masker = masker
        """Masks a logged request before its rows are built (serving/logmask.py): at flush
        time, off the request path, and still in this replica."""
        """The model names this replica serves (its usage rows name them: cost)."""
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()

    def sampled(self) -> bool:
        """Whether to log the next request (`--log-sample`)."""
        return self.sample >= 1.0 or random.random() < self.sample

    def record(self, item: Logged | LoggedText) -> None:
        """Buffer one request's rows (the only work on the request path)."""
        self.buffer.append(item)
        self.buffered_rows += rows_of(item)
        self.start()
        if self.buffered_rows >= self.max_rows:
            self._wake.set()
        if self.buffered_rows > self.max_buffered_rows:
            self._drop_oldest()

    def start(self) -> None:
        """Start the flush and usage loop on the running event loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _drop_oldest(self) -> None:
        dropped = 0
        while self.buffered_rows > self.max_buffered_rows and self.buffer:
            item = self.buffer.pop(0)
            rows = rows_of(item)
            self.buffered_rows -= rows
            dropped += rows
        self.dropped_rows += dropped
        if self.on_drop is not None and dropped:
            self.on_drop(dropped)
        logger.warning("prediction log: %d rows dropped (stores unreachable)", self.dropped_rows)

    async def _run(self) -> None:
        next_usage = time.time() + USAGE_INTERVAL_S
        while True:
            # Not asyncio.wait_for: on Python 3.11 a cancel that comes as the event is set is
            # lost there (the inner wait won), and this loop then never ended (a benchmark's
            # asyncio.run waited forever at exit); asyncio.wait passes every cancel on.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait((waiter,), timeout=self.flush_interval_s)
            finally:
                waiter.cancel()
            self._wake.clear()
            await self.flush()
            if time.time() >= next_usage:
                next_usage = time.time() + USAGE_INTERVAL_S
                await self.report_usage()

    def stores(self) -> list[Any]:
        if self.handles is None:
            self.handles = self._stores()
        return self.handles

    async def flush(self) -> int:
        """Send every buffered row; returns the rows acknowledged. Unacknowledged rows stay."""
        async with self._flush_lock:
            items, self.buffer, self.buffered_rows = self.buffer, [], 0
            self._build_pending(items)
            if not self.pending:
                return 0
            stores = self.stores()
            keys = list(self.pending)
            calls = [
                stores[shard].append.remote(
                    model, table_to_ipc(self.pending[(model, shard)]), self.retention_days
                )
                for model, shard in keys
            ]
            done = 0
            for key, call in zip(keys, calls, strict=True):
                try:
                    await call
                except Exception as exc:  # a store restarting: keep the rows, send them again
                    logger.warning("prediction log flush to shard %d failed: %s", key[1], exc)
                    continue
                done += self.pending.pop(key).num_rows
            self.flushed_rows += done
            return done

    def _build_pending(self, items: list[Logged | LoggedText]) -> None:
        if not items:
            return
        fill_predictions(items)
        if self.masker is not None:
            items = [self.masker(item) for item in items]
        num_shards = len(self.stores())
        by_model: dict[str, list[Any]] = {}
        for item in items:
            by_model.setdefault(item.model, []).append(item)
        for model, model_items in by_model.items():
            texts = [i for i in model_items if isinstance(i, LoggedText)]
            table = text_rows_table(texts) if texts else rows_table(model_items)
            if num_shards == 1:  # the default: no id to hash, no table to split
                parts = [(0, table)]
            else:
                # By the row id, as feedback finds it (a response id `cmpl-x` shards as `cmpl`).
                row_ids = table.column("id").to_pylist()
                shards = np.array([shard_of(r, num_shards) for r in row_ids])
                parts = [
                    (shard, table.filter(pa.array(shards == shard)))
                    for shard in np.unique(shards).tolist()
                ]
            for shard, part in parts:
                key = (model, shard)
                self.pending[key] = (
                    pa.concat_tables([self.pending[key], part]) if key in self.pending else part
                )

    async def report_usage(self) -> None:
        now = time.time()
        table = pa.table(
            {
                "replica": [self.replica_id],
                "start_ts": [self.usage_since],
                "end_ts": [now],
                "num_cpus": [self.num_cpus],
                "num_gpus": [self.num_gpus],
                "models": [sorted(self.served_models())],
            },
            schema=USAGE_SCHEMA,
        )
        try:
            await self.stores()[0].append_usage.remote(table_to_ipc(table))
            self.usage_since = now
        except Exception as exc:  # the next report covers this span too
            logger.warning("replica usage report failed: %s", exc)

    async def close(self) -> None:
        """Flush what is left (a replica shutting down)."""
        if self._task is not None:
            self._task.cancel()
        await self.flush()
        await self.report_usage()
