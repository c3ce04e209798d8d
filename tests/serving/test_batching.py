"""serving/batching.py: per-model batching chosen from a latency profile. Pure logic on
synthetic latency curves (no Ray, no model), and the profile's time bound with a fake clock."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.serving.batching import (
    DEFAULT_MAX_BATCH_SIZE,
    MAX_WAIT_S,
    WAIT_FRACTION,
    choose_batching,
    profile_forward,
    resolve_batching,
)

SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def curve(overhead_s: float, per_row_s: float, knee: int | None = None) -> dict[int, float]:
    """overhead + rows x per_row; past `knee` rows the per-row cost doubles (caches spill)."""
    out = {}
    for b in SIZES:
        rows_cost = per_row_s * b if knee is None or b <= knee else per_row_s * (2 * b - knee)
        out[b] = overhead_s + rows_cost
    return out


def test_an_overhead_bound_model_batches_wide_and_never_waits():
    # 60 us fixed, 0.1 us a row: the time per row keeps halving up to the largest batch timed.
    size, wait = choose_batching(curve(60e-6, 0.1e-6))
    assert size == 256 and wait == 0.0


def test_a_compute_bound_model_stops_where_the_time_per_row_stops_falling():
    # 0.2 ms fixed, 1 ms a row: 1.2 ms a row at batch 1, 1.1 at 2 (within 10% of the least,
    # 1.0008 at 256): batching gains 8% a row at most, not worth a wait.
    size, wait = choose_batching(curve(0.2e-3, 1e-3))
    assert size == 2 and wait == 0.0


def test_the_knee_of_the_curve_is_chosen_and_the_wait_is_a_share_of_one_pass():
    # 2 ms fixed, 0.05 ms a row until 32 rows, twice that past it.
    profile = curve(2e-3, 0.05e-3, knee=32)
    size, wait = choose_batching(profile)
    per_row = {b: t / b for b, t in profile.items()}
    least = min(per_row.values())
    assert per_row[size] <= 1.1 * least < per_row[size // 2]  # the first within 10% of best
    assert size == 64
    assert wait == pytest.approx(WAIT_FRACTION * profile[1])


def test_a_flat_start_does_not_hide_the_gain_of_larger_batches():
    # As the medium MLP's profile on one thread (ms): 1 -> 2 rows gains 3% a row, 64 rows 6x.
    profile_ms = {1: 4.0, 2: 7.8, 4: 12.1, 8: 13.5, 16: 17.9, 32: 27.1, 64: 40.3}
    size, wait = choose_batching({b: t / 1000 for b, t in profile_ms.items()})
    # Still gaining at 64 (0.85 -> 0.63 ms a row): extended along the line 13.9 ms + 0.41 ms
    # a row, which stops gaining 10% a doubling past 4 x 13.9 / 0.41 = 134 rows.
    assert size == 128
    assert wait == pytest.approx(WAIT_FRACTION * 4e-3)


def test_the_wait_is_capped_for_a_slow_model():
    size, wait = choose_batching(curve(0.5, 1e-3))  # half a second a pass
    assert size > 1 and wait == MAX_WAIT_S


def test_a_profile_cut_short_while_still_gaining_is_extended_along_its_line():
    # A slow model's profile stopped at 4 rows by its time bound: 2.5 ms fixed, 0.5 ms a row.
    # Past 4 x 2.5 / 0.5 = 20 rows a doubling gains under 10%: 16 is the last power of two.
    profile = {1: 3e-3, 2: 3.5e-3, 4: 4.5e-3}
    size, wait = choose_batching(profile)
    assert size == 16 and wait == pytest.approx(WAIT_FRACTION * 3e-3)
    # The light model's line (60 us + 0.1 us a row) gains up to the largest batch allowed.
    light = {b: t for b, t in curve(60e-6, 0.1e-6).items() if b <= 8}
    assert choose_batching(light) == (256, 0.0)
    assert choose_batching(light, max_rows=32) == (32, 0.0)
    # Noise (no slower with more rows) gives the default, never less than was timed.
    assert choose_batching({1: 1e-3, 2: 0.4e-3, 4: 0.4e-3, 8: 0.3e-3})[0] >= 8
    assert choose_batching({}) == (DEFAULT_MAX_BATCH_SIZE, 0.0)


def test_user_values_win_over_the_profile_one_at_a_time():
    profile = curve(2e-3, 0.05e-3, knee=32)
    chosen = resolve_batching(profile, None, None)
    assert chosen.source == "profile" and chosen.profile_ms is not None
    assert chosen.profile_ms[1] == pytest.approx(profile[1] * 1000)
    mixed = resolve_batching(profile, 8, None)
    assert (mixed.max_batch_size, mixed.batch_wait_timeout_s, mixed.source) == (
        8,
        chosen.batch_wait_timeout_s,
        "profile+user",
    )
    user = resolve_batching(profile, 4, 0.0)
    assert (user.max_batch_size, user.batch_wait_timeout_s, user.source) == (4, 0.0, "user")
    default = resolve_batching(None, None, None)
    assert (default.max_batch_size, default.batch_wait_timeout_s, default.source) == (
        DEFAULT_MAX_BATCH_SIZE,
        0.0,
        "default",
    )
    assert default.to_dict()["profile_ms"] is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_profile_times_doublings_until_its_budget_or_a_failing_pass():
    clock = FakeClock()
    shapes: list[tuple[int, int]] = []

    def forward(x: np.ndarray) -> np.ndarray:
        shapes.append(x.shape)
        clock.now += 1e-3 + 1e-4 * len(x)  # 1 ms + 0.1 ms a row
        if len(x) > 32:
            raise MemoryError("out of memory")
        return np.zeros((len(x), 2), dtype=np.float32)

    profile = profile_forward(forward, 5, budget_s=10.0, repeats=3, clock=clock)
    assert sorted(profile) == [1, 2, 4, 8, 16, 32]  # 64 failed: the profile ends below it
    assert profile[4] == pytest.approx(1.4e-3)
    assert all(shape[1] == 5 for shape in shapes)

    clock.now = 0.0
    short = profile_forward(forward, 5, budget_s=0.01, repeats=3, clock=clock)
    # 1 and 2 rows take 9.2 ms (4 passes each), 4 rows reach 14.8: past the 10 ms budget
    assert sorted(short) == [1, 2, 4]

    slow = profile_forward(forward, 5, pass_cap_s=1.5e-3, budget_s=10.0, repeats=1, clock=clock)
    assert sorted(slow) == [1, 2, 4, 8]  # the 8-row pass took 1.8 ms > the cap: last one


def test_the_profile_uses_the_thread_clock_only_where_the_pass_runs_on_the_thread(monkeypatch):
    from types import SimpleNamespace

    import torch

    from kiln.serving.host import computes_on_this_thread

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert computes_on_this_thread(SimpleNamespace(device=cpu, onnx=None))  # type: ignore[arg-type]
    onnx_cpu = SimpleNamespace(providers=["CPUExecutionProvider"])
    onnx_gpu = SimpleNamespace(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert computes_on_this_thread(SimpleNamespace(device=cpu, onnx=onnx_cpu))  # type: ignore[arg-type]
    assert not computes_on_this_thread(SimpleNamespace(device=cpu, onnx=onnx_gpu))  # type: ignore[arg-type]
    assert not computes_on_this_thread(SimpleNamespace(device=cuda, onnx=None))  # type: ignore[arg-type]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # other threads do part of it
    assert not computes_on_this_thread(SimpleNamespace(device=cpu, onnx=None))  # type: ignore[arg-type]


def test_a_cheap_pass_runs_at_once_only_when_no_other_request_is_in_flight():
    """ModelHost.forward's choice: one request alone skips the batch queue (c1 latency); with
    others in flight the pass joins a batch, whatever the model costs (a light model at c64
    otherwise ran 1-row passes at ~1.7x the CPU per request of 48-row batches)."""
    from types import SimpleNamespace

    from kiln.serving.batching import Batching
    from kiln.serving.host import runs_at_once

    cheap = SimpleNamespace(small_forward_s=0.0001)
    costly = SimpleNamespace(small_forward_s=0.01)
    no_wait = Batching(64, 0.0, "profile", {})
    waits = Batching(64, 0.002, "profile", {})
    alone, busy = (lambda: 1), (lambda: 7)
    assert runs_at_once(no_wait, cheap, 1, alone)
    assert runs_at_once(no_wait, cheap, 1, None)  # a server that does not say (Serve's own)
    assert not runs_at_once(no_wait, cheap, 1, busy)
    assert not runs_at_once(no_wait, costly, 1, alone)
    assert not runs_at_once(waits, cheap, 1, alone)
    assert not runs_at_once(no_wait, cheap, 10_000, alone)


class Recorder:
    """A batched function that records each batch and answers item * 10 (or raises)."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [i * 10 for i in items]


