"""A language model's prediction log without Ray: rows per choice with the texts in their own
columns, feedback by the answer's id on the shard that holds it, the engine's latencies joined
in whichever order they come, labels checked, and the window report's numbers and cost."""

from __future__ import annotations

import asyncio
import json
import time

import pyarrow as pa
import pytest

from kiln.actors.feedback import (
    TEXT_COLUMNS,
    TEXT_PREDICTION_SCHEMA,
    USAGE_SCHEMA,
    FeedbackService,
    read_window,
    shard_of,
    table_to_ipc,
)
from kiln.actors.language_monitor import generation_traffic, language_report, score_of
from kiln.serving.engine import RequestMetrics
from kiln.serving.feedback import generation_row_ids, text_label_texts
from kiln.serving.language import FinishedRequests
from kiln.serving.predlog import LoggedText, PredictionLog, text_rows_table
from kiln.serving.schemas import RequestError


def generation(response_id: str, n: int = 1, version: int = 1, ts: float | None = None, **kw):
    return LoggedText(
        model="lm",
        version=version,
        response_id=response_id,
        ts=ts or time.time(),
        latency_ms=40.0,
        endpoint="completions",
        prompt="write to me at ann@example.com",
        completions=[f"answer {i}" for i in range(n)],
        finish_reasons=["length"] * n,
        prompt_tokens=5,
        completion_tokens=[4] * n,
        ttft_ms=kw.pop("ttft_ms", 10.0),
        inter_token_ms=kw.pop("inter_token_ms", [2.0, 3.0, 4.0]),
        queue_depth=kw.pop("queue_depth", 1),
        kv_cache_usage=kw.pop("kv_cache_usage", 0.25),
    )


def test_rows_per_choice_keep_the_texts_in_their_own_columns():
    table = text_rows_table([generation("cmpl-a", n=2), generation("cmpl-b")])
    assert table.schema == TEXT_PREDICTION_SCHEMA
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["cmpl-a-0", "cmpl-a-1", "cmpl-b-0"]
    assert [r["completion"] for r in rows] == ["answer 0", "answer 1", "answer 0"]
    # The request's figures once, on choice 0: sums over rows count each request once.
    assert [r["prompt_tokens"] for r in rows] == [5, None, 5]
    assert [r["ttft_ms"] for r in rows] == [10.0, None, 10.0]
    assert rows[1]["inter_token_ms"] is None and rows[0]["inter_token_ms"] == [2.0, 3.0, 4.0]
    # Free text lives in the named columns only (what a masking step reads).
    texts = {k for r in rows for k, v in r.items() if isinstance(v, str) and "@" in v}
    assert texts == {"prompt"} and set(TEXT_COLUMNS) == {"prompt", "completion"}


def test_feedback_finds_the_id_on_the_shard_the_flush_wrote_it_to(tmp_path):
    """Rows shard by their id as feedback does: `cmpl-x-0` by `cmpl-x`, never all by `cmpl`."""
    services = [FeedbackService(str(tmp_path), shard, 4) for shard in range(4)]

    class Store:
        def __init__(self, service: FeedbackService) -> None:
            self.service = service
            self.append = self

        async def remote(self, model, data, retention_days):
            return self.service.append(model, data, retention_days)

    log = PredictionLog(lambda: [Store(s) for s in services])
    log._task = object()  # flushed by hand
    ids = [f"cmpl-{i:032x}" for i in range(40)]
    for response_id in ids:
        log.record(generation(response_id))
    assert asyncio.run(log.flush()) == 40
    assert len({shard_of(f"{i}-0", 4) for i in ids}) > 1  # spread over the shards
    row_ids = generation_row_ids(ids)
    for row_id in row_ids:
        answer = services[shard_of(row_id, 4)].add_labels("lm", [row_id], ["1"])
        assert answer == {"accepted": 1, "unknown_ids": []}


def test_an_answers_id_names_its_first_choice():
    ids = ["cmpl-ab", "chatcmpl-cd", "chatcmpl-cd-1", "other", "cmpl-ab-0"]
    assert generation_row_ids(ids) == [
        "cmpl-ab-0",
        "chatcmpl-cd-0",
        "chatcmpl-cd-1",
        "other",
        "cmpl-ab-0",
    ]


