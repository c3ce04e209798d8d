"""Real tables without Ray: column types, missing values, categories and their statistics."""

import datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.actors.shards import FeatureStats, ShardSet, batch_stats
from kiln.actors.sources import SourceSpec, check_source, open_shard, plan_columns, table_columns
from kiln.training.config import TrainConfig
from kiln.training.data import batches_to_arrays
from kiln.training.errors import KilnError
from kiln.training.tabular import Encoding
from tests.tables import customers, write_csv


def mixed_table(rows: int = 40) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table(
        {
            "id": np.arange(100, 100 + rows),
            "customer_id": [f"c-{i:05d}" for i in range(rows)],
            "age": rng.integers(18, 80, rows),
            "income": rng.normal(50_000, 9_000, rows),
            "city": rng.choice(["paris", "lima"], rows),
            "member": rng.random(rows) < 0.5,
            "code": rng.integers(1, 4, rows),
            "seen": pa.array([datetime.datetime(2026, 1, 1)] * rows),
            "empty": pa.nulls(rows, pa.float64()),
            "churn": rng.choice(["yes", "no"], rows),
        }
    )


def test_columns_are_classified_once_and_what_is_left_out_is_named():
    table = mixed_table()
    plan = plan_columns(table.schema, SourceSpec(uri="t.parquet"), table)
    assert plan.label == "churn" and plan.label_type == "string"
    assert plan.inputs == (
        ("age", "numeric", "int64"),
        ("income", "numeric", "double"),
        ("city", "categorical", "string"),
        ("member", "categorical", "bool"),
        ("code", "numeric", "int64"),
    )
    assert dict(plan.ignored) == {
        "id": "unique per row",
        "customer_id": "unique per row",
        "seen": "type timestamp[us]",
        "empty": "all missing",
    }
    # --categorical reads integer codes as categories; --features keeps an id on request.
    chosen = SourceSpec(uri="t.parquet", features=("id", "code"), categorical=("code",))
    plan = plan_columns(table.schema, chosen, table)
    assert plan.inputs == (("id", "numeric", "int64"), ("code", "categorical", "int64"))
    assert plan.ignored == ()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"features": ("age", "seen")}, 'Column "seen" of t.parquet is timestamp'),
        ({"features": ("age", "nope")}, 'Got "nope" in --features'),
        ({"categorical": ("nope",)}, 'Got "nope" in --categorical'),
        ({"features": ("age",), "categorical": ("code",)}, "Add it to --features"),
        ({"features": ("age", "churn")}, "it is the label"),
        ({"label": "nope"}, 'Got "nope" for --label'),
    ],
)
def test_bad_column_choices_name_the_column_and_the_fix(kwargs, message):
    table = mixed_table()
    with pytest.raises(KilnError, match=message):
        plan_columns(table.schema, SourceSpec(uri="t.parquet", **kwargs), table)


def test_a_table_with_nothing_usable_says_what_was_left_out(tmp_path):
    table = pa.table({"id": np.arange(50), "y": np.arange(50) % 2})
    pq.write_table(table, tmp_path / "ids.parquet")
    spec = SourceSpec(uri=str(tmp_path / "ids.parquet"))
    with pytest.raises(KilnError, match=r"ignored: id \(unique per row\)"):
        open_shard(spec, "train", 0, 1)