def test_requests_queued_together_go_in_one_pass_split_at_the_max_size():
    import asyncio

    from kiln.serving.batching import BatchQueue

    async def main() -> tuple[list[int], list[list[int]]]:
        run = Recorder()
        queue = BatchQueue(run, max_batch_size=4, batch_wait_timeout_s=0.0)
        answers = await asyncio.gather(*(queue.submit(i) for i in range(10)))
        return answers, run.batches

    answers, batches = asyncio.run(main())
    assert answers == [i * 10 for i in range(10)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_wait_lets_a_later_request_join_and_a_full_batch_does_not_wait():
    import asyncio

    from kiln.serving.batching import BatchQueue

    async def main() -> list[list[int]]:
        run = Recorder()
        queue = BatchQueue(run, max_batch_size=3, batch_wait_timeout_s=30.0)
        first = asyncio.ensure_future(queue.submit(1))
        await asyncio.sleep(0.01)
        assert not first.done()  # waiting for company, not answered alone
        # Two more fill the batch: answered at once, not after 30 s.
        rest = asyncio.gather(queue.submit(2), queue.submit(3))
        assert await asyncio.wait_for(asyncio.gather(first, rest), 10) == [10, [20, 30]]
        queue.set_batch_wait_timeout_s(0.0)  # live change: the next one goes alone
        assert await asyncio.wait_for(queue.submit(4), 10) == 40
        return run.batches

    assert asyncio.run(main()) == [[1, 2, 3], [4]]


def test_an_error_reaches_every_caller_of_its_batch_and_the_queue_goes_on():
    import asyncio

    from kiln.serving.batching import BatchQueue

    async def main() -> tuple[list[object], int]:
        queue = BatchQueue(Recorder(fail_on=2), max_batch_size=8, batch_wait_timeout_s=0.0)
        failed = await asyncio.gather(*(queue.submit(i) for i in (1, 2, 3)), return_exceptions=True)
        return failed, await queue.submit(5)

    failed, later = asyncio.run(main())
    assert all(isinstance(e, ValueError) and "bad item 2" in str(e) for e in failed)
    assert later == 50


def test_a_caller_that_went_away_is_left_out_of_the_pass():
    import asyncio

    from kiln.serving.batching import BatchQueue

    async def main() -> list[list[int]]:
        run = Recorder()
        queue = BatchQueue(run, max_batch_size=8, batch_wait_timeout_s=30.0)
        gone = asyncio.ensure_future(queue.submit(1))
        await asyncio.sleep(0.01)
        gone.cancel()
        queue.set_max_batch_size(1)  # the next request fills a batch and wakes the queue
        assert await asyncio.wait_for(queue.submit(2), 10) == 20
        return run.batches

    assert asyncio.run(main()) == [[2]]


def test_a_stopped_queue_cancels_its_waiting_callers():
    import asyncio

    from kiln.serving.batching import BatchQueue

    async def main() -> bool:
        queue = BatchQueue(Recorder(), max_batch_size=8, batch_wait_timeout_s=30.0)
        waiting = asyncio.ensure_future(queue.submit(1))
        await asyncio.sleep(0.01)
        assert queue._task is not None
        queue._task.cancel()
        await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), 10)
        return waiting.cancelled()

    assert asyncio.run(main())


