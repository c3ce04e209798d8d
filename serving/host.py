"""The model host of a Kiln replica: loaded versions, routing, rate limits and batching.

Plain Python without FastAPI, so the HTTP side (serving/routes/, serving/dependencies.py) stays
thin and this part can be read and tested on its own. The Serve deployment (serving/app.py)
owns one `ModelHost`; Serve's `reconfigure` and `check_health` hooks call straight through to
it. A request it cannot serve raises `RequestError` with the HTTP status the routes answer with.

Each served model version has its own batch queue (`BatchQueue`), with the `max_batch_size` and
`batch_wait_timeout_s` chosen from its latency profile when the replica loads it
(serving/batching.py), or given by the user.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from pydantic import TypeAdapter, ValidationError

from kiln.actors.catalog import VersionRecord
from kiln.actors.feedback import feedback_stores
from kiln.actors.keys import KeyCheck
from kiln.actors.replica import SMALL_ROWS, ModelReplica
from kiln.serving.batching import Batching, BatchQueue, profile_forward, resolve_batching
from kiln.serving.errors import actor_failure
from kiln.serving.inputs import rows_to_inputs
from kiln.serving.jsonbody import shown
from kiln.serving.logmask import LogMask, LogPolicy, input_fields
from kiln.serving.metrics import ServingMetrics
from kiln.serving.predlog import Logged, PredictionLog
from kiln.serving.ratelimit import RateLimiter
from kiln.serving.routing import Router
from kiln.serving.schemas import (
    BatchingInfo,
    InputInfo,
    ModelInfo,
    PredictRequest,
    RequestError,
    ServeArgs,
)
from kiln.training.errors import KilnError
from kiln.training.tabular import CATEGORICAL

logger = logging.getLogger(__name__)

# A request whose forward pass is expected to take less than this skips the batch queue when
# no batch is running: batching cannot save more than the queue's own overhead then.
INLINE_FORWARD_S = 0.0005


@dataclass(frozen=True)
class Served:
    """What one replica serves now; rebuilt whole and swapped in by `reconfigure`."""

    replicas: dict[str, ModelReplica]
    router: Router
    language: dict[str, Any] = field(default_factory=dict)
    """Language-model versions (serving/language.py `LanguageReplica`), by `name@version`:
    they answer the OpenAI routes, not predict."""


@dataclass
class BatchItem:
    """One request's rows on their way through the batch queue."""

    model_key: str
    x: np.ndarray  # (N, num_inputs) float32
    replica: ModelReplica
    """The version the request was routed to: a reconfigure that swaps the routing table
    while it waits in the queue (a promote, a rollback) does not take it away."""
    batch_rows: int = 0
    """Rows of the forward pass that carried this request (set by the batcher)."""


forward_rows: ContextVar[int] = ContextVar("forward_rows", default=0)
"""Rows of the forward pass that answered the current request (the prediction log's batch
size): set by `ModelHost.forward` in the request's own task."""


def status_of(exc: BaseException) -> int:
    """The HTTP status a route's exception answers with (serving/errors.py)."""
    for attribute in ("status", "status_code"):
        value = getattr(exc, attribute, None)
        if isinstance(value, int):
            return value
    return 422 if type(exc).__name__ == "RequestValidationError" else 500


@contextmanager
def logged_failures(host: ModelHost, key: str, request_id: str, started: float) -> Iterator[None]:
    """Log a request that fails inside the block with the status it answers with."""
    try:
        yield
    except Exception as exc:
        host.log_request(key, request_id, started, status=status_of(exc))
        raise


def assigned_gpus() -> float:
    """The GPU share Ray gave this process (0 outside Ray, and in a driver: an app served
    in-process, as the fuzz and the console tests do, asks from the test's own process)."""
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return 0.0
    return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))


def computes_on_this_thread(replica: ModelReplica) -> bool:
    """Whether a forward pass runs wholly on the calling thread (CPU, one thread)."""
    if torch.get_num_threads() != 1 or replica.device.type != "cpu":
        return False
    return replica.onnx is None or all(p.startswith("CPU") for p in replica.onnx.providers)


