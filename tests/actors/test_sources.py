"""Dataset sources, splits and shard slices: pure pyarrow/numpy, no Ray."""

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from kiln.actors import sources
from kiln.actors.sources import SourceSpec, check_source, read_shard, shard_bounds, split_indices
from kiln.training.data import batches_to_arrays
from kiln.training.errors import KilnError


def all_rows(spec: SourceSpec, split: str, num_shards: int):
    parts = [batches_to_arrays(read_shard(spec, split, i, num_shards)) for i in range(num_shards)]
    return parts


@pytest.mark.parametrize("num_rows,num_shards", [(10, 3), (1797, 4), (5, 5), (7, 1)])
def test_shard_bounds_cover_every_row_once_and_balance(num_rows, num_shards):
    bounds = [shard_bounds(num_rows, num_shards, i) for i in range(num_shards)]
    sizes = [stop - start for start, stop in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == num_rows
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(num_shards - 1))
    assert max(sizes) - min(sizes) <= 1


def test_stratified_split_keeps_class_shares_and_is_seeded():
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    train, test = split_indices(y, 0.2, seed=3, stratify=True)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == len(y)
    assert np.bincount(y[test]).tolist() == [20, 10, 6, 4]
    assert np.array_equal(test, split_indices(y, 0.2, seed=3, stratify=True)[1])


def test_sklearn_shards_round_trip_the_dataset():
    from sklearn.datasets import load_digits

    x_all, y_all = load_digits(return_X_y=True)
    spec = SourceSpec(uri="sklearn:digits")
    train = all_rows(spec, "train", 3)
    test = all_rows(spec, "test", 1)
    row_ids = np.concatenate([p[0] for p in train + test])
    assert sorted(row_ids.tolist()) == list(range(len(y_all)))
    for ids, x, y in train + test:
        np.testing.assert_array_equal(x, x_all[ids].astype(np.float32))
        np.testing.assert_array_equal(y, y_all[ids])


def test_synthetic_rows_are_identical_whichever_shard_makes_them():
    spec = SourceSpec(
        uri="synthetic:classification?rows=70000&features=4&classes=3&seed=7", test_fraction=0.1
    )
    one = all_rows(spec, "train", 1)[0]
    three = all_rows(spec, "train", 3)
    np.testing.assert_array_equal(one[0], np.concatenate([p[0] for p in three]))
    np.testing.assert_array_equal(one[1], np.concatenate([p[1] for p in three]))
    assert set(np.unique(one[2])) <= {0, 1, 2} and len(one[0]) == 63000