def test_a_batch_waits_only_while_the_server_has_others_in_flight():
    """With a 30 s wait: a lone request (nothing else in flight) runs at once; with three in
    flight the batch waits for them and runs as soon as the third is queued, not at 30 s;
    after a pass of several, a lone request waits."""
    import asyncio

    from kiln.serving.batching import BatchQueue

    in_flight = [1]

    async def main() -> list[list[int]]:
        run = Recorder()
        queue = BatchQueue(
            run, max_batch_size=8, batch_wait_timeout_s=30.0, more_coming=lambda q: in_flight[0] > q
        )
        assert await asyncio.wait_for(queue.submit(1), 5) == 10  # c1: no wait at all
        in_flight[0] = 3
        first = asyncio.ensure_future(queue.submit(2))
        await asyncio.sleep(0.01)
        assert not first.done()  # two more are in flight: it waits for them
        second = asyncio.ensure_future(queue.submit(3))
        await asyncio.sleep(0.01)
        assert not second.done()
        answers = await asyncio.wait_for(asyncio.gather(first, queue.submit(4)), 5)
        assert answers == [20, 40] and await second == 30
        # Under load (the last pass held 3) a lone request waits as configured: the callers
        # just answered may be sending their next requests.
        in_flight[0] = 1
        queue.set_batch_wait_timeout_s(0.5)
        after_load = asyncio.ensure_future(queue.submit(5))
        await asyncio.sleep(0.05)
        assert not after_load.done()
        assert await asyncio.wait_for(after_load, 5) == 50
        assert await asyncio.wait_for(queue.submit(6), 0.4) == 60  # alone after alone: at once
        return run.batches

    assert asyncio.run(main()) == [[1], [2, 3, 4], [5], [6]]
