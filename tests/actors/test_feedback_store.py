"""FeedbackService and the window report without Ray: dedup, labels, restart, compaction,
quality formulas against scikit-learn, cost."""

import asyncio
import json
import time

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    mean_squared_error,
    precision_score,
    r2_score,
    recall_score,
)

from kiln.actors import feedback
from kiln.actors.feedback import (
    USAGE_SCHEMA,
    FeedbackService,
    IdIndex,
    id_hashes,
    read_window,
    shard_of,
    table_to_ipc,
)
from kiln.actors.monitor import costs, quality
from kiln.serving.predlog import Logged, PredictionLog, rows_table


def logged(request_id: str, rows: int = 3, version: int = 1, ts: float | None = None) -> Logged:
    x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    return Logged("m", version, request_id, ts or time.time(), 200, 1.5, rows, x, np.zeros(rows))


def ipc(*items: Logged) -> bytes:
    return table_to_ipc(rows_table(list(items)))


def test_a_retried_flush_writes_nothing_twice_and_a_restart_remembers(tmp_path):
    store = FeedbackService(str(tmp_path))
    assert store.append("m", ipc(logged("r1"), logged("r2"))) == 6
    assert store.append("m", ipc(logged("r2"), logged("r3"))) == 3  # r2 was acknowledged before
    restarted = FeedbackService(str(tmp_path))  # what a killed actor rebuilds from its files
    assert held(restarted.known["m"]) == held(store.known["m"])
    assert sum(map(len, held(store.known["m"]).values())) == 9
    assert restarted.append("m", ipc(logged("r3"))) == 0
    answer = restarted.add_labels("m", ["r1-0", "r9-0", "r3-2"], ["1", "2", "3"])
    assert answer == {"accepted": 2, "unknown_ids": ["r9-0"]}
    window = read_window(str(tmp_path), "m", time.time() - 60)
    assert window.num_rows == 9 and len(set(window.column("id").to_pylist())) == 9
    labels = dict(
        zip(window.column("id").to_pylist(), window.column("label").to_pylist(), strict=True)
    )
    assert labels["r1-0"] == "1" and labels["r3-2"] == "3" and labels["r2-0"] is None


def held(index: IdIndex) -> dict[str, set[int]]:
    return {day: set(np.concatenate(runs).tolist()) for day, runs in index.days.items()}


def test_the_id_index_finds_every_id_it_holds_in_8_bytes_each_and_few_runs():
    index, rng = IdIndex(), np.random.default_rng(0)
    added = [f"{rng.integers(1 << 48):012x}{n:04x}-0" for n in range(50_000)]
    for chunk in np.array_split(np.arange(len(added)), 97):  # flushes of ~515 rows
        index.add("2026-12-07", id_hashes([added[i] for i in chunk]))
    others = [f"never-{n}" for n in range(5_000)]
    assert index.contains(id_hashes(added)).all()
    assert not index.contains(id_hashes(others)).any()
    assert index.size == 50_000 and index.nbytes == 8 * 50_000  # a set of the strings: ~100 each
    assert len(index.days["2026-12-07"]) <= 8  # merged like a binary counter: O(log n) runs
    assert not index.contains(id_hashes(added[:10]), ["2026-12-06"]).any()  # by day when asked


def test_past_its_bound_the_index_leaves_the_oldest_day_out_and_labels_go_unchecked(tmp_path):
    day = 86400.0
    today = time.time()
    store = FeedbackService(str(tmp_path), index_max_ids=7)
    for n, ago in enumerate((2, 1, 0)):  # three days, 3 rows each
        store.append("m", ipc(logged(f"d{n}", ts=today - ago * day)))
    index = store.known["m"]
    assert sorted(index.days) == [feedback.day_of(today - day), feedback.day_of(today)]
    assert index.left_out == {feedback.day_of(today - 2 * day)} and index.size == 6
    # The oldest day's ids: no longer held, so kept unchecked; so is an id never logged.
    answer = store.add_labels("m", ["d0-1", "d2-0", "nope-0"], ["1", "2", "3"])
    assert answer == {"accepted": 3, "unknown_ids": [], "unchecked_ids": ["d0-1", "nope-0"]}
    # A retried flush of a day still held writes nothing twice.
    assert store.append("m", ipc(logged("d2", ts=today))) == 0
    # A restart reads the newest days first, up to the bound, and leaves the same day out.
    restarted = FeedbackService(str(tmp_path), index_max_ids=7)
    assert held(restarted.known["m"]) == held(index)
    assert restarted.known["m"].left_out == index.left_out
    # Past retention the left-out day is gone from disk: the index is whole again.
    store.retention_days["m"] = 1
    store.maintain()
    assert index.complete
    assert sorted(index.days) == [feedback.day_of(today - day), feedback.day_of(today)]
    assert store.add_labels("m", ["nope-0", "d2-2"], ["1", "2"]) == {
        "accepted": 1,
        "unknown_ids": ["nope-0"],
    }


