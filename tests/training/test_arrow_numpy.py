"""kiln.training.data's Arrow <-> numpy conversions: the same values as pyarrow's own, without
its pandas import (pure logic, run in a fresh interpreter where pandas matters)."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from kiln.training.data import arrow_of, batch_inputs, batches_to_arrays, make_batch, numpy_of

ARRAYS = [
    pa.array([1.5, None, 3.0]),
    pa.array([1.5, None, 3.0], pa.float32()),
    pa.array([1, 2, 3], pa.int32()),
    pa.array([1, None], pa.int64()),  # an integer null: pyarrow's float with NaN
    pa.array([0, 255], pa.uint8()),
    pa.array([True, False, True]),
    pa.array([True, None]),
    pa.array(["a", None, "b"]),
    pa.array(np.arange(10, dtype=np.float32)).slice(3, 4),  # an offset into the buffer
    pa.chunked_array([[1.0, 2.0], [3.0]]),
    pa.chunked_array([pa.array([1, 2, 3]).slice(1)]),
    pa.chunked_array([], pa.float64()),
]


@pytest.mark.parametrize("values", ARRAYS, ids=lambda a: str(a.type))
def test_numpy_of_equals_pyarrow(values):
    got = numpy_of(values)
    want = (
        values.to_numpy()
        if isinstance(values, pa.ChunkedArray)
        else values.to_numpy(zero_copy_only=False)
    )
    assert got.dtype == want.dtype
    if got.dtype.kind == "f":
        np.testing.assert_array_equal(got, want)  # NaN where pyarrow has NaN
    else:
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize(
    "values",
    [
        np.array([1.0, np.nan], np.float32),
        np.arange(7)[::2],  # not contiguous
        np.array([1, 2], np.int32),
        np.array([3, 4], np.uint16),
        np.array(["a", "b"], object),
        np.array([True, False]),
    ],
    ids=lambda a: str(a.dtype),
)
def test_arrow_of_equals_pyarrow(values):
    got, want = arrow_of(values), pa.array(values)
    assert got.type == want.type
    np.testing.assert_array_equal(numpy_of(got), numpy_of(want))
    assert got.null_count == want.null_count == 0  # NaN stays a value


def test_batches_round_trip():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    batch = make_batch(np.arange(10, 14), x, np.array([0, 1, 0, 1]))
    rows, inputs, labels = batches_to_arrays([batch, batch.slice(1, 2)])
    assert rows.tolist() == [10, 11, 12, 13, 11, 12]
    np.testing.assert_array_equal(inputs, np.vstack([x, x[1:3]]))
    assert labels.tolist() == [0, 1, 0, 1, 1, 0]
    np.testing.assert_array_equal(batch_inputs(batch.slice(2), None), x[2:])


def test_shard_code_never_imports_pandas():
    """A ShardStore's load and reads, in a fresh interpreter: pyarrow's conversions would pull
    in pandas (0.5 s of CPU in every shard process)."""
    code = (
        "import sys\n"
        "from kiln.actors.sources import SourceSpec, open_shard\n"
        "from kiln.actors.shards import batch_stats\n"
        "from kiln.training.data import batches_to_arrays\n"
        "o = open_shard(SourceSpec(uri='sklearn:wine', test_fraction=0.2), 'train', 0, 2)\n"
        "batches = list(o.batches)\n"
        "[batch_stats(b, o.plan) for b in batches]\n"
        "_, x, y = batches_to_arrays(batches)\n"
        "assert len(x) == len(y) > 50\n"
        "print('pandas' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "False"), done.stderr[-2000:]
