"""The in-memory layout of a shard and its conversion to numpy.

A shard is a list of Arrow record batches: `row_id` (int64, the row's position in the source,
for coverage checks), `features` (fixed_size_list<float32>[F] of the numeric inputs, NaN where
missing, so a batch's numbers are one contiguous buffer), one `cat:<name>` column per
categorical input (dictionary-encoded canonical strings, null where missing) and `label`.
Reading the numbers back is zero-copy; a table with categorical inputs builds each batch's
model inputs (`batch_inputs`) once per reader.

No torch here: the ShardStore actors import this module, and every megabyte a shard's process
imports is paid once per shard for as long as the dataset stays resident.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from kiln.training.tabular import NUMERIC, Encoding

ROW_ID = "row_id"
FEATURES = "features"
LABEL = "label"
CATEGORY_PREFIX = "cat:"


def make_batch(
    row_ids: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    categorical: dict[str, pa.Array] | None = None,
) -> pa.RecordBatch:
    """Pack rows into the shard layout; x is (N, F) float32 (the numeric inputs), and each
    categorical input a canonical-string array (stored dictionary-encoded)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    num_features = x.shape[1]
    features = pa.FixedSizeListArray.from_arrays(arrow_of(x.reshape(-1)), num_features)
    arrays = [arrow_of(np.asarray(row_ids, dtype=np.int64)), features]
    names = [ROW_ID, FEATURES]
    for name, values in (categorical or {}).items():
        arrays.append(pc.dictionary_encode(values))
        names.append(CATEGORY_PREFIX + name)
    arrays.append(arrow_of(y))
    names.append(LABEL)
    return pa.RecordBatch.from_arrays(arrays, names=names)


NUMPY_OF_ARROW = {
    pa.float64(): np.float64,
    pa.float32(): np.float32,
    pa.int64(): np.int64,
    pa.int32(): np.int32,
    pa.int16(): np.int16,
    pa.int8(): np.int8,
    pa.uint64(): np.uint64,
    pa.uint32(): np.uint32,
    pa.uint16(): np.uint16,
    pa.uint8(): np.uint8,
}

ARROW_OF_NUMPY = {np.dtype(v): k for k, v in NUMPY_OF_ARROW.items()}


def numpy_of(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """`values.to_numpy(zero_copy_only=False)` for numbers and booleans, read from the Arrow
    buffers: pyarrow's own conversion imports pandas on its first call (measured: 0.5 s of CPU
    in every process, the driver and each ShardStore). Floats' nulls become NaN as there; a
    view (read-only) where no copy is needed; other types go through pyarrow."""
    if isinstance(values, pa.ChunkedArray):
        if values.num_chunks == 1:
            values = values.chunk(0)
        elif values.num_chunks > 1:
            return np.concatenate([numpy_of(chunk) for chunk in values.chunks])
        else:
            return values.to_numpy()
    kind = values.type
    if pa.types.is_boolean(kind) and values.null_count == 0:
        return numpy_of(values.cast(pa.uint8())).astype(bool)
    dtype = NUMPY_OF_ARROW.get(kind)
    if dtype is None or (values.null_count and not pa.types.is_floating(kind)):
        return values.to_numpy(zero_copy_only=False)
    if values.null_count:
        values = values.fill_null(float("nan"))
    width = np.dtype(dtype).itemsize
    buffer = values.buffers()[1]
    return np.frombuffer(buffer, dtype=dtype, count=len(values), offset=values.offset * width)


def arrow_of(values: np.ndarray) -> pa.Array:
    """`pa.array(values)` for a 1-D numeric array, over its buffer (no copy once contiguous):
    `pa.array` imports pandas on its first call, as `numpy_of` says. NaN stays NaN (not null),
    as there; other arrays go through `pa.array`."""
    kind = ARROW_OF_NUMPY.get(values.dtype)
    if kind is None or values.ndim != 1:
        return pa.array(values)
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])