def test_compaction_keeps_every_row_once(tmp_path, monkeypatch):
    monkeypatch.setattr(feedback, "COMPACT_AFTER_FILES", 5)
    store = FeedbackService(str(tmp_path))
    for i in range(12):
        store.append("m", ipc(logged(f"r{i}")))
    # merged as the 5th and the 10th file landed; the two latest still small
    day = feedback.day_of(time.time())
    names = sorted(p.rsplit("/", 1)[1] for p in store._own_files("m", "predictions", day))
    assert sum(n.endswith(feedback.COMPACTED) for n in names) == 2 and len(names) == 4
    window = read_window(str(tmp_path), "m", time.time() - 60)
    assert window.num_rows == 36


def test_a_flush_across_midnight_utc_writes_each_row_under_its_own_day(tmp_path):
    store = FeedbackService(str(tmp_path))
    midnight = 86400.0 * 20_000  # 2024-10-04T00:00:00Z
    late, early = logged("late", rows=2, ts=midnight - 0.25), logged("early", rows=1, ts=midnight)
    assert store.append("m", ipc(late, early)) == 3
    by_day = {
        day: sorted(
            row_id
            for path in store._own_files("m", "predictions", day)
            for row_id in feedback.read_parquet(store.store, path, ["id"]).column("id").to_pylist()
        )
        for day in feedback.day_dirs(store.store, "m", "predictions")
    }
    assert by_day == {"2024-10-03": ["late-0", "late-1"], "2024-10-04": ["early-0"]}


def test_continuous_inputs_are_stored_without_a_dictionary_larger_than_them(tmp_path):
    """Arrow's default dictionary limit stored 1,000 rows of 64 random floats in 377 bytes a row
    (their values are 256); inputs of few distinct values keep their dictionary."""
    rng = np.random.default_rng(0)
    continuous = rng.random((1000, 64), dtype=np.float32)
    few = rng.integers(0, 17, (1000, 64)).astype(np.float32)
    sizes = {}
    for name, x in (("continuous", continuous), ("few", few)):
        item = Logged("m", 1, "r", time.time(), 200, 1.5, len(x), x, np.zeros(len(x)))
        table = rows_table([item])
        sizes[name] = len(feedback.parquet_bytes(table)) / len(x)
        assert feedback.ipc_to_table(table_to_ipc(table)).equals(table)
    assert sizes["continuous"] < 1.1 * 64 * 4, sizes
    assert sizes["few"] < 64, sizes  # dictionary and zstd: under a byte a value


def test_retention_drops_old_days(tmp_path):
    store = FeedbackService(str(tmp_path))
    store.append("m", ipc(logged("old", ts=time.time() - 10 * 86400)), retention_days=3)
    store.append("m", ipc(logged("new")), retention_days=3)
    assert store.maintain()["removed_days"] == 1
    assert read_window(str(tmp_path), "m", time.time() - 30 * 86400).num_rows == 3


def test_shards_split_by_request_and_keep_a_request_together():
    ids = [f"req{i}-{j}" for i in range(200) for j in range(3)]
    shards = [shard_of(i, 4) for i in ids]
    assert set(shards) == {0, 1, 2, 3}
    for i in range(0, len(ids), 3):
        assert len(set(shards[i : i + 3])) == 1


class FlakyStore:
    """A store whose first `fail` appends raise, as a store being restarted does."""

    def __init__(self, service: FeedbackService, fail: int) -> None:
        self.service, self.fail = service, fail
        self.append = self  # store.append.remote(...)

    async def remote(self, model, data, retention_days):
        if self.fail > 0:
            self.fail -= 1
            raise RuntimeError("store restarting")
        return self.service.append(model, data, retention_days)


