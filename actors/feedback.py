"""FeedbackStore: the prediction log and the labelled feedback of served models, on disk.

Serve replicas log every (sampled) prediction off the request path: they buffer rows and flush
them every second or thousand rows (serving/predlog.py) to a FeedbackStore actor, which appends
them as Parquet files under `$KILN_STORAGE/monitoring/<model>/predictions/day=YYYY-MM-DD/`.
`POST /v1/models/{name}:feedback` sends labels to the same store, which keeps those whose id it
has logged, under `.../labels/day=.../`.

Scaling out: rows go to one of N stores by a hash of the request id (`shard_of`), so no single
actor sits in the path of every request: each store holds the ids of its own shard and writes
its own files (named `s<shard>-...`), and N grows with the cluster (`KILN_FEEDBACK_SHARDS`).
Stores never read each other's files; readers (`read_window`, the metrics endpoint and
`kiln monitor`) read every shard's files straight from storage, without the actors.

Nothing acknowledged is lost: `append` and `add_labels` return only after their Parquet file is
published whole (`ArtifactStore.publish`); the actor restarts when killed (`max_restarts=-1`)
and rebuilds its index of logged ids from its files; a replica keeps rows whose flush was not
acknowledged and sends them again, and a store writes only ids it has not written before, so a
retried flush adds no duplicate (readers drop duplicates by id as well). Many small files are
merged per day and shard once there are `COMPACT_AFTER_FILES` of them.

The index of logged ids (`IdIndex`) holds a 64-bit hash per id, by day, in sorted numpy runs:
8 bytes an id where a set of the id strings took ~100 (2.9 GB an hour at 8,000 logged rows/s).
It is bounded (`INDEX_MAX_IDS` a shard, `KILN_FEEDBACK_INDEX_IDS`): past the bound the oldest
day leaves memory, and a label for an id the index does not hold is then accepted unchecked
(it joins no prediction if none was logged) rather than called unknown; the label's answer says
so (`unchecked_ids`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
import uuid
import zlib
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from kiln.actors.registry import NAMESPACE
from kiln.actors.storage import ArtifactStore

logger = logging.getLogger(__name__)

MONITORING_DIR = "monitoring"
USAGE_MODEL = "_usage"
"""The folder below monitoring/ that holds replica usage (the cost figures), not a model."""
COMPACT_AFTER_FILES = 200
COMPACTED = "-compact.parquet"
MAINTAIN_EVERY_S = 300.0
DEFAULT_RETENTION_DAYS = 30

PREDICTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("request_id", pa.string()),
        ("ts", pa.float64()),
        ("version", pa.int32()),
        ("status", pa.int16()),
        ("latency_ms", pa.float32()),
        ("batch_rows", pa.int32()),
        ("inputs", pa.list_(pa.float32())),
        ("prediction", pa.float64()),
    ]
)
"""One row per predicted instance (status 200), or per failed request (its status, no inputs).
`prediction` is the class index for a classifier (see the version's spec) or the value."""

TEXT_PREDICTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("request_id", pa.string()),
        ("ts", pa.float64()),
        ("version", pa.int32()),
        ("status", pa.int16()),
        ("latency_ms", pa.float32()),
        ("endpoint", pa.string()),
        ("choice", pa.int16()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("ttft_ms", pa.float32()),
        ("inter_token_ms", pa.list_(pa.float32())),
        ("queue_depth", pa.int32()),
        ("kv_cache_usage", pa.float32()),
    ]
)
"""A language model's log: one row per choice of a generation, id `<response id>-<choice>`.
`prompt` (the text the model read: a chat is rendered by its template) and `completion` hold
the only free text, so a masking step finds it there. `prompt_tokens` and the latencies
(`ttft_ms`, `inter_token_ms`: the gaps between the request's tokens) are the request's, on
choice 0 only (null on the others); `completion_tokens` are the choice's own. `queue_depth`
and `kv_cache_usage` are the engine's as the request finished."""
TEXT_COLUMNS = ("prompt", "completion")
"""The free-text columns of TEXT_PREDICTION_SCHEMA."""

LABEL_SCHEMA = pa.schema([("id", pa.string()), ("ts", pa.float64()), ("label", pa.string())])
"""A label as JSON text (a class label as the caller sent it, or a number); latest wins."""

USAGE_SCHEMA = pa.schema(
    [
        ("replica", pa.string()),
        ("start_ts", pa.float64()),
        ("end_ts", pa.float64()),
        ("num_cpus", pa.float32()),
        ("num_gpus", pa.float32()),
        ("models", pa.list_(pa.string())),
    ]
)
"""A replica alive over [start_ts, end_ts] with these resources, serving these model names."""


