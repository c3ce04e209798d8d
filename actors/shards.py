"""ShardStore: a dataset shard resident in a Ray actor, handed out as ObjectRefs.

A dataset is loaded once into N ShardStore actors, balanced by rows. Each actor puts its record
batches into the object store and keeps the refs, so a Train worker on the same node maps them
without a copy, and many runs read the same copy. Standardisation statistics come from a reduce
over the actors; the data never passes through the driver. A killed actor restarts and reloads
its shard from the source (its constructor does the loading).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from actors.sources import SourceSpec, check_source, read_shard, task_of_labels
from training.data import batch_features

logger = logging.getLogger(__name__)

MIN_STD = 1e-6


@dataclass
class FeatureStats:
    """Per-feature count, mean and M2 (sum of squared deviations) of one or more shards."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    labels: list[Any] = field(default_factory=list)
    task: str = "classification"

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Chan's parallel update: exact and stable whatever the order of shards."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / count)
        labels = sorted(set(self.labels) | set(other.labels))
        return FeatureStats(count, mean, m2, labels, self.task)

    @property
    def std(self) -> np.ndarray:
        std = np.sqrt(self.m2 / max(self.count, 1))
        return np.where(std < MIN_STD, 1.0, std)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ShardStore:
    """One shard of one split of a dataset, as Arrow record batches in the object store."""

    def __init__(self, source: SourceSpec, split: str, index: int, num_shards: int) -> None:
        self.source, self.split, self.index = source, split, index
        batches = read_shard(source, split, index, num_shards)
        self._num_rows = sum(b.num_rows for b in batches)
        self._num_bytes = sum(b.nbytes for b in batches)
        self._stats = self._compute_stats(batches)
        # The actor owns these objects: they live exactly as long as the shard does.
        self._refs = [ray.put(b) for b in batches]
        logger.info("shard %s/%d of %s: %d rows", split, index, source.uri, self._num_rows)

    @staticmethod
    def _compute_stats(batches: list) -> FeatureStats:
        if not batches:
            return FeatureStats(0, np.zeros(0), np.zeros(0))
        x = np.concatenate([batch_features(b) for b in batches]).astype(np.float64)
        y = np.concatenate([b.column("label").to_numpy() for b in batches])
        task = task_of_labels(y)
        labels = sorted(np.unique(y).tolist()) if task == "classification" else []
        mean = x.mean(axis=0)
        return FeatureStats(len(x), mean, ((x - mean) ** 2).sum(axis=0), labels, task)

    def ready(self) -> int:
        return self._num_rows

    def num_bytes(self) -> int:
        return self._num_bytes

    def batch_refs(self) -> list[ray.ObjectRef]:
        return list(self._refs)

    def feature_stats(self) -> FeatureStats:
        return self._stats


@dataclass
class ShardSet:
    """The actors holding one split of a dataset, and what the reduce over them found."""

    source: SourceSpec
    split: str
    handles: list[Any]
    rows_per_shard: list[int]
    stats: FeatureStats

    @property
    def num_rows(self) -> int:
        return sum(self.rows_per_shard)

    def read_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """row_ids, features and labels of every shard (for evaluation on small splits)."""
        from training.data import batches_to_arrays

        refs = [ref for h in self.handles for ref in ray.get(h.batch_refs.remote())]
        return batches_to_arrays(ray.get(refs))

    def release(self) -> None:
        for handle in self.handles:
            ray.kill(handle)


def load_shards(source: SourceSpec, split: str, num_shards: int) -> ShardSet:
    """Start `num_shards` ShardStore actors spread over the nodes and wait until loaded."""
    check_source(source)
    store: Any = ShardStore  # @ray.remote adds .options, which type checkers cannot see
    handles = [
        store.options(scheduling_strategy="SPREAD").remote(source, split, i, num_shards)
        for i in range(num_shards)
    ]
    rows = ray.get([h.ready.remote() for h in handles])
    if split == "train" and sum(rows) == 0:
        raise ValueError(f"{source.uri} gave no training rows")
    stats = FeatureStats(0, np.zeros(0), np.zeros(0))
    for part in ray.get([h.feature_stats.remote() for h in handles]):
        stats = stats.merge(part)
    return ShardSet(source, split, handles, rows, stats)