def test_csv_empty_cells_are_missing_and_rows_without_a_label_are_dropped(tmp_path):
    table = customers(500, seed=3, missing=0.1)
    path = write_csv(table, tmp_path / "holes.csv")
    spec = SourceSpec(uri=str(path))
    check_source(spec)
    from kiln.actors.sources import load_file_table

    columns = table_columns(load_file_table(str(path)), spec)
    assert columns.dropped_rows == table.column("churn").null_count > 0
    assert len(columns.labels) == 500 - columns.dropped_rows
    assert set(columns.labels.tolist()) == {"yes", "no"}
    age_holes = table.filter(table.column("churn").is_valid()).column("age").null_count
    assert np.isnan(columns.numeric[:, 0]).sum() == age_holes > 0
    assert columns.categorical[0].null_count > 0  # empty city cells: missing, not ""
    # row ids keep the table's positions, skipping the dropped rows
    kept = np.flatnonzero(table.column("churn").is_valid().to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(columns.row_ids, kept)


def test_missing_error_refuses_naming_the_column_and_the_count(tmp_path):
    table = customers(300, seed=4, missing=0.1).drop_columns(["churn"])
    table = table.append_column("churn", pa.array(["yes", "no"] * 150))
    path = write_csv(table, tmp_path / "holes.csv")
    holes = table.column("age").null_count
    with pytest.raises(KilnError, match=rf'"age" of .* has {holes} missing values'):
        open_shard(SourceSpec(uri=str(path), missing="error"), "train", 0, 1)
    with pytest.raises(KilnError, match='Got "drop" for --missing'):
        SourceSpec(uri=str(path), missing="drop")


def merged_stats(spec: SourceSpec, num_shards: int) -> tuple[FeatureStats, list]:
    stats, batches = None, []
    for index in range(num_shards):
        opened = open_shard(spec, "train", index, num_shards)
        for batch in opened.batches:
            part = batch_stats(batch, opened.plan)
            part.dropped_rows = opened.dropped_rows
            stats = part if stats is None else stats.merge(part)
            batches.append(batch)
    assert stats is not None
    return stats, batches


def test_statistics_with_missing_values_and_categories_merge_exactly(tmp_path):
    path = write_csv(customers(1500, seed=5, missing=0.15), tmp_path / "holes.csv")
    spec = SourceSpec(uri=str(path))
    stats, batches = merged_stats(spec, 3)
    whole, _ = merged_stats(spec, 1)
    _, raw, _ = batches_to_arrays(batches)  # the numeric inputs, NaN where missing
    numbers = raw.astype(np.float64)
    np.testing.assert_allclose(stats.mean, np.nanmean(numbers, axis=0), rtol=1e-9)
    m2 = np.nansum((numbers - np.nanmean(numbers, axis=0)) ** 2, axis=0)
    np.testing.assert_allclose(stats.m2, m2, rtol=1e-7)
    np.testing.assert_array_equal(stats.missing, np.isnan(numbers).sum(axis=0))
    assert stats.categories == whole.categories
    cities = stats.categories[0]
    assert sum(cities.counts.values()) + cities.missing == stats.count
    assert stats.dropped_rows == whole.dropped_rows > 0


def test_encoded_features_equal_scikit_learns_imputed_scaled_one_hot_columns(tmp_path):
    import pandas as pd
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import StandardScaler

    from kiln.pipeline import make_spec

    path = write_csv(customers(800, seed=6, missing=0.1), tmp_path / "holes.csv")
    spec = SourceSpec(uri=str(path), test_fraction=0.0)
    stats, batches = merged_stats(spec, 2)
    model_spec = make_spec(TrainConfig(model="logistic"), ShardSet(spec, "train", [], [], stats))
    encoding = Encoding.from_spec(model_spec)
    assert encoding is not None
    _, raw, _ = batches_to_arrays(batches, encoding)
    z = (encoding.expand(raw) - np.array(model_spec["mean"])) / np.array(model_spec["std"])
    names = encoding.feature_names()
    assert names[:3] == ["age", "age_missing", "income"]
    frame = pd.DataFrame(raw[:, :2], columns=["age", "income"])
    reference = StandardScaler().fit_transform(
        SimpleImputer(add_indicator=True).fit_transform(frame)
    )  # columns: age, income, age's indicator
    np.testing.assert_allclose(z[:, [0, 2, 1]], reference, rtol=1e-4, atol=1e-4)
    city = pd.Series(
        [encoding.inputs[2].feature_names()[int(s)] for s in raw[:, 2]], dtype="string"
    )
    for j, name in enumerate(names):
        if name.startswith("city="):
            np.testing.assert_array_equal(z[:, j], (city == name).to_numpy(dtype=float))
    assert "city=(missing)" in set(city)