INDEX_MAX_IDS = 50_000_000
"""Logged ids one shard's index holds (8 bytes each: ~400 MB) before its oldest day leaves
memory: 30 days of retention at up to ~19 logged rows/s a shard, or ~6 days at 100 rows/s.
More shards (`KILN_FEEDBACK_SHARDS`) spread the ids."""


def id_hashes(ids: list[str]) -> np.ndarray:
    """64-bit hashes of ids (Python's string hash: stable within the process, which rebuilds
    its index from the files when it restarts; two of 50 million ids share one with odds of
    about 1 in 15,000, which would accept a label for the other)."""
    return np.fromiter(map(hash, ids), np.int64, len(ids))


class IdIndex:
    """The ids one shard has logged for one model, by day: sorted runs of 64-bit hashes.

    A day's runs merge as a binary counter does (a new run merges into the last while that one
    is at most twice its size), so a lookup searches O(log n) runs and adding an id costs
    O(log n) amortised, in numpy. `complete` is False while a day within retention was left out
    (the bound, or a restart that read only the newest days)."""

    def __init__(self, max_ids: int = INDEX_MAX_IDS) -> None:
        self.max_ids = max_ids
        self.days: dict[str, list[np.ndarray]] = {}
        self.size = 0
        self.left_out: set[str] = set()
        """Days this shard logged that the index no longer (or never) held in full."""

    @property
    def complete(self) -> bool:
        return not self.left_out

    @property
    def nbytes(self) -> int:
        return sum(run.nbytes for runs in self.days.values() for run in runs)

    def add(self, day: str, hashes: np.ndarray) -> None:
        if not len(hashes):
            return
        runs = self.days.setdefault(day, [])
        runs.append(np.sort(hashes))
        while len(runs) > 1 and runs[-2].size <= 2 * runs[-1].size:
            last = runs.pop()
            # Two sorted runs: numpy's stable sort of integers merges them in linear time.
            runs[-1] = np.sort(np.concatenate([runs[-1], last]), kind="stable")
        self.size += len(hashes)
        while self.size > self.max_ids and len(self.days) > 1:
            self.leave_out(min(self.days))

    def leave_out(self, day: str) -> None:
        """Drop a day from memory, remembering that it was logged."""
        self.size -= sum(run.size for run in self.days.pop(day, []))
        self.left_out.add(day)

    def drop_before(self, day: str) -> None:
        """Forget days before `day` entirely (past retention: their files are gone)."""
        for old in [d for d in self.days if d < day]:
            self.size -= sum(run.size for run in self.days.pop(old))
        self.left_out = {d for d in self.left_out if d >= day}

    def contains(self, hashes: np.ndarray, days: list[str] | None = None) -> np.ndarray:
        """Which of `hashes` the index holds (in `days`, or in any day)."""
        found = np.zeros(len(hashes), dtype=bool)
        for day in self.days if days is None else days:
            for run in self.days.get(day, ()):
                at = np.searchsorted(run, hashes).clip(max=len(run) - 1)
                found |= run[at] == hashes
        return found


def shard_of(prediction_id: str, num_shards: int) -> int:
    """The store that holds an id: every id of one request goes to the same one."""
    request_id = prediction_id.rpartition("-")[0] or prediction_id
    return zlib.crc32(request_id.encode()) % max(num_shards, 1)


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")


