"""ShardStore actors on a real local Ray: contents, balance, stats and zero-copy refs."""

import numpy as np
import pytest
import ray
from sklearn.datasets import load_digits

from kiln.actors.shards import load_shards
from kiln.actors.sources import SourceSpec, split_indices
from tests.conftest import wait_for


def test_shards_hold_the_train_split_balanced_and_exactly_once(ray_local):
    x_all, y_all = load_digits(return_X_y=True)
    source = SourceSpec(uri="sklearn:digits", seed=0)
    shards = load_shards(source, "train", 3)
    try:
        train_ids, _ = split_indices(y_all, 0.2, 0, stratify=True)
        assert max(shards.rows_per_shard) - min(shards.rows_per_shard) <= 1
        ids, x, y = shards.read_arrays()
        assert sorted(ids.tolist()) == train_ids.tolist()
        np.testing.assert_array_equal(x, x_all[ids].astype(np.float32))
        np.testing.assert_array_equal(y, y_all[ids])
    finally:
        shards.release()


def test_statistics_come_from_a_reduce_that_matches_numpy(ray_local):
    source = SourceSpec(uri="synthetic:regression?rows=3000&features=5&seed=2")
    shards = load_shards(source, "train", 4)
    try:
        _, x, _ = shards.read_arrays()
        np.testing.assert_allclose(shards.stats.mean, x.mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(shards.stats.std, x.std(axis=0), rtol=1e-5)
        assert shards.stats.task == "regression" and shards.stats.count == len(x)
    finally:
        shards.release()


def test_batches_are_object_refs_owned_by_the_actor(ray_local):
    shards = load_shards(SourceSpec(uri="sklearn:iris"), "train", 2)
    try:
        refs = ray.get(shards.handles[0].batch_refs.remote())
        assert refs and all(isinstance(r, ray.ObjectRef) for r in refs)
        batch = ray.get(refs[0])
        assert batch.num_rows == shards.rows_per_shard[0]
        # The same refs on a second call: the data was put once and is shared by every reader.
        assert refs == ray.get(shards.handles[0].batch_refs.remote())
    finally:
        shards.release()


def kill_and_wait_for_reload(victim) -> None:
    """Kill a ShardStore (it restarts and reloads from the source) and wait until it hands
    out new refs: its old objects died with it."""
    stale = {r.hex() for r in ray.get(victim.batch_refs.remote())}
    ray.kill(victim, no_restart=False)

    def reloaded() -> bool:
        # ray.kill is asynchronous: calls made just after it may still reach the old actor.
        try:
            refs = ray.get(victim.batch_refs.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False
        return {r.hex() for r in refs}.isdisjoint(stale)

    assert wait_for(reloaded, timeout_s=180)


def test_a_killed_shard_actor_reloads_and_every_row_is_read_exactly_once(ray_local):
    from kiln.actors.sources import synthetic_split_range
    from kiln.training.data import fetch_shard_batches

    source = SourceSpec(uri="synthetic:classification?rows=30000&features=4&classes=3&seed=5")
    shards = load_shards(source, "train", 3)
    try:
        victim = shards.handles[1]
        kill_and_wait_for_reload(victim)
        assert ray.get(victim.ready.remote(), timeout=180) == shards.rows_per_shard[1]
        row_ids = np.concatenate(
            [b.column("row_id").to_numpy() for h in shards.handles for b in fetch_shard_batches(h)]
        )
        lo, hi = synthetic_split_range(source, 30000, "train")
        assert len(row_ids) == hi - lo  # every row exactly once
        assert np.array_equal(np.sort(row_ids), np.arange(lo, hi))
    finally:
        shards.release()


def test_a_named_dataset_is_shared_listed_and_dropped(ray_local):
    from kiln.actors.shards import attach_dataset, drop_dataset, list_datasets, load_dataset
    from kiln.training.errors import KilnError
    from tests.conftest import wait_for

    source = SourceSpec(uri="sklearn:wine", val_fraction=0.2)
    loaded = load_dataset(source, 2, name="wine-shared", detached=True)
    try:
        attached = attach_dataset("wine-shared")
        assert attached is not None and not attached.owned
        assert attached.train.rows_per_shard == loaded.train.rows_per_shard
        np.testing.assert_allclose(attached.train.stats.mean, loaded.train.stats.mean)
        listed = {d["name"]: d for d in list_datasets()}["wine-shared"]
        assert listed["shards"] == 2 and listed["rows"]["train"] == loaded.train.num_rows
        assert listed["rows"]["val"] == loaded.val.num_rows and listed["uri"] == "sklearn:wine"
        attached.release()  # not owned: releasing an attached dataset keeps the actors
        assert attach_dataset("wine-shared") is not None
        with pytest.raises(KilnError, match="already loaded"):
            load_dataset(source, 2, name="wine-shared", detached=True)
    finally:
        assert drop_dataset("wine-shared") == 5  # 2 train + 2 val + 1 test
    assert wait_for(lambda: attach_dataset("wine-shared") is None, timeout_s=30)


def test_a_shard_process_imports_neither_torch_nor_scipy_nor_sklearn():
    """Every megabyte a ShardStore process imports is held as long as the dataset is resident:
    the exact solvers' per-row sums must not drag the driver-side solvers in."""
    import subprocess
    import sys

    probe = (
        "import sys, kiln.actors.shards; print(sorted({'torch', 'scipy', 'sklearn'} & "
        "set(sys.modules)))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert found == "[]"


def test_categorical_columns_survive_a_killed_shard_with_every_row_once(ray_local, tmp_path):
    from kiln.actors.sources import load_file_table
    from kiln.training.data import batch_categories, fetch_shard_batches
    from tests.tables import customers, write_csv

    path = write_csv(customers(3000, seed=7, missing=0.1), tmp_path / "holes.csv")
    source = SourceSpec(uri=str(path), test_fraction=0.0)
    shards = load_shards(source, "train", 3)
    try:
        before = shards.stats
        kill_and_wait_for_reload(shards.handles[2])
        batches = [b for h in shards.handles for b in fetch_shard_batches(h)]
        row_ids = np.concatenate([b.column("row_id").to_numpy() for b in batches])
        table = load_file_table(str(path))
        labelled = np.flatnonzero(table.column("churn").is_valid().to_numpy(zero_copy_only=False))
        assert np.array_equal(np.sort(row_ids), labelled)  # every labelled row exactly once
        cities = table.column("city").to_pylist()
        for batch in batches:
            dictionary, indices = batch_categories(batch, "city")
            stored = [dictionary[i] if i >= 0 else None for i in indices.tolist()]
            expected = [cities[i] for i in batch.column("row_id").to_pylist()]
            assert stored == expected
        again = load_shards(source, "train", 3)  # the reduce after a reload is the same
        try:
            assert again.stats.categories == before.categories
            np.testing.assert_allclose(again.stats.mean, before.mean)
        finally:
            again.release()
    finally:
        shards.release()


def test_a_bad_table_fails_with_its_own_message_not_an_actor_death(ray_local, tmp_path):
    from kiln.training.errors import KilnError
    from tests.tables import customers, write_csv

    path = write_csv(customers(300, seed=8, missing=0.1), tmp_path / "holes.csv")
    with pytest.raises(KilnError, match=r'^Column "churn" of .* missing values and --missing'):
        load_shards(SourceSpec(uri=str(path), missing="error"), "train", 2)
