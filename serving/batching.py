"""Dynamic batching per model, chosen from the model's own latency profile.

When a replica loads a model version it times a few forward passes at 1, 2, 4, ... rows
(`profile_forward`, bounded in time: a fraction of a second for a small model) and picks
(`choose_batching`):
  - `max_batch_size`: where the time per row stops falling: the smallest batch whose time per
    row is within `MIN_GAIN` of the least the profile found (a larger batch only adds latency
    to the requests in it). A pass that fails (out of memory, say) ends the profile, so the
    choice stays below it;
  - `batch_wait_timeout_s`: 0 for an overhead-bound model (a batch-1 pass under
    `OVERHEAD_BOUND_S`: waiting costs more than the pass, and an idle replica runs such a
    pass inline), and for a model that batching does not speed up by `MIN_GAIN` a row; else
    `WAIT_FRACTION` of a batch-1 pass, at most `MAX_WAIT_S`: a request waits at most that
    share of its own forward time for company.
The passes are timed on the clock the caller gives: the replica uses its thread's CPU time
when the model computes on one thread (others' work on a shared machine then moves the
profile little), wall time otherwise.
A value the user gives (`kiln serve --max-batch-size`, `--batch-wait-timeout-s`, ServeArgs)
wins over the profile. The choice is logged by the replica and shown by V1 metadata
(`GET /v1/models/{name}`: `batching`) and V2 `GET /v2/models/{name}/config`.

The batch size counts requests (`BatchQueue`); the profile counts rows: the choice assumes one
row per request, the online-serving case (a request of many rows is batched by its own size
already). Pure logic without Ray: the caller hands in the forward function and the clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

PROFILE_MAX_ROWS = 256
"""The largest batch the profile times (and so the largest it can choose)."""
PROFILE_BUDGET_S = 0.5
"""Seconds the profile may take in all; past it, no larger batch is timed."""
PROFILE_PASS_CAP_S = 0.1
"""A batch whose pass takes longer than this is the last one timed."""
PROFILE_REPEATS = 3
"""Timed passes per batch size (the fastest counts: on a shared machine others' work only
ever adds to a pass), after one untimed."""
MIN_GAIN = 0.10
"""A batch is worth its latency only where it cuts the time per row by this share."""
OVERHEAD_BOUND_S = 0.0005
"""A model whose batch-1 pass is faster than this is overhead-bound: no batch wait."""
WAIT_FRACTION = 0.25
"""The wait for a batch to fill, as a share of one batch-1 pass."""
MAX_WAIT_S = 0.02
DEFAULT_MAX_BATCH_SIZE = 64
"""Without a profile (it failed) and without a user value."""

Forward = Callable[[np.ndarray], Any]
Clock = Callable[[], float]
Item = TypeVar("Item")
Answer = TypeVar("Answer")


@dataclass(frozen=True)
class Batching:
    """A model's dynamic batching on this replica and where each value came from."""

    max_batch_size: int
    batch_wait_timeout_s: float
    source: str
    """"profile", "user", "profile+user" (one of each) or "default" (no profile)."""
    profile_ms: dict[int, float] | None = None
    """Milliseconds of one pass by batch size, as timed (the fastest of a few)."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.profile_ms is not None:
            out["profile_ms"] = {str(k): round(v, 4) for k, v in self.profile_ms.items()}
        return out

    def describe(self) -> str:
        wait_ms = self.batch_wait_timeout_s * 1000
        return f"max_batch_size {self.max_batch_size}, wait {wait_ms:.3g} ms ({self.source})"


def profile_forward(
    forward: Forward,
    num_inputs: int,
    max_rows: int = PROFILE_MAX_ROWS,
    budget_s: float = PROFILE_BUDGET_S,
    pass_cap_s: float = PROFILE_PASS_CAP_S,
    repeats: int = PROFILE_REPEATS,
    clock: Clock = time.perf_counter,
) -> dict[int, float]:
    """Seconds of one forward pass (the fastest of `repeats`) at 1, 2, 4, ... `max_rows` rows
    of zeros (valid raw input for every model: slot 0 of a categorical). Stops early past
    `budget_s` in all, after a batch whose pass took over `pass_cap_s`, or at a pass that
    fails (out of memory)."""
    started = clock()
    profile: dict[int, float] = {}
    rows = 1
    while rows <= max_rows:
        x = np.zeros((rows, num_inputs), dtype=np.float32)
        times = []
        try:
            forward(x)  # untimed: the first pass at a new shape allocates
            for _ in range(repeats):
                begun = clock()
                forward(x)
                times.append(clock() - begun)
        except Exception as exc:  # noqa: BLE001 (out of memory, say: the profile ends here)
            logger.info("batching profile stops at %d rows: %s", rows, exc)
            break
        profile[rows] = min(times)
        if profile[rows] > pass_cap_s or clock() - started > budget_s:
            break
        rows *= 2
    return profile


def choose_batching(
    profile: dict[int, float], max_rows: int = PROFILE_MAX_ROWS
) -> tuple[int, float]:
    """(max_batch_size, batch_wait_timeout_s) for a profile of seconds per pass by batch size
    (see the module docstring). An empty profile gives the defaults.

    The batch size is the smallest whose time per row is within MIN_GAIN of the least time
    per row of the profile (a per-row time that only falls by a few percent from 1 to 2 rows
    may still fall 6x by 64, as a cache-bound MLP's does). A profile cut short by its time
    bound while its last doubling still gained MIN_GAIN is extended along the line through
    its last two points (a fixed cost plus a cost per row)."""
    if not profile:
        return DEFAULT_MAX_BATCH_SIZE, 0.0
    sizes = sorted(profile)
    per_row = {b: profile[b] / b for b in sizes}
    least = min(per_row.values())
    chosen = next(b for b in sizes if per_row[b] <= (1 + MIN_GAIN) * least)
    last = sizes[-1]
    if chosen == last and len(sizes) >= 2 and last < max_rows:
        before = sizes[-2]
        if per_row[last] <= (1 - MIN_GAIN) * per_row[before]:  # still gaining at the end
            chosen = extrapolated(profile, before, last, max_rows)
    single = per_row[sizes[0]]
    pays = per_row[min(chosen, last)] <= (1 - MIN_GAIN) * single
    if not pays or profile[sizes[0]] < OVERHEAD_BOUND_S:
        return chosen, 0.0
    return chosen, min(MAX_WAIT_S, WAIT_FRACTION * profile[sizes[0]])


def extrapolated(profile: dict[int, float], smaller: int, larger: int, max_rows: int) -> int:
    """The batch size where the line through two profile points stops gaining MIN_GAIN per
    doubling (a power of two, at least `larger`, at most `max_rows`)."""
    per_row = (profile[larger] - profile[smaller]) / (larger - smaller)
    fixed = profile[larger] - per_row * larger
    if per_row <= 0 or fixed <= 0:  # noise: a pass no slower with more rows
        return max(larger, min(DEFAULT_MAX_BATCH_SIZE, max_rows))
    knee = fixed / per_row * (1 - 2 * MIN_GAIN) / (2 * MIN_GAIN)
    size = larger
    while size * 2 <= min(knee, max_rows):
        size *= 2
    return size


def resolve_batching(
    profile: dict[int, float] | None,
    user_max_batch_size: int | None,
    user_wait_s: float | None,
) -> Batching:
    """The batching a model gets: the user's values where given, the profile's otherwise."""
    chosen_size, chosen_wait = choose_batching(profile or {})
    from_profile = bool(profile)
    size = user_max_batch_size if user_max_batch_size is not None else chosen_size
    wait = user_wait_s if user_wait_s is not None else chosen_wait
    user = (user_max_batch_size is not None, user_wait_s is not None)
    if all(user):
        source = "user"
    elif any(user):
        source = "profile+user" if from_profile else "user"
    else:
        source = "profile" if from_profile else "default"
    profile_ms = {k: v * 1000 for k, v in profile.items()} if profile else None
    return Batching(size, wait, source, profile_ms)


class BatchQueue(Generic[Item, Answer]):
    """One served version's dynamic batcher, on the replica's event loop.

    `submit(item)` queues a request and waits for its answer. A task takes the requests
    queued when it runs, at most `max_batch_size`; with a wait it first gives the batch up
    to `batch_wait_timeout_s` from its oldest request to fill. `run` (synchronous: one
    forward pass for the whole batch) runs on the loop itself, so requests that arrive
    meanwhile queue up and form the next batch, as in Triton's dynamic batcher. An error
    in `run` is every caller's; a caller that went away (cancelled) is left out. The task
    ends when the queue is empty and the next request starts another.

    This is what `@serve.batch` did here, without its per-request costs: Ray 2.60 works out
    the batched function's signature with `inspect` for every request and copies Serve's
    request and trace contexts into each, 8-10% of the light model's replica CPU at c64
    (py-spy, docs/design-notes.md). Both values can change live (`reconfigure`).
    """

    def __init__(
        self,
        run: Callable[[list[Item]], list[Answer]],
        max_batch_size: int,
        batch_wait_timeout_s: float,
        more_coming: Callable[[int], bool] | None = None,
    ) -> None:
        self.run = run
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.more_coming = more_coming
        """Given how many requests are queued, whether the server has others in flight that
        may still join the batch (None: it does not say, and a batch waits as configured).
        A lone request after a lone pass (one caller at a time, c1) does not wait out the
        timer for a batch that cannot fill: the medium model's c1 p50 fell from 5.9-6.8 to
        3.9-4.4 ms. Under load (the last pass had several requests) a batch waits as
        configured: the callers just answered send their next requests during the wait,
        which the server has not read yet."""
        self._last_pass = 0
        """Requests in the last pass."""
        self._queued: deque[tuple[Item, asyncio.Future[Answer], float]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._filling: asyncio.Future[None] | None = None
        """Set while a batch waits to fill: resolved when it is full (or by its timer)."""

    def set_max_batch_size(self, size: int) -> None:
        self.max_batch_size = size

    def set_batch_wait_timeout_s(self, seconds: float) -> None:
        self.batch_wait_timeout_s = seconds

    async def submit(self, item: Item) -> Answer:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Answer] = loop.create_future()
        self._queued.append((item, answer, loop.time()))
        if self._task is None:
            self._task = loop.create_task(self._serve())
        elif len(self._queued) >= self.max_batch_size or not self._others_may_join():
            _resolve(self._filling)
        return await answer

    def _others_may_join(self) -> bool:
        if self.more_coming is None or self._last_pass > 1:
            return True
        return self.more_coming(len(self._queued))

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queued:
                wait = self.batch_wait_timeout_s
                if wait > 0 and len(self._queued) < self.max_batch_size and self._others_may_join():
                    remaining = self._queued[0][2] + wait - loop.time()
                    if remaining > 0:
                        self._filling = loop.create_future()
                        timer = loop.call_later(remaining, _resolve, self._filling)
                        await self._filling
                        timer.cancel()
                        self._filling = None
                batch: list[tuple[Item, asyncio.Future[Answer]]] = []
                while self._queued and len(batch) < self.max_batch_size:
                    item, answer, _ = self._queued.popleft()
                    if not answer.done():
                        batch.append((item, answer))
                if batch:
                    self._last_pass = len(batch)
                    self._answer(batch)
                # One turn of the loop: the requests read meanwhile join the next batch.
                await asyncio.sleep(0)
        except asyncio.CancelledError:  # the replica is stopping: no caller waits forever
            while self._queued:
                self._queued.popleft()[1].cancel()
            raise
        finally:
            self._task = self._filling = None

    def _answer(self, batch: list[tuple[Item, asyncio.Future[Answer]]]) -> None:
        try:
            outputs = self.run([item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 (every caller of the batch gets the error)
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
            return
        for (_, answer), output in zip(batch, outputs, strict=True):
            if not answer.done():
                answer.set_result(output)


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)
