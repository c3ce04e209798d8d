"""Worker CPUs, torch threads, gradient accumulation and DDP buckets through a real fit()."""

import os

import pytest

from kiln.actors.shards import load_dataset
from kiln.actors.sources import SourceSpec
from kiln.pipeline import fit, make_spec
from kiln.training.config import TrainConfig
from kiln.training.errors import KilnError
from kiln.training.grad_sync import shared_memory_usable


@pytest.fixture
def iris(ray_local):
    data = load_dataset(SourceSpec(uri="sklearn:iris"), 2)
    yield data
    data.release()


@pytest.mark.slow  # about 30-60 s: `make test` keeps to about 10 minutes
def test_workers_get_the_cpus_they_ask_for_as_torch_threads(iris, settings_session):
    cfg = TrainConfig(
        model="mlp", workers=2, epochs=2, cpus_per_worker=1, grad_accum=3, bucket_cap_mb=0.5
    )
    result, history = fit(cfg, make_spec(cfg, iris.train), iris, settings_session, "res-2w")
    assert [w["torch_threads"] for w in history[-1]["workers"]] == [1, 1]
    assert all(m["rows_seen"] == iris.train.num_rows for m in history)  # every row, each epoch
    threads = min(2, os.cpu_count() or 1)
    one = TrainConfig(model="mlp", workers=1, epochs=1, cpus_per_worker=threads)
    _, history = fit(one, make_spec(one, iris.train), iris, settings_session, "res-1w")
    assert history[-1]["workers"][0]["torch_threads"] == threads


def test_more_cpus_than_the_cluster_has_is_refused_before_training(iris, settings_session):
    cfg = TrainConfig(model="mlp", workers=2, epochs=1, cpus_per_worker=1000)
    with pytest.raises(KilnError, match='Got "1000" for --cpus-per-worker'):
        fit(cfg, make_spec(cfg, iris.train), iris, settings_session, "res-too-many")


def test_ranks_with_uneven_rows_take_equal_steps_and_see_every_row(ray_local, settings_session):
    """Three shards over two workers: rank 0 reads two of them, rank 1 one. Every rank takes
    the same number of (smaller) steps, so DDP's gradient syncs pair up with no Join."""
    data = load_dataset(SourceSpec(uri="sklearn:iris"), 3)
    total = data.train.num_rows
    try:
        cfg = TrainConfig(model="mlp", workers=2, epochs=2, batch_size=16)
        _, history = fit(cfg, make_spec(cfg, data.train), data, settings_session, "uneven-2w")
    finally:
        data.release()
    rows = [w["rows"] for w in history[-1]["workers"]]
    assert rows[0] > 1.5 * rows[1] and sum(rows) == total
    assert all(m["rows_seen"] == total for m in history)


@pytest.mark.parametrize("dashboard", [True, False])
def test_the_placement_group_cleaner_runs_only_where_a_state_api_answers(
    ray_local, monkeypatch, dashboard
):
    """Without a dashboard (Kiln's embedded Ray) the cleaner's State API calls hang and held
    every fit 12 s after its last epoch; with one (a `ray start` cluster) it stays."""
    import ray.train
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )

    import kiln.training.loop
    from kiln.training.loop import KilnTorchTrainer

    assert (
        kiln.training.loop.state_api_served()
    )  # the test session's ray.init runs a dashboard head
    monkeypatch.setattr(kiln.training.loop, "state_api_served", lambda: dashboard)
    trainer = KilnTorchTrainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    kinds = [type(c) for c in trainer._create_default_callbacks()]
    assert (PlacementGroupCleanerCallback in kinds) is dashboard
    assert len(kinds) >= 3  # Ray Train's other callbacks are all still there


@pytest.mark.skipif(not shared_memory_usable(1 << 20), reason="needs x86 and /dev/shm")
def test_two_workers_average_in_shared_memory_exactly_as_ddp_does(iris, settings_session):
    """The default on one node's CPU is training/grad_sync.py's shared-memory average; it must
    train the same model as DDP over gloo (same seeds, same steps: the same losses)."""
    runs = {}
    for sync in ("auto", "ddp"):
        cfg = TrainConfig(model="mlp", workers=2, epochs=3, batch_size=16, grad_sync=sync)
        _, history = fit(cfg, make_spec(cfg, iris.train), iris, settings_session, f"sync-{sync}")
        runs[sync] = history
    assert [m["grad_sync"] for m in runs["auto"]] == ["shm"] * 3
    assert [m["grad_sync"] for m in runs["ddp"]] == ["ddp"] * 3
    for key in ("train_loss", "train_accuracy"):
        shm, ddp = [m[key] for m in runs["auto"]], [m[key] for m in runs["ddp"]]
        assert shm == pytest.approx(ddp, rel=1e-6), key
    assert runs["auto"][0]["train_loss"] != pytest.approx(runs["auto"][-1]["train_loss"])
