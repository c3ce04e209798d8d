"""ShardStore actors on a real local Ray: contents, balance, stats and zero-copy refs."""

import numpy as np
import ray
from sklearn.datasets import load_digits

from actors.shards import load_shards
from actors.sources import SourceSpec, split_indices


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
