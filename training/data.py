"""The in-memory layout of a shard and its conversion to numpy.

A shard is a list of Arrow record batches with three columns: `row_id` (int64, the row's
position in the source, for coverage checks), `features` (fixed_size_list<float32>[F], so a
batch's features are one contiguous buffer) and `label`. Reading features back is zero-copy.

No torch here: the ShardStore actors import this module, and every megabyte a shard's process
imports is paid once per shard for as long as the dataset stays resident.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray

ROW_ID = "row_id"
FEATURES = "features"
LABEL = "label"


def make_batch(row_ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> pa.RecordBatch:
    """Pack rows into the shard layout; x is (N, F) float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    num_features = x.shape[1]
    features = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), num_features)
    return pa.RecordBatch.from_arrays(
        [pa.array(row_ids, pa.int64()), features, pa.array(y)], names=[ROW_ID, FEATURES, LABEL]
    )


def batch_features(batch: pa.RecordBatch) -> np.ndarray:
    """(N, F) float32 view of a batch's features, without copying."""
    column = batch.column(FEATURES)
    num_features = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=True)
    return flat.reshape(-1, num_features)


def batches_to_arrays(batches: list[pa.RecordBatch]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """row_ids (N,), features (N, F) and labels (N,) of a list of shard batches."""
    if not batches:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros(0)
    row_ids = np.concatenate([b.column(ROW_ID).to_numpy() for b in batches])
    labels = np.concatenate([b.column(LABEL).to_numpy() for b in batches])
    if len(batches) == 1:
        return row_ids, batch_features(batches[0]), labels
    return row_ids, np.concatenate([batch_features(b) for b in batches]), labels


def encode_labels(labels: np.ndarray, classes: list) -> np.ndarray:
    """Class indices 0..K-1 for labels drawn from `classes` (sorted)."""
    return np.searchsorted(np.asarray(classes), labels).astype(np.int64)


def fetch_shard_batches(handle: Any, attempts: int = 5) -> list:
    """A shard's record batches through its ObjectRefs, surviving a restart of its actor.

    If the ShardStore died after handing out refs, those objects died with it (it owned
    them): ask the restarted actor, which reloaded its shard from the source, for new refs.
    """
    for attempt in range(attempts):
        refs = ray.get(handle.batch_refs.remote())
        try:
            return ray.get(refs)
        except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError):
            if attempt == attempts - 1:
                raise
    return []