def test_a_generations_label_is_a_score_a_text_a_boolean_or_an_object():
    labels = [4, "a better answer", True, {"score": 2, "text": "fixed"}]
    assert [json.loads(t) for t in text_label_texts(labels)] == labels
    for bad, fragment in ((None, "null"), ([1], "array"), ({"s": float("nan")}, "not finite")):
        with pytest.raises(RequestError) as caught:
            text_label_texts([1, bad])
        assert caught.value.status == 422 and "labels[1]" in str(caught.value)
        assert fragment in str(caught.value)
    with pytest.raises(RequestError, match="at most"):
        text_label_texts(["x" * 200_000])


@pytest.mark.parametrize("engine_first", [True, False])
def test_latencies_meet_the_route_in_either_order(engine_first):
    finished = FinishedRequests(kept=2)
    metrics = RequestMetrics(arrival_s=0.0, first_token_s=0.5)
    got: list[RequestMetrics] = []
    if engine_first:
        finished.add("r", metrics)
        finished.when_finished("r", got.append)
    else:
        finished.when_finished("r", got.append)
        assert got == []
        finished.add("r", metrics)
    assert got == [metrics] and not finished.waiting and "r" not in finished.finished
    for i in range(5):  # requests nobody asks about are not kept forever
        finished.add(f"x{i}", metrics)
    assert list(finished.finished) == ["x3", "x4"]


def test_the_window_report_counts_tokens_latencies_and_cost_per_output_token(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_PRICE_CPU_HOUR", "3.6")  # $0.001 a second for one CPU
    monkeypatch.setenv("KILN_PRICE_GPU_HOUR", "0")
    store = FeedbackService(str(tmp_path))
    now = time.time()
    items = [
        generation("cmpl-a", n=2, ts=now - 30, ttft_ms=10.0, inter_token_ms=[1.0, 1.0]),
        generation("cmpl-b", ts=now - 20, ttft_ms=30.0, inter_token_ms=[3.0], queue_depth=3),
        generation("cmpl-c", version=2, ts=now - 10),
    ]
    store.append("lm", table_to_ipc(text_rows_table(items)))
    store.add_labels("lm", ["cmpl-a-0", "cmpl-a-1", "cmpl-b-0"], ["4", '"fixed text"', "2"])
    usage = pa.table(
        {
            "replica": ["r1"],
            "start_ts": [now - 100],
            "end_ts": [now],
            "num_cpus": [1.0],
            "num_gpus": [0.0],
            "models": [["lm"]],
        },
        schema=USAGE_SCHEMA,
    )
    store.append_usage(table_to_ipc(usage))

    report = language_report(str(tmp_path), "lm", {}, 60, now=now)
    by_version = {v["version"]: v for v in report["versions"]}
    one = by_version[1]
    assert one["requests"] == 2 and one["prompt_tokens"] == 10
    assert one["completion_tokens"] == 12  # 4 per choice, three choices
    assert one["output_tokens_per_s"] == pytest.approx(12 / 60)
    assert one["time_to_first_token_ms"]["p50"] == pytest.approx(20.0)
    assert one["inter_token_latency_ms"]["p50"] == pytest.approx(1.0)
    assert one["queue_depth"] == {"mean": 2.0, "max": 3.0}
    assert one["feedback"] == {"labelled_rows": 3, "scored_rows": 2, "mean_score": 3.0}
    # The replica's minute in the window ($0.06) split by output tokens: 12 of 16 to v1.
    assert one["cost"]["usd"] == pytest.approx(0.06 * 12 / 16, rel=1e-6)
    assert one["cost"]["per_1000_output_tokens"] == pytest.approx(0.06 / 16 * 1000, rel=1e-6)
    # The texts are not read for the numbers (with_inputs False).
    window = read_window(str(tmp_path), "lm", now - 60, now, False, TEXT_PREDICTION_SCHEMA)
    assert "prompt" not in window.column_names and window.num_rows == 4


def test_a_window_without_traffic_has_no_figures():
    empty = TEXT_PREDICTION_SCHEMA.empty_table().append_column("label", pa.array([], pa.string()))
    stats = generation_traffic(empty, 60)
    assert stats["requests"] == 0 and stats["time_to_first_token_ms"] == {"p50": None, "p99": None}
    assert stats["queue_depth"] == {"mean": None, "max": None}


def test_a_score_is_a_number_a_boolean_or_an_objects_score():
    assert [score_of(t) for t in ("4", "true", '{"score": 2.5}', '"text"', "[1]", "x")] == [
        4.0,
        1.0,
        2.5,
        None,
        None,
        None,
    ]