def test_parquet_and_csv_files_with_chosen_columns(tmp_path):
    table = pa.table(
        {
            "a": [1.0, 2.0, 3.0, 4.0, 5.0],
            "b": [5, 4, 3, 2, 1],
            "name": list("vwxyz"),
            "y": [0, 1, 0, 1, 0],
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    pacsv.write_csv(table, tmp_path / "d.csv")
    for path in ("d.parquet", "d.csv"):
        spec = SourceSpec(uri=str(tmp_path / path), label="y", test_fraction=0.0)
        ids, x, y = batches_to_arrays(read_shard(spec, "train", 0, 1))
        assert x.shape == (5, 2)  # the numeric inputs; "name" is stored as a category column
        np.testing.assert_array_equal(x[:, 0], [1, 2, 3, 4, 5])
        np.testing.assert_array_equal(y, [0, 1, 0, 1, 0])


@pytest.mark.parametrize(
    "uri_name,kwargs,message",
    [
        ("missing.parquet", {}, "does not exist"),
        ("d.parquet", {"label": "nope"}, 'Got "nope" for --label'),
        ("d.parquet", {"features": ("a", "zz")}, 'Got "zz" in --features'),
        ("d.parquet", {"features": ("a", "when")}, "cannot read as a feature"),
        ("empty.parquet", {}, "holds no rows"),
        ("d.txt", {}, "format is unknown"),
    ],
)
def test_bad_file_sources_give_one_clear_error(tmp_path, uri_name, kwargs, message):
    table = pa.table(
        {"a": [1.0, 2.0], "name": ["p", "q"], "when": pa.array([0, 1], pa.date32()), "y": [0, 1]}
    )
    pq.write_table(table, tmp_path / "d.parquet")
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(KilnError, match=message):
        check_source(
            SourceSpec(
                uri=str(tmp_path / uri_name),
                label=kwargs.get("label", "y"),
                features=kwargs.get("features"),
            )
        )


@pytest.mark.parametrize(
    "uri,message",
    [
        ("sklearn:nope", "Built-in sets"),
        ("synthetic:foo", "synthetic:classification"),
        ("synthetic:classification?rows=abc", "Use numbers"),
        ("synthetic:classification?colour=red", 'unknown parameter "colour"'),
    ],
)
def test_bad_builtin_uris_name_the_value(uri, message):
    with pytest.raises(KilnError, match=message):
        check_source(SourceSpec(uri=uri))


@pytest.mark.parametrize("uri", ["sklearn:wine", "synthetic:regression?rows=1000&features=3"])
def test_train_val_test_partition_every_row_exactly_once(uri):
    spec = SourceSpec(uri=uri, test_fraction=0.2, val_fraction=0.25, seed=4)
    ids = {split: all_rows(spec, split, 2) for split in ("train", "val", "test", "all")}
    flat = {split: np.concatenate([p[0] for p in parts]) for split, parts in ids.items()}
    union = np.concatenate([flat["train"], flat["val"], flat["test"]])
    assert sorted(union.tolist()) == sorted(flat["all"].tolist())
    assert len(set(union.tolist())) == len(union)
    assert len(flat["val"]) == pytest.approx(0.25 * (len(flat["train"]) + len(flat["val"])), abs=1)


def test_a_builtin_set_is_cached_once_and_read_back_equal(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    fresh = sources.build_sklearn_table("wine")
    first = sources.load_sklearn("wine")  # builds and writes the cache
    cached = sources.sklearn_cache_path("wine")
    assert cached is not None and cached.is_file() and str(tmp_path) in str(cached)
    assert first.equals(fresh) and sources.load_sklearn("wine").equals(fresh)

    marker = pa.table({"marker": [1]})
    sources.write_table_atomically(marker, cached)
    assert sources.load_sklearn("wine").equals(marker)  # read from the cache, not rebuilt

    cached.write_bytes(b"not an arrow file")  # a damaged cache is rebuilt, not trusted
    assert sources.load_sklearn("wine").equals(fresh)
    assert sources.load_sklearn("wine").equals(fresh)


@pytest.mark.parametrize("seed", range(6))
def test_split_sizes_are_exact_and_every_class_within_one_row_of_its_share(seed):
    rng = np.random.default_rng(100 + seed)
    y = rng.integers(0, 1 + seed, size=int(rng.integers(5, 400)))
    fraction = float(rng.uniform(0.05, 0.6))
    for stratify in (True, False):
        train, test = split_indices(y, fraction, seed, stratify)
        assert len(test) == int(np.ceil(fraction * len(y))) and len(train) + len(test) == len(y)
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))
        if stratify:
            counts, taken = np.bincount(y), np.bincount(y[test], minlength=y.max() + 1)
            assert np.all(np.abs(taken - counts * len(test) / len(y)) < 1.0)
    other = split_indices(y, fraction, seed + 1, True)[1]
    assert len(y) < 10 or not np.array_equal(other, split_indices(y, fraction, seed, True)[1])


def declaring_rows(path, rows: int) -> None:
    """Rewrite a 10-row Parquet file's footer so that it declares `rows` rows (the Thrift
    compact encoding of num_rows = 10 is the bytes 0x16 0x14; its row group's too)."""
    import struct

    table = pa.table({"a": pa.array(range(10), pa.int64()), "y": pa.array([0, 1] * 5)})
    pq.write_table(table, path, compression="none", write_statistics=False)
    raw = path.read_bytes()
    length = struct.unpack("<I", raw[-8:-4])[0]
    footer = raw[-8 - length : -8]
    value, varint = rows << 1, b""  # zigzag, then 7 bits a byte
    while True:
        byte, value = value & 0x7F, value >> 7
        varint += bytes([byte | (0x80 if value else 0)])
        if not value:
            break
    patched = footer.replace(b"\x16\x14", b"\x16" + varint)
    path.write_bytes(raw[: -8 - length] + patched + struct.pack("<I", len(patched)) + b"PAR1")
    assert pq.ParquetFile(path).metadata.num_rows == rows


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "rows,fragment",
    [(10**15, "declares 1,000,000,000,000,000 rows"), (2**40, "declares 1,099,511,627,776")],
)
def test_a_parquet_file_declaring_absurd_rows_gets_one_clear_error(tmp_path, rows, fragment):
    from kiln.actors.sources import load_file_table

    path = tmp_path / "hostile.parquet"
    declaring_rows(path, rows)
    with pytest.raises(KilnError, match=fragment):  # on the driver, before any actor starts
        check_source(SourceSpec(uri=str(path), label="y"))
    with pytest.raises(KilnError, match=fragment):  # and in a shard that reads it
        load_file_table(str(path))