def test_unacknowledged_rows_are_sent_again(tmp_path):
    service = FeedbackService(str(tmp_path))
    log = PredictionLog(lambda: [FlakyStore(service, fail=2)])
    log._task = object()  # flushed by hand below, not by the background loop

    async def scenario() -> list[int]:
        log.record(logged("a"))
        first = await log.flush()  # refused: kept
        log.record(logged("b"))
        return [first, await log.flush(), await log.flush()]

    assert asyncio.run(scenario()) == [0, 0, 6]  # both requests, once each
    assert read_window(str(tmp_path), "m", time.time() - 60).num_rows == 6


def test_the_buffer_is_bounded_and_counts_what_it_drops():
    log = PredictionLog(lambda: [], max_buffered_rows=10, max_rows=10**6)
    log._task = object()  # no event loop here: the flusher is not started
    for i in range(6):
        log.record(logged(f"r{i}"))
    assert log.buffered_rows <= 10 and log.dropped_rows == 18 - log.buffered_rows


@pytest.mark.parametrize("seed", [0, 1])
def test_classification_quality_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    classes = ["cat", "dog", "eel"]
    y_true = rng.integers(0, 3, 400)
    y_pred = np.where(rng.random(400) < 0.7, y_true, rng.integers(0, 3, 400))
    spec = {"task": "classification", "classes": classes}
    labels = [json.dumps(classes[i]) for i in y_true]
    found = quality(spec, y_pred, labels)
    assert found["labelled_rows"] == 400
    assert found["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert found["precision"] == pytest.approx(precision_score(y_true, y_pred, average="macro"))
    assert found["recall"] == pytest.approx(recall_score(y_true, y_pred, average="macro"))
    assert found["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert found["confusion"] == confusion_matrix(y_true, y_pred).tolist()


def test_regression_quality_matches_scikit_learn():
    rng = np.random.default_rng(2)
    y = rng.normal(size=300)
    pred = y + rng.normal(scale=0.5, size=300)
    found = quality({"task": "regression"}, pred, [json.dumps(v) for v in y.tolist()])
    assert found["mse"] == pytest.approx(mean_squared_error(y, pred))
    assert found["r2"] == pytest.approx(r2_score(y, pred))


def test_cost_counts_idle_time_and_splits_by_predictions(monkeypatch):
    monkeypatch.setenv("KILN_PRICE_CPU_HOUR", "0.36")
    monkeypatch.setenv("KILN_PRICE_GPU_HOUR", "3.6")
    usage = pa.table(
        {
            "replica": ["a", "b"],
            "start_ts": [0.0, 1800.0],
            "end_ts": [3600.0, 7200.0],  # b runs past the window's end
            "num_cpus": [1.0, 2.0],
            "num_gpus": [0.0, 0.5],
            "models": [["m"], ["m", "n"]],
        },
        schema=USAGE_SCHEMA,
    )
    found = costs(usage, 0.0, 3600.0, {"m": {1: 300, 2: 100}, "n": {1: 0}})
    # a: 1 h x 1 CPU x 0.36 = 0.36; b: 0.5 h x (2 x 0.36 + 0.5 x 3.6) = 1.26, all to m (n idle)
    total_m = 0.36 + 1.26
    assert found["m"][1]["usd"] == pytest.approx(total_m * 0.75)
    assert found["m"][1]["per_1000_predictions"] == pytest.approx(total_m * 0.75 / 300 * 1000)
    assert found["n"][1]["per_1000_predictions"] is None


def test_bounded_stores_answer_unchecked_ids_through_the_feedback_path(ray_local, tmp_path):
    """Two real FeedbackStore actors with a bound of 1,000 ids: the older day left out of their
    index turns labels for ids they no longer hold into `unchecked_ids`, merged in the order
    sent."""
    import ray

    from kiln.actors.feedback import feedback_stores
    from kiln.serving.feedback import send_feedback

    stores = feedback_stores(str(tmp_path), 2, index_max_ids=1000)
    old, new = time.time() - 86400, time.time()
    for prefix, ts in (("old", old), ("new", new)):  # a day, then the next
        for n in range(15):  # 15 requests of 100 rows: ~750 a store
            item = logged(f"{prefix}{n}", rows=100, ts=ts)
            ray.get(stores[shard_of(item.request_id, 2)].append.remote("m", ipc(item)))
    ids = ["new3-7", "old5-1", "nope-0", "old0-99"]
    answer = asyncio.run(send_feedback(stores, "m", ids, ["1"] * len(ids)))
    assert answer == {
        "accepted": 4,
        "unknown_ids": [],
        "unchecked_ids": ["old5-1", "nope-0", "old0-99"],
    }
    for store in stores:
        ray.kill(store)
