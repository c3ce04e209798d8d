"""How many training shards a convex fit loads (pure logic: no Ray)."""

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from kiln.actors.sources import SKLEARN_MAX_ROWS, SourceSpec, source_rows
from kiln.resident import ROWS_PER_CONVEX_SHARD, convex_shards


def test_source_rows_without_reading_rows(tmp_path):
    assert source_rows(SourceSpec(uri="synthetic:regression?rows=1234&features=3")) == 1234
    assert source_rows(SourceSpec(uri="sklearn:wine")) == SKLEARN_MAX_ROWS
    table = pa.table({"x": list(range(7)), "y": [0.5] * 7})
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(table, folder / "a.parquet")
    pq.write_table(table.slice(0, 3), folder / "b.parquet")
    assert source_rows(SourceSpec(uri=str(folder))) == 10
    pacsv.write_csv(table, tmp_path / "t.csv")
    assert source_rows(SourceSpec(uri=str(tmp_path / "t.csv"))) is None  # would need a scan


def test_built_in_sets_fit_the_bound():
    from sklearn import datasets

    assert datasets.load_digits().data.shape[0] == SKLEARN_MAX_ROWS  # the largest of them


@pytest.mark.parametrize(
    ("uri", "most", "expected"),
    [
        ("sklearn:diabetes", 2, 1),
        ("sklearn:digits", 4, 1),
        (f"synthetic:regression?rows={ROWS_PER_CONVEX_SHARD}", 4, 1),
        (f"synthetic:regression?rows={ROWS_PER_CONVEX_SHARD + 1}", 4, 2),
        ("synthetic:regression?rows=5000000", 4, 4),
        ("synthetic:regression?rows=5000000", 2, 2),
    ],
)
def test_one_shard_per_quarter_million_rows_at_most_workers(uri, most, expected):
    assert convex_shards(SourceSpec(uri=uri), most) == expected


def test_unknown_row_count_keeps_workers(tmp_path):
    pacsv.write_csv(pa.table({"x": [1, 2], "y": [0, 1]}), tmp_path / "t.csv")
    assert convex_shards(SourceSpec(uri=str(tmp_path / "t.csv")), 3) == 3