def batch_labels(batch: pa.RecordBatch) -> np.ndarray:
    """A batch's labels: numbers without a copy, strings as an object array."""
    return numpy_of(batch.column(LABEL))


def batch_categories(batch: pa.RecordBatch, name: str) -> tuple[list[str | None], np.ndarray]:
    """(dictionary, indices) of a categorical input; index -1 where the value is missing."""
    column = batch.column(CATEGORY_PREFIX + name)
    indices = numpy_of(column.indices.fill_null(-1)).astype(np.int64)
    return column.dictionary.to_pylist(), indices


def batch_inputs(batch: pa.RecordBatch, encoding: Encoding | None) -> np.ndarray:
    """A batch's raw model inputs (N, num_inputs): the numeric features as they are stored
    (a zero-copy view) when every input is numeric, else numbers and category slots in the
    encoding's (table) order."""
    numbers = batch_features(batch)
    if encoding is None or encoding.all_numeric:
        return numbers
    out = np.empty((batch.num_rows, encoding.num_inputs), dtype=np.float32)
    numeric_at = 0
    for position, column in enumerate(encoding.inputs):
        if column.kind == NUMERIC:
            out[:, position] = numbers[:, numeric_at]
            numeric_at += 1
            continue
        dictionary, indices = batch_categories(batch, column.name)
        # One slot per dictionary entry, then a gather; the last entry is the missing slot.
        slots = np.append(encoding.dictionary_slots(position, dictionary), column.missing_slot)
        out[:, position] = slots[indices]
    return out


def batch_features(batch: pa.RecordBatch) -> np.ndarray:
    """(N, F) float32 view of a batch's features, without copying."""
    column = batch.column(FEATURES)
    num_features = column.type.list_size
    flat = numpy_of(column.flatten())
    return flat.reshape(-1, num_features)


def batches_to_arrays(
    batches: list[pa.RecordBatch], encoding: Encoding | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """row_ids (N,), model inputs (N, R) and labels (N,) of a list of shard batches
    (R: the numeric features without an encoding)."""
    if not batches:
        width = encoding.num_inputs if encoding is not None else 0
        return np.zeros(0, np.int64), np.zeros((0, width), np.float32), np.zeros(0)
    row_ids = np.concatenate([numpy_of(b.column(ROW_ID)) for b in batches])
    labels = np.concatenate([batch_labels(b) for b in batches])
    if len(batches) == 1:
        return row_ids, batch_inputs(batches[0], encoding), labels
    return row_ids, np.concatenate([batch_inputs(b, encoding) for b in batches]), labels


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


OTHER_CATEGORY = "\x00other"
"""A value no categorical input keeps: it reads as the input's `other` slot."""


def inputs_to_batch(
    x: np.ndarray, labels: list[Any], encoding: Encoding | None, first_row_id: int = 0
) -> pa.RecordBatch:
    """Raw model inputs (N, num_inputs; category slots for categorical inputs, as serving
    logs them) and labels back into the shard layout, so Train workers read them like a
    ShardStore's rows (`kiln retrain`'s feedback). The inverse of `batch_inputs`."""
    row_ids = np.arange(first_row_id, first_row_id + len(x), dtype=np.int64)
    y = pa.array(labels)
    if encoding is None or encoding.all_numeric:
        return make_batch(row_ids, x, y.to_numpy(zero_copy_only=False))
    numeric = [i for i, c in enumerate(encoding.inputs) if c.kind == NUMERIC]
    categorical: dict[str, pa.Array] = {}
    for position, column in enumerate(encoding.inputs):
        if column.kind == NUMERIC:
            continue
        names = [*column.categories, OTHER_CATEGORY, None]  # slot -> value; last: missing
        slots = np.clip(x[:, position].astype(np.int64), 0, len(names) - 1)
        categorical[column.name] = pa.array([names[s] for s in slots.tolist()], pa.string())
    return make_batch(row_ids, x[:, numeric], y.to_numpy(zero_copy_only=False), categorical)