def table_to_ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def ipc_to_table(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


DICTIONARY_PAGE_LIMIT = 16 << 10
"""Bytes of a column chunk's dictionary before Parquet falls back to plain values. Arrow's
default (1 MiB) builds a dictionary of every distinct float of continuous inputs before giving
up: 3.8 us of the store's CPU a logged row of 64 random floats, and files a third larger than
their values (377 bytes a row). At 16 KiB it gives up early: 1.5 us and 256 bytes; inputs of
few distinct values (digits' 0-16) keep their dictionary, 59 bytes a row either way."""


def day_numbers(table: pa.Table, ts_column: str = "ts") -> np.ndarray:
    """Each row's UTC day number, vectorised (POSIX time has no leap seconds, so day n is
    [86400 n, 86400 (n+1))): formatting a date per row cost ~2 us of the store's CPU a logged
    prediction."""
    return np.floor(table.column(ts_column).to_numpy() / 86400.0).astype(np.int64)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", dictionary_pagesize_limit=DICTIONARY_PAGE_LIMIT)
    return sink.getvalue()


class FeedbackService:
    """One shard of the prediction log and feedback (the actor's logic, testable without Ray)."""

    def __init__(
        self,
        storage_uri: str,
        shard: int = 0,
        num_shards: int = 1,
        index_max_ids: int = INDEX_MAX_IDS,
    ) -> None:
        self.store = ArtifactStore(storage_uri)
        self.shard = shard
        self.num_shards = num_shards
        self.index_max_ids = index_max_ids
        self.known: dict[str, IdIndex] = {}
        """Per model, the prediction ids this shard has written (what labels may refer to)."""
        self.retention_days: dict[str, int] = {}
        self.small_files: dict[tuple[str, str, str], int] = {}
        """Per (model, kind, day), this shard's files not yet merged (compaction's trigger)."""
        self.last_maintained = time.time()
        self._load_index()

    # -- writing ---------------------------------------------------------------------------

    def append(self, model: str, ipc: bytes, retention_days: int = DEFAULT_RETENTION_DAYS) -> int:
        """Write the rows of an Arrow IPC stream (PREDICTION_SCHEMA) not written before;
        returns how many were new. Returns only once they are on disk."""
        table = ipc_to_table(ipc)
        known = self.index(model)
        hashes = id_hashes(table.column("id").to_pylist())
        numbers = day_numbers(table)
        # A retried flush repeats rows with their own ts: only their days need looking at.
        days = {int(n): day_of(int(n) * 86400.0) for n in np.unique(numbers)}
        fresh = ~known.contains(hashes, list(days.values()))
        written = int(fresh.sum())
        if written:
            if written < len(hashes):
                table = table.filter(pa.array(fresh))
                hashes, numbers = hashes[fresh], numbers[fresh]
            self._write_by_day(model, "predictions", table, numbers=numbers)
            for number, day in days.items():
                known.add(day, hashes[numbers == number] if len(days) > 1 else hashes)
        self.retention_days[model] = retention_days
        self._maybe_maintain()
        return written

    def index(self, model: str) -> IdIndex:
        if model not in self.known:
            self.known[model] = IdIndex(self.index_max_ids)
        return self.known[model]

    def add_labels(self, model: str, ids: list[str], labels: list[str]) -> dict[str, Any]:
        """Keep the labels (JSON text) of logged ids; the others come back as unknown. Where the
        index left a day out (its bound), an id it does not hold is kept unchecked instead, and
        listed in `unchecked_ids`."""
        known = self.known.get(model) or IdIndex(self.index_max_ids)
        held = known.contains(id_hashes(ids))
        if not known.complete:
            unchecked = [row_id for row_id, h in zip(ids, held, strict=True) if not h]
            held[:] = True
        else:
            unchecked = []
        accepted = np.flatnonzero(held).tolist()
        unknown = [row_id for row_id, h in zip(ids, held, strict=True) if not h]
        if accepted:
            now = time.time()
            table = pa.table(
                {
                    "id": [ids[i] for i in accepted],
                    # Later rows of one request win over earlier ones (the latest label).
                    "ts": [now + 1e-6 * n for n in range(len(accepted))],
                    "label": [labels[i] for i in accepted],
                },
                schema=LABEL_SCHEMA,
            )
            self._write_by_day(model, "labels", table)
        answer: dict[str, Any] = {"accepted": len(accepted), "unknown_ids": unknown}
        if unchecked:
            answer["unchecked_ids"] = unchecked
        return answer

    def append_usage(self, ipc: bytes) -> int:
        """Replica usage rows (USAGE_SCHEMA), for the cost per prediction."""
        table = ipc_to_table(ipc)
        self._write_by_day(USAGE_MODEL, "usage", table, ts_column="end_ts")
        return table.num_rows

    def _write_by_day(
        self,
        model: str,
        kind: str,
        table: pa.Table,
        ts_column: str = "ts",
        numbers: np.ndarray | None = None,
    ) -> None:
        # A flush within one day (the usual case) is written as it came.
        if numbers is None:
            numbers = day_numbers(table, ts_column)
        distinct = np.unique(numbers)
        for number in distinct.tolist():
            day = day_of(number * 86400.0)
            part = table if len(distinct) == 1 else table.filter(pa.array(numbers == number))
            name = f"s{self.shard}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
            self.store.publish(
                f"{MONITORING_DIR}/{model}/{kind}/day={day}/{name}", parquet_bytes(part)
            )
            folder = (model, kind, day)
            if folder not in self.small_files:
                self.small_files[folder] = len(self._own_files(model, kind, day, small=True))
            else:
                self.small_files[folder] += 1
            if self.small_files[folder] >= COMPACT_AFTER_FILES:
                self._compact(model, kind, day)
                self.small_files[folder] = 0

    # -- restart and housekeeping -----------------------------------------------------------

    def _own_files(self, model: str, kind: str, day: str, small: bool = False) -> list[str]:
        """This shard's files of a day (`small`: only those no compaction has merged)."""
        folder = f"{MONITORING_DIR}/{model}/{kind}/day={day}"
        prefix = f"s{self.shard}-"
        return [
            f"{folder}/{name}"
            for name in self.store.list_files(folder)
            if name.startswith(prefix)
            and name.endswith(".parquet")
            and not (small and name.endswith(COMPACTED))
        ]

    def _load_index(self) -> None:
        """The ids this shard wrote before a restart, from its own prediction files: newest day
        first, up to the index's bound (the days past it are left out, as they would have been
        had the store not restarted)."""
        for model in self.store.list_dirs(MONITORING_DIR):
            if model == USAGE_MODEL:
                continue
            index = self.index(model)
            for day in sorted(day_dirs(self.store, model, "predictions"), reverse=True):
                if index.size >= index.max_ids:
                    index.left_out.add(day)
                    continue
                for path in self._own_files(model, "predictions", day):
                    table = read_parquet(self.store, path, ["id"])
                    if table is not None:
                        index.add(day, id_hashes(table.column("id").to_pylist()))
                if index.size > index.max_ids:  # this day only partly: it counts as left out
                    index.left_out.add(day)
        logger.info(
            "feedback shard %d: %d logged ids (%.0f MB)",
            self.shard,
            sum(index.size for index in self.known.values()),
            sum(index.nbytes for index in self.known.values()) / 1e6,
        )

    def _maybe_maintain(self) -> None:
        if time.time() - self.last_maintained >= MAINTAIN_EVERY_S:
            self.maintain()

    def maintain(self) -> dict[str, int]:
        """Drop days past each model's retention; merge a day's many small files of this shard."""
        self.last_maintained = time.time()
        removed = compacted = 0
        for model, days in self.retention_days.items():
            oldest = day_of(time.time() - days * 86400)
            self.index(model).drop_before(oldest)
            for kind in ("predictions", "labels"):
                for day in day_dirs(self.store, model, kind):
                    if day < oldest:
                        self.store.delete_dir(f"{MONITORING_DIR}/{model}/{kind}/day={day}")
                        removed += 1
                    else:
                        compacted += self._compact(model, kind, day)
        return {"removed_days": removed, "compacted_files": compacted}

    def _compact(self, model: str, kind: str, day: str) -> int:
        """Merge this shard's small files of a day into one (earlier merges stay as they are,
        so each row is rewritten once)."""
        paths = self._own_files(model, kind, day, small=True)
        if len(paths) < COMPACT_AFTER_FILES:
            return 0
        tables = [t for t in (read_parquet(self.store, p) for p in paths) if t is not None]
        merged = pa.concat_tables(tables)
        if kind == "predictions":
            merged = first_by_id(merged)
        name = f"s{self.shard}-{time.time_ns()}{COMPACTED}"
        # The merged file is published before the parts go: a crash in between leaves rows
        # twice, which readers drop by id, never zero times.
        self.store.publish(
            f"{MONITORING_DIR}/{model}/{kind}/day={day}/{name}", parquet_bytes(merged)
        )
        for path in paths:
            self.store.delete_file(path)
        return len(paths)

    def ping(self) -> int:
        return self.shard


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class FeedbackStore(FeedbackService):
    """One shard of the prediction log as a named, detached Ray actor (restarted when killed).

    Shard 0 also sets the windowed Prometheus gauges once a minute (actors/monitor.py).
    """

    def __init__(
        self,
        storage_uri: str,
        shard: int = 0,
        num_shards: int = 1,
        index_max_ids: int = INDEX_MAX_IDS,
    ) -> None:
        super().__init__(storage_uri, shard, num_shards, index_max_ids)
        self._stop = threading.Event()
        if shard == 0:
            from kiln.actors.monitor import run_gauges

            threading.Thread(
                target=run_gauges, args=(storage_uri, self._stop), daemon=True, name="gauges"
            ).start()


def store_name(storage_uri: str, shard: int) -> str:
    """Named per storage root, so two Kilns on one Ray (two test runs) keep apart."""
    digest = hashlib.sha256(storage_uri.encode()).hexdigest()[:8]
    return f"kiln-feedback-{digest}-{shard}"


def feedback_stores(
    storage_uri: str, num_shards: int, index_max_ids: int = INDEX_MAX_IDS
) -> list[Any]:
    """The FeedbackStore actors of this storage root, created where missing.

    Detached, so they outlive the replica or command that first asked for them (on the
    embedded Ray they end with it). The first to create a shard sets its index bound.
    """
    handles = []
    for shard in range(num_shards):
        handles.append(
            FeedbackStore.options(  # type: ignore[attr-defined]
                name=store_name(storage_uri, shard),
                namespace=NAMESPACE,
                get_if_exists=True,
                lifetime="detached",
            ).remote(storage_uri, shard, num_shards, index_max_ids)
        )
    return handles


# -- reading (no actor: every shard's files straight from storage) ------------------------------


def day_dirs(store: ArtifactStore, model: str, kind: str) -> list[str]:
    folders = store.list_dirs(f"{MONITORING_DIR}/{model}/{kind}")
    return [f.removeprefix("day=") for f in folders if f.startswith("day=")]


def read_parquet(
    store: ArtifactStore, path: str, columns: list[str] | None = None
) -> pa.Table | None:
    """A published file; None (with a warning) for one that cannot be read."""
    try:
        return pq.read_table(io.BytesIO(store.read(path)), columns=columns)
    except Exception as exc:  # a file cut short by a crash on a filesystem without rename
        logger.warning("skipping unreadable monitoring file %s: %s", path, exc)
        return None


def read_kind(
    store: ArtifactStore,
    model: str,
    kind: str,
    since_ts: float,
    columns: list[str] | None = None,
) -> list[pa.Table]:
    first_day = day_of(since_ts)
    tables = []
    for day in day_dirs(store, model, kind):
        if day < first_day:
            continue
        folder = f"{MONITORING_DIR}/{model}/{kind}/day={day}"
        for name in store.list_files(folder):
            if name.endswith(".parquet"):
                table = read_parquet(store, f"{folder}/{name}", columns)
                if table is not None:
                    tables.append(table)
    return tables


def first_by_id(table: pa.Table) -> pa.Table:
    """One row per id (the first), for rows a retried flush or a crashed compaction repeated."""
    ids = table.column("id").to_numpy(zero_copy_only=False)
    _, first = np.unique(ids, return_index=True)
    return table.take(pa.array(np.sort(first), pa.int64()))


def latest_labels(tables: list[pa.Table]) -> dict[str, str]:
    """id -> its latest label."""
    if not tables:
        return {}
    labels = pa.concat_tables(tables).sort_by("ts")
    return dict(
        zip(labels.column("id").to_pylist(), labels.column("label").to_pylist(), strict=True)
    )


def read_window(
    storage_uri: str,
    model: str,
    since_ts: float,
    until_ts: float | None = None,
    with_inputs: bool = True,
    schema: pa.Schema = PREDICTION_SCHEMA,
) -> pa.Table:
    """The logged rows of `model` in [since_ts, until_ts), one per id, each with its latest
    label (null when none). Labels may come any time after their prediction. A language
    model's rows are read with `schema=TEXT_PREDICTION_SCHEMA` (`with_inputs` False leaves
    out the inputs, or the texts)."""
    store = ArtifactStore(storage_uri)
    left_out = ("inputs",) + TEXT_COLUMNS
    columns = [f.name for f in schema if with_inputs or f.name not in left_out]
    tables = read_kind(store, model, "predictions", since_ts, columns)
    schema = pa.schema([schema.field(c) for c in columns])
    if not tables:
        return schema.empty_table().append_column("label", pa.array([], pa.string()))
    table = pa.concat_tables(tables)
    until = until_ts if until_ts is not None else float("inf")
    ts = table.column("ts").to_numpy()
    table = first_by_id(table.filter(pa.array((ts >= since_ts) & (ts < until))))
    labels = latest_labels(read_kind(store, model, "labels", since_ts))
    column = [labels.get(row_id) for row_id in table.column("id").to_pylist()]
    return table.append_column("label", pa.array(column, pa.string()))


def read_usage(storage_uri: str, since_ts: float) -> pa.Table:
    """Replica usage rows that end after `since_ts`."""
    store = ArtifactStore(storage_uri)
    tables = read_kind(store, USAGE_MODEL, "usage", since_ts - 86400)
    if not tables:
        return USAGE_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    return table.filter(pa.array(table.column("end_ts").to_numpy() > since_ts))
