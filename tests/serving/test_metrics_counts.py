"""serving/metrics.py adds the request counts up and hands them to Ray's counter in one call
per (model, version, status) a second; latencies and forward passes are observed at that flush
too, every one of them. Ray's metrics API without a cluster; no Serve."""

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
            recorded.record("m", 3, 200, 1.0)
        recorded.record("m", 3, 422, 1.0)
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
    recorded.record("m", 1, 503, 1.0)
    assert calls == [(1, {"model": "m", "version": "1", "status": "503"})]


def test_every_answered_request_and_every_forward_pass_reaches_the_histograms(monkeypatch):
    """Nothing is lost by moving the observes to the flush: one latency per answered request,
    one rows value per forward pass (not per request), with their model and version."""
    monkeypatch.setattr(metrics_module, "COUNT_FLUSH_S", 0.05)
    recorded = ServingMetrics()
    latencies: list[tuple[float, dict[str, str]]] = []
    rows: list[tuple[float, dict[str, str]]] = []
    counts: list[tuple[float, dict[str, str]]] = []
    monkeypatch.setattr(recorded.latency, "observe", lambda v, tags: latencies.append((v, tags)))
    monkeypatch.setattr(recorded.batch_rows, "observe", lambda v, tags: rows.append((v, tags)))
    monkeypatch.setattr(recorded.requests, "inc", lambda n, tags: counts.append((n, tags)))

    async def traffic() -> None:
        recorded.forward_pass("m", 3, 3)  # one pass answered three requests
        for i in range(3):
            recorded.record("m", 3, 200, float(i))
        recorded.forward_pass("n", 1, 1)
        recorded.record("n", 1, 200, 7.0)
        recorded.record("n", 1, 422, 9.0)  # refused: counted, no latency observed
        assert latencies == rows == counts == []
        deadline = asyncio.get_running_loop().time() + 5
        while not counts and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    asyncio.run(traffic())
    m3, n1 = {"model": "m", "version": "3"}, {"model": "n", "version": "1"}
    assert sorted(latencies, key=lambda v: v[0]) == [(0.0, m3), (1.0, m3), (2.0, m3), (7.0, n1)]
    assert sorted(rows, key=lambda v: v[0]) == [(1, n1), (3, m3)]
    assert sum(n for n, _ in counts) == 5
