"""serving/metrics.py adds the request counts up and hands them to Ray's counter in one call
per (model, version, status) a second. Ray's metrics API without a cluster; no Serve."""

from __future__ import annotations

import asyncio

from kiln.serving import metrics as metrics_module
from kiln.serving.metrics import ServingMetrics


def test_request_counts_reach_the_counter_added_up_within_the_flush_period(monkeypatch):
    monkeypatch.setattr(metrics_module, "COUNT_FLUSH_S", 0.05)
    recorded = ServingMetrics()
    calls: list[tuple[float, dict[str, str]]] = []
    monkeypatch.setattr(recorded.requests, "inc", lambda n, tags: calls.append((n, tags)))

    async def traffic() -> None:
        for _ in range(5):
            recorded.record("m", 3, 200, 1.0, 1)
        recorded.record("m", 3, 422, 1.0, 0)
        assert calls == []  # nothing handed over on the request path
        deadline = asyncio.get_running_loop().time() + 5
        while len(calls) < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    asyncio.run(traffic())
    assert sorted(calls, key=lambda c: c[1]["status"]) == [
        (5, {"model": "m", "version": "3", "status": "200"}),
        (1, {"model": "m", "version": "3", "status": "422"}),
    ]


def test_without_an_event_loop_a_request_is_counted_at_once(monkeypatch):
    recorded = ServingMetrics()
    calls: list[tuple[float, dict[str, str]]] = []
    monkeypatch.setattr(recorded.requests, "inc", lambda n, tags: calls.append((n, tags)))
    recorded.record("m", 1, 503, 1.0, 0)
    assert calls == [(1, {"model": "m", "version": "1", "status": "503"})]