def runs_inline(replica: ModelReplica, rows: int) -> bool:
    """Whether a forward pass of `rows` rows is cheap enough to block the event loop for."""
    return rows <= SMALL_ROWS and replica.small_forward_s < INLINE_FORWARD_S


def runs_at_once(
    batching: Batching, replica: ModelReplica, rows: int, in_flight: Callable[[], int] | None
) -> bool:
    """Whether a request's forward pass skips the batch queue (ModelHost.forward): no batch
    wait asked for, a cheap pass, and no other request in flight (`in_flight` None: the
    server does not say, and a cheap pass always runs at once)."""
    return (
        batching.batch_wait_timeout_s == 0
        and runs_inline(replica, rows)
        and (in_flight is None or in_flight() <= 1)
    )


def parse_rows(
    body: PredictRequest, replica: ModelReplica, max_instances: int, booleans: bool = True
) -> np.ndarray:
    """The instances as raw inputs (N, num_inputs) float32, or a 422 that says what to send.

    A model trained on a table (`replica.encoding`) takes objects of values by input name or
    rows of values in input order; a model without inputs takes rows of num_features numbers.
    JSON booleans are not numbers; `booleans` False (the body holds no `true`/`false`) lets
    the number paths skip looking for them.
    """
    return parse_instances(body.instances, replica, max_instances, booleans)


def parse_instances(
    instances: list[Any], replica: ModelReplica, max_instances: int, booleans: bool = True
) -> np.ndarray:
    """`parse_rows` on the instances already taken out of the body (serving/lean.py)."""
    width = replica.num_inputs
    if not instances and replica.encoding is not None:
        raise RequestError(
            422,
            "instances is empty; send one or more objects of values by input name (the "
            f"model's metadata lists its inputs) or rows of {width} values",
        )
    if not instances:
        raise RequestError(422, f"instances is empty; send shape [N, {width}] with N >= 1")
    if len(instances) > max_instances:
        raise RequestError(
            422, f"got {len(instances)} instances; at most {max_instances} per request"
        )
    if replica.encoding is not None:
        return rows_to_inputs(replica.encoding, instances, booleans)
    return numeric_rows(instances, width, booleans)


_NUMBER_ROWS = TypeAdapter(list[list[float]])
"""How V1 read the rows of a model without inputs before instances could be objects."""


def numeric_rows(instances: list[Any], num_features: int, booleans: bool = True) -> np.ndarray:
    """Rows of num_features finite numbers (a model without inputs) as (N, F) float32."""
    if booleans:
        for i, row in enumerate(instances):
            if isinstance(row, list) and any(type(v) is bool for v in row):
                raise RequestError(
                    422, f"instance {i} holds a boolean; send numbers (JSON true is not 1)"
                )
    x = _number_array(instances, num_features)
    if x is None:
        for i, row in enumerate(instances):
            if not isinstance(row, list):
                raise RequestError(
                    422,
                    f"instance {i} is not a list; this model takes rows of {num_features} "
                    f"numbers (instances of shape [N, {num_features}])",
                )
        try:
            rows = _NUMBER_ROWS.validate_python(instances)
        except ValidationError as exc:  # as the list[list[float]] schema answered
            first = exc.errors()[0]
            where = ".".join(str(p) for p in ("instances", *first["loc"]))
            raise RequestError(422, f"{where}: {first['msg']}") from exc
        for i, row in enumerate(rows):
            if len(row) != num_features:
                raise RequestError(
                    422,
                    f"instances must have shape [N, {num_features}]; "
                    f"instance {i} has {len(row)} values",
                )
        x = np.asarray(rows, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x))[0][0])
        raise RequestError(422, f"instance {bad} holds NaN or Inf; send finite numbers only")
    return x


