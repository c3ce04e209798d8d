"""ShardStore: a dataset shard resident in a Ray actor, handed out as ObjectRefs.

A dataset is loaded once into N ShardStore actors, balanced by rows. Each actor puts its record
batches into the object store and keeps the refs, so a Train worker on the same node maps them
without a copy, and many runs read the same copy. Standardisation statistics come from a reduce
over the actors; the data never passes through the driver. A killed actor restarts and reloads
its shard from the source (its constructor does the loading).
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kiln.actors.registry import NAMESPACE
from kiln.actors.sources import ColumnPlan, SourceSpec, check_source, open_shard, task_of_labels
from kiln.actors.startup import wait_started
from kiln.training.data import (
    batch_categories,
    batch_features,
    batch_inputs,
    batch_labels,
    batches_to_arrays,
    encode_labels,
    fetch_shard_batches,
)
from kiln.training.drift import bin_counts, quantile_edges
from kiln.training.errors import KilnError
from kiln.training.linear import CrossMoments, LooBasis, softmax_sums, squared_sums
from kiln.training.preprocess import feature_moments
from kiln.training.tabular import CATEGORICAL, CategoryCounts, Encoding, InputColumn

logger = logging.getLogger(__name__)

MIN_STD = 1e-6
DATASET_PREFIX = "kiln-data"


@dataclass
class FeatureStats:
    """Per-column moments of the numeric inputs, category counts and label facts of one or
    more shards, merged exactly whatever the split of rows (Chan's update, per column)."""

    count: int
    """Rows."""
    mean: np.ndarray
    """Mean of each numeric input over its present values."""
    m2: np.ndarray
    """Sum of squared deviations of each numeric input's present values."""
    labels: list[Any] = field(default_factory=list)
    task: str = "classification"
    label_mean: float = 0.0
    label_m2: float = 0.0
    """Moments of a regression target (count is the same as the features')."""
    present: np.ndarray | None = None
    """Rows where each numeric input is present (None: all `count` of them)."""
    categories: list[CategoryCounts] = field(default_factory=list)
    """Per categorical input, in plan order."""
    plan: ColumnPlan | None = None
    dropped_rows: int = 0
    """Rows of the source dropped for a missing label (the source's count, not summed)."""

    @property
    def present_counts(self) -> np.ndarray:
        return self.present if self.present is not None else np.full(len(self.mean), self.count)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Chan's parallel update: exact and stable whatever the order of shards."""
        dropped = max(self.dropped_rows, other.dropped_rows)
        if other.count == 0:
            return replace(self, plan=self.plan or other.plan, dropped_rows=dropped)
        if self.count == 0:
            return replace(other, plan=other.plan or self.plan, dropped_rows=dropped)
        count = self.count + other.count
        n_a, n_b = self.present_counts, other.present_counts
        n = n_a + n_b
        share = np.divide(n_b, n, out=np.zeros(len(n)), where=n > 0)
        weight = np.divide(n_a * n_b, n, out=np.zeros(len(n)), where=n > 0)
        delta = other.mean - self.mean
        mean = self.mean + delta * share
        m2 = self.m2 + other.m2 + delta**2 * weight
        label_delta = other.label_mean - self.label_mean
        label_mean = self.label_mean + label_delta * (other.count / count)
        label_m2 = (
            self.label_m2 + other.label_m2 + label_delta**2 * (self.count * other.count / count)
        )
        return FeatureStats(
            count=count,
            mean=mean,
            m2=m2,
            labels=sorted(set(self.labels) | set(other.labels)),
            task=self.task,
            label_mean=label_mean,
            label_m2=label_m2,
            present=n,
            categories=[a.merge(b) for a, b in zip(self.categories, other.categories, strict=True)],
            plan=self.plan or other.plan,
            dropped_rows=dropped,
        )

    @property
    def label_std(self) -> float:
        std = float(np.sqrt(self.label_m2 / max(self.count, 1)))
        return std if std >= MIN_STD else 1.0

    @property
    def std(self) -> np.ndarray:
        """Std of each numeric input over all rows, missing ones imputed with the mean."""
        std = np.sqrt(self.m2 / max(self.count, 1))
        return np.where(std < MIN_STD, 1.0, std)

    @property
    def missing(self) -> np.ndarray:
        """Rows where each numeric input is missing."""
        return self.count - self.present_counts

    def encoding(self, min_category_count: int = 1) -> Encoding:
        """The model inputs these rows give: numeric ones imputed with their mean (and a
        missing-indicator where any was missing), categorical ones with the categories of at
        least `min_category_count` rows."""
        assert self.plan is not None, "statistics of a loaded shard carry its column plan"
        numeric = iter(zip(self.mean.tolist(), self.missing.tolist(), strict=True))
        categories = iter(self.categories)
        inputs = []
        for name, kind, dtype in self.plan.inputs:
            if kind == CATEGORICAL:
                counts = next(categories)
                kept, kept_counts, other = counts.kept(min_category_count)
                inputs.append(
                    InputColumn(
                        name,
                        kind,
                        dtype,
                        categories=kept,
                        counts=kept_counts,
                        other_count=other,
                        missing_count=counts.missing,
                    )
                )
            else:
                mean, missing = next(numeric)
                inputs.append(
                    InputColumn(
                        name,
                        kind,
                        dtype,
                        impute=float(mean),
                        indicator=missing > 0,
                        missing_count=int(missing),
                    )
                )
        return Encoding(tuple(inputs))

    def column_summary(self) -> dict[str, Any]:
        """What loading made of the table's columns, for the CLI and the lineage."""
        if self.plan is None:
            return {}
        return {
            "label": self.plan.label,
            "inputs": {name: kind for name, kind, _ in self.plan.inputs},
            "ignored": dict(self.plan.ignored),
            "dropped_rows": self.dropped_rows,
        }

    def numeric_m2(self) -> dict[str, float]:
        """Each numeric input's sum of squared deviations, by name."""
        assert self.plan is not None
        return dict(zip(self.plan.numeric, self.m2.tolist(), strict=True))


def numeric_moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
    """count, per-column mean and M2 over present values, and present counts (None: no NaN)."""
    count, mean, m2 = feature_moments(x)
    if not np.isnan(mean).any():  # a NaN anywhere in a column makes its mean NaN: one check
        return count, mean, m2, None
    present = (~np.isnan(x)).sum(axis=0)
    sums = np.nansum(x, axis=0, dtype=np.float64)
    mean = np.divide(sums, present, out=np.zeros(len(present)), where=present > 0)
    m2 = np.nansum((np.asarray(x, dtype=np.float64) - mean) ** 2, axis=0)
    return count, mean, m2, present


def batch_stats(batch: pa.RecordBatch, plan: ColumnPlan) -> FeatureStats:
    """One batch's moments and counts; merged batch by batch, so no float64 copy of the
    shard."""
    count, mean, m2, present = numeric_moments(batch_features(batch))
    y = batch_labels(batch)
    stats = FeatureStats(
        count,
        mean,
        m2,
        task=task_of_labels(y),
        present=present,
        categories=[category_counts(batch, name) for name in plan.categorical],
        plan=plan,
    )
    if stats.task == "classification":
        stats.labels = sorted(np.unique(y).tolist())
    else:
        y64 = y.astype(np.float64)
        stats.label_mean = float(y64.mean())
        stats.label_m2 = float(((y64 - stats.label_mean) ** 2).sum())
    return stats


def release_freed_memory() -> None:
    """Return the buffers freed after loading to the OS.

    Measured: without this a 137 MiB shard kept 286 MiB of freed build buffers in its actor
    (glibc's heap keeps them, as does pyarrow's pool), on top of the object store's copy.
    """
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ShardStore:
    """One shard of one split of a dataset, as Arrow record batches in the object store."""

    def __init__(self, source: SourceSpec, split: str, index: int, num_shards: int) -> None:
        self.source, self.split, self.index = source, split, index
        self._refs: list[ray.ObjectRef] = []
        self._num_rows = self._num_bytes = 0
        self._stats = FeatureStats(0, np.zeros(0), np.zeros(0))
        self._moments: dict[Encoding | None, CrossMoments] = {}
        self._error: KilnError | None = None
        try:
            self._load(source, split, index, num_shards)
        except KilnError as exc:
            # Kept for `ready` to raise: an error in the constructor would kill the actor
            # and reach the driver as an ActorDiedError with the message buried in it.
            self._error = exc
        except pa.ArrowException as exc:
            self._error = KilnError(f"{source.uri} could not be read: {exc}")
        logger.info("shard %s/%d of %s: %d rows", split, index, source.uri, self._num_rows)

    def _load(self, source: SourceSpec, split: str, index: int, num_shards: int) -> None:
        opened = open_shard(source, split, index, num_shards)
        self._stats = FeatureStats(
            0,
            np.zeros(len(opened.plan.numeric)),
            np.zeros(len(opened.plan.numeric)),
            categories=[CategoryCounts() for _ in opened.plan.categorical],
            plan=opened.plan,
            dropped_rows=opened.dropped_rows,
        )
        # One batch at a time into the object store, the actor owning each object (they live
        # exactly as long as the shard does): while loading, the actor holds one batch, not a
        # second copy of the shard (measured at 2M x 32: the load peaked at twice the shard).
        for batch in opened.batches:
            self._num_rows += batch.num_rows
            self._num_bytes += batch.nbytes
            self._stats = self._stats.merge(batch_stats(batch, opened.plan))
            self._refs.append(ray.put(batch))
            del batch
        # Hand the freed build buffers back to the OS (pyarrow's pool and glibc keep them).
        release_freed_memory()

    def source_spec(self) -> SourceSpec:
        return self.source

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def ready(self) -> int:
        """Rows of this shard; raises the KilnError that stopped its loading."""
        if self._error is not None:
            raise self._error
        return self._num_rows

    def loaded(self) -> tuple[int, str | None]:
        """Rows of this shard, and why its loading stopped (None when it did not)."""
        return self._num_rows, None if self._error is None else str(self._error)

    def num_bytes(self) -> int:
        return self._num_bytes

    def batch_refs(self) -> list[ray.ObjectRef]:
        return list(self._refs)

    def feature_stats(self) -> FeatureStats:
        return self._stats

    def source_sha256(self) -> str:
        """sha256 of the whole source (the lineage's dataset hash), computed in a process that
        has the source's readers loaded already: a task of its own was one more worker
        starting beside the load (1.4 s of a 2.5 s registration on a 2-core machine)."""
        from kiln.actors.lineage import dataset_sha256

        return dataset_sha256(self.source.uri)

    def _features(self, batch: pa.RecordBatch, encoding: Encoding | None) -> np.ndarray:
        """A batch's encoded features (the stored numbers themselves for a plain table)."""
        raw = batch_inputs(batch, encoding)
        return raw if encoding is None else encoding.expand(raw)

    def linear_moments(self, encoding: Encoding | None = None) -> CrossMoments:
        """Count, means and centred co-moments of (features, label), for the exact solvers:
        F x F numbers leave the actor, never rows. Computed once per encoding, batch by batch."""
        if encoding not in self._moments:
            moments = CrossMoments.empty(
                encoding.num_features if encoding else len(self._stats.mean)
            )
            for batch in ray.get(self._refs):
                x = self._features(batch, encoding)
                moments = moments.merge(CrossMoments.from_arrays(x, batch_labels(batch)))
            self._moments[encoding] = moments
        return self._moments[encoding]

    def feature_moments(self, encoding: Encoding | None = None) -> CrossMoments:
        """Count, means and centred co-moments of the features alone (PCA): F x F numbers."""
        width = encoding.num_features if encoding else len(self._stats.mean)
        moments = CrossMoments.empty(width)
        for batch in ray.get(self._refs):
            x = self._features(batch, encoding)
            moments = moments.merge(CrossMoments.from_arrays(x, np.zeros(len(x))))
        return moments

    def drift_sample(self, count: int, seed: int, encoding: Encoding | None = None) -> np.ndarray:
        """`count` of this shard's rows as raw model inputs, drawn uniformly (drift reference)."""
        width = encoding.num_inputs if encoding else len(self._stats.mean)
        batches = ray.get(self._refs)
        return sample_inputs(batches, self._num_rows, count, [seed, self.index], encoding, width)

    def drift_counts(self, edges: np.ndarray, encoding: Encoding | None = None) -> np.ndarray:
        """Every row of this shard counted into the reference bins (summed over shards)."""
        return count_inputs(ray.get(self._refs), edges, encoding)

    def loo_squared_errors(self, basis: LooBasis, encoding: Encoding | None = None) -> np.ndarray:
        """Σ of the ridge path's leave-one-out errors² over this shard's rows, one per λ."""
        total = np.zeros(len(basis.intercepts))
        for batch in ray.get(self._refs):
            x = self._features(batch, encoding)
            total += basis.squared_errors(x, batch_labels(batch))
        return total

    def loss_sums(
        self,
        loss: str,
        a: np.ndarray,
        c: np.ndarray,
        classes: list[Any] | None = None,
        encoding: Encoding | None = None,
    ) -> tuple[float, np.ndarray, np.ndarray]:
        """Σ loss and its gradient over this shard's rows for raw weights (a, c): one step of
        a full-batch solver (`softmax`: cross-entropy on `classes`; `squared`: ½·Σ residual²)."""
        total, grad_a, grad_c = 0.0, np.zeros_like(a, dtype=np.float64), np.zeros(len(c))
        for batch in ray.get(self._refs):
            y = batch_labels(batch)
            x = self._features(batch, encoding)
            if loss == "softmax":
                part = softmax_sums(x, encode_labels(y, classes or []), a, c)
            else:
                part = squared_sums(x, y, a, c)
            total, grad_a, grad_c = total + part[0], grad_a + part[1], grad_c + part[2]
        return total, grad_a, grad_c

    def describe(self) -> dict[str, Any]:
        return {
            "uri": self.source.uri,
            "split": self.split,
            "index": self.index,
            "rows": self._num_rows,
            "bytes": self._num_bytes,
        }

    def memory_bytes(self) -> dict[str, int]:
        """This actor's private memory, without its pages of the shared object store (those
        are the object store's bytes, which `object_store` counts), and the store's bytes."""
        import psutil

        private = sum(
            m.private_clean + m.private_dirty
            for m in psutil.Process().memory_maps(grouped=True)
            if "plasma" not in m.path
        )
        return {"private": private, "object_store": self._num_bytes}


def sample_inputs(
    batches: list[pa.RecordBatch],
    num_rows: int,
    count: int,
    seed: Any,
    encoding: Encoding | None,
    width: int,
) -> np.ndarray:
    """`count` rows drawn uniformly from `batches`, as raw model inputs (N, width)."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(num_rows, size=min(count, num_rows), replace=False))
    parts, offset = [], 0
    for batch in batches:
        inside = chosen[(chosen >= offset) & (chosen < offset + batch.num_rows)] - offset
        if len(inside):
            parts.append(batch_inputs(batch.take(pa.array(inside)), encoding))
        offset += batch.num_rows
    return np.concatenate(parts) if parts else np.zeros((0, width), dtype=np.float32)


def count_inputs(
    batches: list[pa.RecordBatch], edges: np.ndarray, encoding: Encoding | None
) -> np.ndarray:
    """Rows of `batches` per drift bin (training/drift.py `bin_counts`), summed over batches."""
    total = np.zeros((len(edges), edges.shape[1] + 2), np.int64)
    for batch in batches:
        total += bin_counts(batch_inputs(batch, encoding), edges)
    return total


@ray.remote(num_cpus=0)
class RowBatches:
    """Rows handed over in memory (labelled feedback for `kiln retrain`), served to Train
    workers like a ShardStore's: the same `batch_refs`, and the drift reduce."""

    def __init__(self, batches: list[pa.RecordBatch], width: int) -> None:
        self._refs = [ray.put(b) for b in batches]
        self._batches = batches
        self._num_rows = sum(b.num_rows for b in batches)
        self._width = width

    def batch_refs(self) -> list[ray.ObjectRef]:
        return list(self._refs)

    def ready(self) -> int:
        return self._num_rows

    def drift_sample(self, count: int, seed: int, encoding: Encoding | None = None) -> np.ndarray:
        return sample_inputs(self._batches, self._num_rows, count, seed, encoding, self._width)

    def drift_counts(self, edges: np.ndarray, encoding: Encoding | None = None) -> np.ndarray:
        return count_inputs(self._batches, edges, encoding)


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

    def read_arrays(
        self, encoding: Encoding | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """row_ids, model inputs and labels of every shard (for evaluation on small splits)."""
        batches = [b for h in self.handles for b in fetch_shard_batches(h)]
        return batches_to_arrays(batches, encoding)

    def release(self) -> None:
        for handle in self.handles:
            ray.kill(handle)


def category_counts(batch: pa.RecordBatch, name: str) -> CategoryCounts:
    """Rows per category of one categorical input of a batch, from its dictionary."""
    dictionary, indices = batch_categories(batch, name)
    counts = np.bincount(indices[indices >= 0], minlength=len(dictionary))
    return CategoryCounts(
        {str(key): int(n) for key, n in zip(dictionary, counts.tolist(), strict=True) if n},
        int((indices < 0).sum()),
    )


def reduce_linear_moments(handles: list[Any], encoding: Encoding | None = None) -> CrossMoments:
    """The moments of (features, label) over every row of these shards: one F x F reduce."""
    return merge_moments(ray.get([h.linear_moments.remote(encoding) for h in handles]))


def reduce_feature_moments(handles: list[Any], encoding: Encoding | None = None) -> CrossMoments:
    """The features' co-moments over every row of these shards (PCA): one F x F reduce."""
    return merge_moments(ray.get([h.feature_moments.remote(encoding) for h in handles]))


def merge_moments(parts: list[CrossMoments]) -> CrossMoments:
    moments = parts[0]
    for part in parts[1:]:
        moments = moments.merge(part)
    return moments


def reduce_drift_reference(
    shards: ShardSet, encoding: Encoding | None, sample_rows: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample, inner edges, counts) of the training inputs: a sample from each shard in
    proportion to its rows gives the quantile edges, then every row is counted (two reduces;
    only the sample leaves the actors)."""
    total = max(shards.num_rows, 1)
    quotas = [int(np.ceil(sample_rows * rows / total)) for rows in shards.rows_per_shard]
    sample = np.concatenate(
        ray.get(
            [
                h.drift_sample.remote(quota, seed, encoding)
                for h, quota in zip(shards.handles, quotas, strict=True)
            ]
        )
    )[:sample_rows]
    edges = quantile_edges(sample)
    counts = sum(ray.get([h.drift_counts.remote(edges, encoding) for h in shards.handles]))
    return sample, edges, np.asarray(counts)


def reduce_loo_errors(
    handles: list[Any], basis: LooBasis, encoding: Encoding | None = None
) -> np.ndarray:
    """Leave-one-out errors² of a ridge path summed over every row of these shards."""
    basis_ref = ray.put(basis)
    parts = [h.loo_squared_errors.remote(basis_ref, encoding) for h in handles]
    return np.sum(ray.get(parts), axis=0)


def reduce_loss_sums(
    handles: list[Any],
    loss: str,
    a: np.ndarray,
    c: np.ndarray,
    classes: list[Any] | None,
    encoding: Encoding | None = None,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Σ loss and gradient over every row of these shards, each actor summing its own."""
    a_ref, c_ref = ray.put(a), ray.put(c)
    parts = ray.get([h.loss_sums.remote(loss, a_ref, c_ref, classes, encoding) for h in handles])
    return (
        sum(p[0] for p in parts),
        np.sum([p[1] for p in parts], axis=0),
        np.sum([p[2] for p in parts], axis=0),
    )


@dataclass
class Dataset:
    """The splits of one dataset resident in ShardStore actors."""

    name: str | None
    train: ShardSet
    test: ShardSet
    val: ShardSet | None = None
    owned: bool = True
    """Loaded for this command (released at its end) rather than a named, shared dataset."""
    content_hash: Any = None
    """An ObjectRef of the training source's sha256, once a caller started hashing it."""

    @property
    def splits(self) -> list[ShardSet]:
        return [s for s in (self.train, self.val, self.test) if s is not None]

    def release(self) -> None:
        if self.owned:
            for shard_set in self.splits:
                shard_set.release()


def looks_like_dataset_name(data: str) -> bool:
    """The one rule for `--data`: a bare name (no scheme, no path, no file suffix) may be a
    dataset loaded with `kiln data load`; anything else is a URI."""
    return ":" not in data and "/" not in data and "." not in data


def actor_name(dataset: str, split: str, index: int) -> str:
    return f"{DATASET_PREFIX}:{dataset}:{split}:{index}"


def load_shards(
    source: SourceSpec,
    split: str,
    num_shards: int,
    name: str | None = None,
    detached: bool = False,
) -> ShardSet:
    """Start `num_shards` ShardStore actors spread over the nodes and wait until loaded."""
    return gather_shard_set(source, split, start_shards(source, split, num_shards, name, detached))


def start_shards(
    source: SourceSpec,
    split: str,
    num_shards: int,
    name: str | None = None,
    detached: bool = False,
) -> list[Any]:
    """Start `num_shards` ShardStore actors spread over the nodes; they load in the background."""
    check_source(source)
    targets = shard_targets(num_shards)
    if len(set(targets)) > 1:
        reach_nodes(sorted(set(targets)))
    return [
        start_shard(source, split, i, num_shards, targets[i], name, detached)
        for i in range(num_shards)
    ]


def shard_targets(num_shards: int) -> list[str]:
    """The node each shard should live on: round-robin over the live nodes. SPREAD alone is
    best effort, and it put every 0-CPU shard on one node in a 3-node test."""
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    return [nodes[i % len(nodes)] for i in range(num_shards)]


def start_shard(
    source: SourceSpec,
    split: str,
    index: int,
    num_shards: int,
    target: str,
    name: str | None,
    detached: bool,
) -> Any:
    """One ShardStore, softly pinned to `target` (soft, so a restart may go elsewhere)."""
    store: Any = ShardStore  # @ray.remote adds .options, which type checkers cannot see
    strategy = NodeAffinitySchedulingStrategy(node_id=target, soft=True)
    options: dict[str, Any] = {"scheduling_strategy": strategy}
    if name:
        options["name"] = actor_name(name, split, index)
        options["namespace"] = NAMESPACE
    if detached:
        options["lifetime"] = "detached"
    return store.options(**options).remote(source, split, index, num_shards)


def respread(
    shard_set: ShardSet,
    name: str | None,
    detached: bool,
    attempts: int = 5,
    timeout_s: float = 60.0,
) -> ShardSet:
    """Start again, on its node, each shard whose soft affinity fell back elsewhere (up to
    `attempts` rounds; what is still off its node after them stays where it is).

    Even after `reach_nodes` a fresh cluster's scheduler sometimes overrides soft affinities
    (all three shards of a 3-node test on one node, about one run in several: RAY_NOTES), and
    on a busy machine three rounds in a row once did. Each round after the first waits a
    little longer first (0.5 s, 1 s, ...) for the scheduler's view of the nodes to catch up.
    """
    targets = shard_targets(len(shard_set.handles))
    if len(set(targets)) < 2:
        return shard_set
    for attempt in range(attempts):
        placed = ray.get([h.node_id.remote() for h in shard_set.handles])
        wrong = [i for i, (at, goal) in enumerate(zip(placed, targets, strict=True)) if at != goal]
        if not wrong:
            break
        logger.info("shards %s of %s landed off their nodes; placing again", wrong, shard_set.split)
        time.sleep(0.5 * attempt)  # a backoff between placements, not a wait for a condition
        reach_nodes(sorted({targets[i] for i in wrong}))
        handles = list(shard_set.handles)
        for i in wrong:
            ray.kill(handles[i], no_restart=True)
            if name:
                wait_until_name_is_free(actor_name(name, shard_set.split, i), timeout_s)
            handles[i] = start_shard(
                shard_set.source, shard_set.split, i, len(handles), targets[i], name, detached
            )
        wait_started([handles[i] for i in wrong], "loaded")
        shard_set = gather_shard_set(shard_set.source, shard_set.split, handles, started=True)
    return shard_set


def wait_until_name_is_free(actor: str, timeout_s: float) -> None:
    """ray.kill is asynchronous: a named actor's name stays taken until it is gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(actor, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.1)
    raise KilnError(f"shard actor {actor} did not stop within {timeout_s:.0f} s; try again")


@ray.remote(num_cpus=0)
def _on_node() -> str:
    return ray.get_runtime_context().get_node_id()


def reach_nodes(node_ids: list[str], timeout_s: float = 60.0) -> None:
    """Run a no-op pinned to each node and wait: afterwards soft affinities to them hold.

    Measured on a fresh 3-node cluster: 3 shards with soft affinities round-robin over the
    nodes landed on 2, 2 and 1 distinct nodes in three tries; after one pinned no-op per node,
    on 3, 2 and 3 (RAY_NOTES). Best effort: a node that cannot be reached is left to Ray.
    """
    pinned = [
        _on_node.options(  # type: ignore[attr-defined]
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        ).remote()
        for node in node_ids
    ]
    try:
        ray.get(pinned, timeout=timeout_s)
    except (ray.exceptions.RayError, TimeoutError) as exc:
        logger.info("could not reach every node before placing shards: %s", exc)


def gather_shard_set(
    source: SourceSpec, split: str, handles: list[Any], started: bool = False
) -> ShardSet:
    """Wait for the actors and reduce their statistics into one ShardSet. Actors just created
    (not `started`) that cannot start end the wait with one line naming the cause."""
    if started:
        found = ray.get([h.loaded.remote() for h in handles])
    else:
        found = wait_started(handles, "loaded")
    errors = [error for _, error in found if error is not None]
    if errors:  # a bad table: said once, as the shard found it
        raise KilnError(errors[0])
    rows = [count for count, _ in found]
    stats = FeatureStats(0, np.zeros(0), np.zeros(0))
    for part in ray.get([h.feature_stats.remote() for h in handles]):
        stats = stats.merge(part)
    return ShardSet(source, split, handles, rows, stats)


def load_dataset(
    source: SourceSpec, num_shards: int, name: str | None = None, detached: bool = False
) -> Dataset:
    """Train (and validation) splits in `num_shards` actors each, the test split in one."""
    if name and find_dataset_actors(name):
        raise KilnError(
            f'A dataset named "{name}" is already loaded. Drop it first: kiln data drop {name}'
        )
    splits = {"train": num_shards, **({"val": num_shards} if source.val_fraction > 0 else {})}
    splits["test"] = 1
    # On one node every split's actors start at once (each is a process that reads the source;
    # one split after another cost three start-ups in a row). On several nodes a split's actors
    # are placed before the next split starts: started all together, the round-robin's soft
    # node affinities were overridden while the raylets were busy starting workers, and a
    # 3-node test found all three train shards on one node.
    together = len([n for n in ray.nodes() if n["Alive"]]) == 1
    started: dict[str, list[Any]] = {}
    sets: dict[str, ShardSet] = {}
    try:
        for split, count in splits.items():
            started[split] = start_shards(source, split, count, name, detached)
            if not together:
                placed = gather_shard_set(source, split, started[split])
                sets[split] = respread(placed, name, detached)
                started[split] = sets[split].handles
        for split, handles in started.items():
            if split not in sets:
                sets[split] = gather_shard_set(source, split, handles)
    except BaseException:
        for handles in started.values():
            for handle in handles:
                ray.kill(handle)
        raise
    train, test, val = sets["train"], sets["test"], sets.get("val")
    if train.num_rows == 0:
        for shard_set in sets.values():
            shard_set.release()
        raise KilnError(
            f"{source.uri} gave no training rows. Lower --test-fraction/--val-fraction."
        )
    return Dataset(name, train, test, val, owned=not detached)


def find_dataset_actors(name: str) -> dict[str, list[str]]:
    """Actor names of a named dataset, by split, in shard order."""
    prefix = f"{DATASET_PREFIX}:{name}:"
    found: dict[str, list[tuple[int, str]]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(prefix):
            _, _, split, index = entry["name"].split(":")
            found.setdefault(split, []).append((int(index), entry["name"]))
    return {split: [n for _, n in sorted(items)] for split, items in found.items()}


def attach_dataset(name: str) -> Dataset | None:
    """The named dataset loaded earlier by `kiln data load`, or None if there is none."""
    names = find_dataset_actors(name)
    if not names:
        return None
    sets: dict[str, ShardSet] = {}
    for split, actor_names in names.items():
        handles = [ray.get_actor(n, namespace=NAMESPACE) for n in actor_names]
        source = cast(SourceSpec, ray.get(handles[0].source_spec.remote()))
        sets[split] = gather_shard_set(source, split, handles, started=True)
    return Dataset(name, sets["train"], sets["test"], sets.get("val"), owned=False)


def describe_dataset(name: str) -> dict[str, list[dict[str, Any]]]:
    """Each actor's `describe()` of a named dataset, by split in shard order ({}: none)."""
    return {
        split: ray.get([ray.get_actor(n, namespace=NAMESPACE).describe.remote() for n in actors])
        for split, actors in find_dataset_actors(name).items()
    }


def list_datasets() -> list[dict[str, Any]]:
    """Every named dataset with its URI, shards, rows and bytes per split (text datasets:
    documents and tokens per split, `kiln.actors.text.text_dataset_summary`)."""
    from kiln.actors.text import (  # kiln.actors.text imports this module
        TEXT_SPLIT,
        text_dataset_summary,
    )

    names = {n.split(":")[1] for n in _dataset_actor_names()}
    out = []
    for name in sorted(names):
        described = describe_dataset(name)
        if TEXT_SPLIT in described:
            out.append(text_dataset_summary(name, described[TEXT_SPLIT]))
            continue
        train = described.get("train", [])
        out.append(
            {
                "name": name,
                "uri": train[0]["uri"] if train else None,
                "shards": len(train),
                "rows": {split: sum(d["rows"] for d in ds) for split, ds in described.items()},
                "bytes": sum(d["bytes"] for ds in described.values() for d in ds),
            }
        )
    return out


def _dataset_actor_names() -> list[str]:
    return [
        e["name"]
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["namespace"] == NAMESPACE and e["name"].startswith(f"{DATASET_PREFIX}:")
    ]


def drop_dataset(name: str) -> int:
    """Kill a named dataset's actors; returns how many there were."""
    actor_names = [n for names in find_dataset_actors(name).values() for n in names]
    for actor in actor_names:
        ray.kill(ray.get_actor(actor, namespace=NAMESPACE), no_restart=True)
    return len(actor_names)
