"""Small real-looking tables for the tests and the README's example (generated, never
downloaded): customers with numeric, categorical and missing values and a yes/no label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

CITIES = ("paris", "tokyo", "lima")
PLANS = ("basic", "pro")


def customers(rows: int = 2000, seed: int = 0, missing: float = 0.0) -> pa.Table:
    """`age`, `income`, `city`, `plan` and `churn` (yes/no), which depends on all four.

    With `missing` > 0 that share of `age` and `city` cells is empty, and 1% of the labels.
    """
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 80, rows)
    income = np.round(rng.lognormal(10.8, 0.4, rows), 2)
    city = rng.choice(CITIES, rows, p=[0.5, 0.3, 0.2])
    plan = rng.choice(PLANS, rows, p=[0.6, 0.4])
    logit = (
        -0.6
        + 1.8 * (plan == "basic")
        - 0.035 * (age - 45)
        + 0.8 * (city == "lima")
        - 0.5 * (city == "tokyo")
        - 0.9 * (income - 55_000) / 25_000
    )
    churn = np.where(rng.random(rows) < 1 / (1 + np.exp(-logit)), "yes", "no")
    columns = {
        "age": pa.array(age, pa.int64()),
        "income": pa.array(income),
        "city": pa.array(city),
        "plan": pa.array(plan),
        "churn": pa.array(churn),
    }
    if missing > 0:
        for name, values in (("age", age), ("city", city)):
            holes = rng.random(rows) < missing
            columns[name] = pa.array(
                [None if h else v for h, v in zip(holes, values.tolist(), strict=True)]
            )
        holes = rng.random(rows) < 0.01
        columns["churn"] = pa.array(
            [None if h else v for h, v in zip(holes, churn.tolist(), strict=True)]
        )
    return pa.table(columns)


def write_csv(table: pa.Table, path: Path) -> Path:
    pacsv.write_csv(table, str(path))
    return path


def example_csv(path: str, rows: int = 2000, seed: int = 0) -> Path:
    """The README's table: the customers with 10% gaps and a `customer_id` in front."""
    table = customers(rows, seed=seed, missing=0.1)
    table = table.add_column(0, "customer_id", pa.array(np.arange(1, rows + 1)))
    return write_csv(table, Path(path))