def _number_array(instances: list[Any], num_features: int) -> np.ndarray | None:
    """Rows of plain numbers of the right length in one numpy conversion (the common case);
    None for anything else, which `numeric_rows` reads value by value to say what is wrong.
    (Converting to float32 at once is faster still, but reads strings and None as numbers.)"""
    try:
        array = np.asarray(instances)
    except (ValueError, TypeError, OverflowError):  # ragged rows, say
        return None
    if array.dtype.kind not in "fi" or array.shape != (len(instances), num_features):
        return None
    return array.astype(np.float32)


def resolve_served(
    registry: Any,
    args: ServeArgs,
    loaded: dict[str, ModelReplica],
    loaded_language: dict[str, Any] | None = None,
) -> Served:
    """Resolve every reference through the registry now and load what is not loaded yet."""
    loaded_language = loaded_language or {}
    refs = list(args.models) + [c.ref for c in args.canary.values()]
    records: list[VersionRecord] = ray.get([registry.resolve.remote(ref) for ref in refs])
    storage_uri = str(ray.get(registry.get_storage_uri.remote()))
    replicas: dict[str, ModelReplica] = {}
    language: dict[str, Any] = {}
    for record in records:
        if record.spec.get("kind") == "lm":
            language[record.ref] = loaded_language.get(record.ref) or load_language(
                record, storage_uri, args
            )
            continue
        replicas[record.ref] = loaded.get(record.ref) or ModelReplica(
            record, storage_uri, args.gpu, args.backend, args.num_cpus
        )
    router = Router()
    names = sorted({r.name for r in records})
    alias_maps = dict(zip(names, ray.get([registry.aliases.remote(n) for n in names]), strict=True))
    for ref, record in zip(refs[: len(args.models)], records, strict=False):
        selector = ref.partition("@")[2]
        # Every alias the registry has for this version answers too, not just the one named.
        aliases = {a for a, v in alias_maps[record.name].items() if v == record.version}
        if selector and not selector.isdigit():
            aliases.add(selector)
        router.add(record.ref, *sorted(aliases - {"canary"}), default=True)
    for (name, canary), record in zip(
        args.canary.items(), records[len(args.models) :], strict=True
    ):
        if name not in router.routes:
            raise KilnError(f"canary for {name!r}, which is not among the served models")
        router.add(record.ref, "canary", default=False)
        router.split(name, record.ref, canary.weight)
    for ref, replica in loaded_language.items():
        if ref not in language:
            replica.close()  # no longer served: its engine thread ends
    return Served(replicas, router, language)


def load_language(record: VersionRecord, storage_uri: str, args: ServeArgs) -> Any:
    """A language-model version with its continuous-batching engine (serving/language.py)."""
    from kiln.serving.engine import EngineConfig
    from kiln.serving.language import LanguageReplica

    config = EngineConfig(
        max_batch=args.lm_max_batch,
        kv_cache_tokens=args.kv_cache_tokens,
        max_waiting=args.lm_max_waiting,
    )
    return LanguageReplica(record, storage_uri, args.gpu, config, prometheus=args.metrics)


def input_infos(replica: ModelReplica) -> list[InputInfo] | None:
    """What V1 metadata says about a model's inputs (None for a model without inputs)."""
    if replica.encoding is None:
        return None
    return [
        InputInfo(
            name=c.name,
            kind=c.kind,  # type: ignore[arg-type]
            type=c.type,
            categories=list(c.categories) if c.kind == CATEGORICAL else None,
        )
        for c in replica.encoding.inputs
    ]


def log_mask_of(args: ServeArgs) -> LogMask:
    """The replica's LogMask; its secret from the args, KILN_LOG_MASK_KEY, or made here."""
    secret = args.log_mask_key or os.environ.get("KILN_LOG_MASK_KEY")
    wanted = args.log_mask or args.log_drop or args.log_mask_text
    if wanted and not secret:
        logger.warning("no log mask key given: masked values hash differently after a restart")
    key = bytes.fromhex(secret) if secret else os.urandom(32)
    return LogMask(key, frozenset(args.log_mask), frozenset(args.log_drop), text=args.log_mask_text)


class ModelHost:
    """Registered model versions on one replica, batched across requests."""

    def __init__(self, args: ServeArgs, registry: Any) -> None:
        # `args` holds every field; the live ones come again (and later) through reconfigure.
        self.args = args
        self.registry = registry
        self.limiter = RateLimiter(args.rate_limit_per_s, args.rate_limit_burst)
        self.served = Served({}, Router())
        self.log: PredictionLog | None = None
        """The prediction log (none without a registry: route tests; or with --log-sample 0)."""
        self.metrics: ServingMetrics | None = None
        """Prometheus metrics through Ray (none outside a Serve replica: route tests)."""
        if registry is not None and args.metrics:
            self.metrics = ServingMetrics()
        self.log_mask = log_mask_of(args)
        self.profiles: dict[str, dict[int, float]] = {}
        """Seconds per forward pass by batch size, per served version (timed at load)."""
        self.batching: dict[str, Batching] = {}
        """Each served version's batching (serving/batching.py), set by reconfigure."""
        self._batchers: dict[str, BatchQueue[BatchItem, np.ndarray]] = {}
        """Each served version's batch queue (made at its first batched request)."""
        self.requests_in_flight: Callable[[], int] | None = None
        """HTTP requests this replica has read and not yet answered, from the server that
        reads them (the direct ingress: serving/direct.py); None where none says."""
        self.more_requests_coming: Callable[[int], bool] | None = None
        """Given how many requests a batch queue holds, whether others in flight may join it
        (BatchQueue.more_coming); None where the server does not say."""
        if registry is not None and args.log_sample > 0:
            self.log = PredictionLog(
                self._feedback_stores,
                sample=args.log_sample,
                retention_days=args.log_retention_days,
                num_cpus=args.num_cpus,
                num_gpus=float(assigned_gpus()),
                on_drop=self.metrics.log_dropped.inc if self.metrics else None,
                served_models=self.served_model_names,
                masker=self.mask_logged,  # registry policies may come with any reconfigure
            )
        # The replica computes with the cores it reserves (Kiln's workers default to one
        # thread each): a replica with num_cpus=4 runs its forward passes on 4 threads (an
        # ONNX Runtime session gets as many intra-op threads: ModelReplica).
        torch.set_num_threads(max(1, int(args.num_cpus)))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live changes without a restart: served versions, canary split, batching, limits.

        New versions load before the swap; the new routing table replaces the old in one
        assignment, so requests in flight finish on the version they started with.
        """
        self.args = ServeArgs(**{**self.args.model_dump(), **user_config})
        self.served = resolve_served(
            self.registry, self.args, self.served.replicas, self.served.language
        )
        self.limiter = RateLimiter(self.args.rate_limit_per_s, self.args.rate_limit_burst)
        self.log_mask = self.log_mask.with_policies(self._log_policies())
        self.choose_batching()
        logger.info("serving %s", ", ".join(self.served.router.served()))

    def choose_batching(self) -> None:
        """Each served version's batching: its latency profile (timed once, when first served
        here) unless the user gave the values; logged, and applied to live batch queues."""
        batching: dict[str, Batching] = {}
        for key, replica in self.served.replicas.items():
            if key not in self.profiles:
                # One compute thread on the CPU: its CPU time, which others' work on the host
                # moves little. A GPU's time is not the thread's: wall time there.
                clock = time.thread_time if computes_on_this_thread(replica) else time.perf_counter
                self.profiles[key] = profile_forward(
                    replica.forward, replica.num_inputs, clock=clock
                )
            batching[key] = resolve_batching(
                self.profiles[key], self.args.max_batch_size, self.args.batch_wait_timeout_s
            )
            logger.info("batching %s: %s", key, batching[key].describe())
            batcher = self._batchers.get(key)
            if batcher is not None:
                batcher.set_max_batch_size(batching[key].max_batch_size)
                batcher.set_batch_wait_timeout_s(batching[key].batch_wait_timeout_s)
        self.batching = batching

    def batching_of(self, key: str) -> Batching:
        """The batching of a served version (the user's values or the defaults before the
        first reconfigure: route tests set `served` directly)."""
        found = self.batching.get(key)
        if found is None:
            found = resolve_batching(None, self.args.max_batch_size, self.args.batch_wait_timeout_s)
        return found

    def _log_policies(self) -> dict[str, LogPolicy]:
        """The registry's log policy of each served model (`kiln models log-policy`), read at
        every start and reconfigure: a changed policy applies from the next deploy on."""
        if self.registry is None:
            return {}
        names = self.served_model_names()
        policies = ray.get(self.registry.log_policies.remote(names))
        return {name: LogPolicy.from_dict(p) for name, p in policies.items()}

    def _feedback_stores(self) -> list[Any]:
        storage_uri = str(ray.get(self.registry.get_storage_uri.remote()))
        return feedback_stores(storage_uri, self.args.feedback_shards, self.args.feedback_index_ids)

    def log_request(
        self,
        key: str,
        request_id: str,
        started: float,
        x: np.ndarray | None = None,
        outputs: np.ndarray | None = None,
        status: int = 200,
    ) -> None:
        """Count a served request (or a failed one: no x) in the metrics, and buffer it in
        the prediction log if sampled."""
        replica = self.served.replicas.get(key)
        if replica is None:
            return
        latency_ms = (time.perf_counter() - started) * 1000.0
        record = replica.record
        if self.metrics is not None:
            self.metrics.record(record.name, record.version, status, latency_ms)
        log = self.log
        if log is None or not log.sampled():
            return
        # The predictions are computed at the flush, for every logged request at once.
        log.record(
            Logged(
                record.name,
                record.version,
                request_id,
                time.time(),
                status,
                latency_ms,
                forward_rows.get() if x is not None else 0,
                x,
                None,
                outputs if x is not None else None,
                replica.spec,
            )
        )

    def mask_logged(self, item: Any) -> Any:
        """`item` as --log-mask/--log-drop/--log-mask-text and the model's registry policy
        want it in the log."""
        if not self.log_mask.active:
            return item
        if hasattr(item, "x") and not self.log_mask.knows(item.model, item.version):
            names = next(
                (
                    input_fields(r.record.spec) or []
                    for r in self.served.replicas.values()
                    if r.record.name == item.model and r.record.version == item.version
                ),
                [],
            )
            self.log_mask = self.log_mask.for_model(item.model, item.version, names)
        return self.log_mask.apply(item)

    def served_model_names(self) -> list[str]:
        """The names this replica serves, language models included (its usage rows: cost)."""
        served = self.served
        replicas = [*served.replicas.values(), *served.language.values()]
        return sorted({r.record.name for r in replicas})

    def check_health(self) -> None:
        """Raises unless every loaded model can run a forward pass. Also starts the prediction
        log's loop, so an idle replica reports its alive time (its cost) before any request."""
        for replica in self.served.replicas.values():
            replica.forward(np.zeros((1, replica.num_inputs), dtype=np.float32))
        for language in self.served.language.values():
            language.check_health()
        if self.log is not None:
            try:
                self.log.start()
            except (
                RuntimeError
            ):  # no event loop running in this thread: the first request starts it
                pass

    async def verify_key(self, secret: str) -> KeyCheck:
        """The registry's verdict on an API key; 503 while the registry cannot answer."""
        try:
            return await self.registry.verify_key.remote(secret)
        except ray.exceptions.RayError as exc:
            raise actor_failure(exc, "the key registry") from exc

    def replica_for(self, name: str, sticky_key: str | None = None) -> tuple[str, ModelReplica]:
        """The version that answers `name` (a sticky key keeps a caller on one side of a split)."""
        served = self.served  # one read: a concurrent reconfigure cannot split this lookup
        key = served.router.pick(name, sticky_key)
        if key is None:
            raise RequestError(
                404,
                f"model {shown(name)} is not served here; served: "
                f"{', '.join(served.router.served())}",
            )
        if key in served.language:
            raise RequestError(
                400,
                f"model {shown(name)} is a language model: use POST /v1/completions or "
                "/v1/chat/completions",
            )
        return key, served.replicas[key]

    def serves_language_model(self, name: str) -> bool:
        served = self.served
        return served.router.pick(name) in served.language

    def language_for(self, name: str) -> Any:
        """The language-model version that answers `name` (404 when none is served)."""
        served = self.served
        key = served.router.pick(name)
        if key is None or key not in served.language:
            found = sorted({r.record.name for r in served.language.values()})
            raise RequestError(
                404,
                f"The model {shown(name)} does not exist here; served language models: "
                f"{', '.join(found) or 'none'}",
            )
        return served.language[key]

    def info(self, key: str) -> ModelInfo:
        replica = self.served.replicas[key]
        record, spec = replica.record, replica.spec
        return ModelInfo(
            name=record.name,
            version=record.version,
            task=spec["task"],
            kind=spec["kind"],
            num_features=spec["num_features"],
            classes=spec.get("classes"),
            inputs=input_infos(replica),
            label=spec.get("label"),
            metrics={k: v for k, v in record.metrics.items() if k != "history"},
            aliases=self.served.router.aliases_of(key),
            backend=replica.backend,  # type: ignore[arg-type]
            batching=BatchingInfo(**self.batching_of(key).to_dict()),
        )

    async def forward(self, key: str, x: np.ndarray) -> np.ndarray:
        """Outputs for x: at once for a cheap pass on an idle replica, else through the batcher.

        A cheap forward pass (a small model, a few rows) costs less than the batch queue's
        hand-offs, so when no batch wait is asked for and no other request is in flight it
        runs at once. Everything else goes through its `BatchQueue`: with no wait for a batch to
        fill (the default), a batch holds the requests that arrived while the previous one
        ran, as in Triton's dynamic batcher.

        "No other request in flight" is the server's count, not a guess: a request's task
        runs from its first byte to its forward pass without yielding, so the requests read
        in the same turn of the loop have not reached this method yet. Running them inline
        one by one under load (what the replica did before) gave 1-row passes at 220 us of
        replica CPU a request against 48-row batches at 130 (light model, c64: 4,500 against
        7,800 requests/s), and which of the two a run settled in was chance.
        """
        replica = self.served.replicas[key]
        batching = self.batching.get(key) or self.batching_of(key)
        if runs_at_once(batching, replica, len(x), self.requests_in_flight):
            forward_rows.set(len(x))
            outputs = replica.forward(x)
            if self.metrics is not None:
                self.metrics.forward_pass(replica.record.name, replica.record.version, len(x))
            return outputs
        item = BatchItem(key, x, replica)
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = self._batchers[key] = BatchQueue(
                self._forward_batch,
                batching.max_batch_size,
                batching.batch_wait_timeout_s,
                self.more_requests_coming,
            )
        outputs = await batcher.submit(item)
        forward_rows.set(item.batch_rows)
        return outputs

    def _forward_batch(self, items: list[BatchItem]) -> list[np.ndarray]:
        """One forward pass per model over every row of the batch, split back per request.

        The pass runs on the event loop, on purpose: a batcher forms the next batch as
        soon as this one starts, so a pass on a worker thread left the loop free to cut many
        small batches (measured: a third of the throughput). Blocking here lets the requests
        that arrive meanwhile queue up and go through together in the next batch.
        """
        outputs: list[np.ndarray | None] = [None] * len(items)
        for key in {item.model_key for item in items}:
            members = [i for i, item in enumerate(items) if item.model_key == key]
            x = np.concatenate([items[i].x for i in members])
            # The version each request was routed to, even if a reconfigure has since
            # dropped it from the routing table (it answered 500, a KeyError, before).
            replica = items[members[0]].replica
            out = replica.forward(x)
            if self.metrics is not None:
                self.metrics.forward_pass(replica.record.name, replica.record.version, len(x))
            for i in members:
                items[i].batch_rows = len(x)
            offsets = np.cumsum([0] + [len(items[i].x) for i in members])
            for j, i in enumerate(members):
                outputs[i] = out[offsets[j] : offsets[j + 1]]
        return outputs  # type: ignore[return-value]
