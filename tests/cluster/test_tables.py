"""Real tables on real Ray: a customers CSV with string labels, categorical columns and
missing values, trained at `kiln train`'s defaults, compared with scikit-learn on the same
split, served over HTTP with features by name."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from kiln.actors.sources import SourceSpec, open_file_dataset, split_rows
from kiln.pipeline import TrainOutcome, train_and_register
from kiln.requests import TrainRequest
from tests.tables import customers, write_csv

FEATURES = ["age", "income", "city", "plan"]


def cli_defaults() -> dict[str, Any]:
    """`kiln train`'s options at their defaults, as a user who types none gets them."""
    from kiln.cli.train import train
    from kiln.options import LM_TRAIN_OPTIONS

    skip = {"resume", "as_json", "address", "home", "storage", *LM_TRAIN_OPTIONS}
    return {
        name: parameter.default
        for name, parameter in inspect.signature(train).parameters.items()
        if name not in skip
    }


def kiln_train(settings, registry, data: Path | str, **options: Any) -> TrainOutcome:
    request = TrainRequest.from_options(**{**cli_defaults(), "data": str(data), **options})
    return train_and_register(settings, request, registry)


def sklearn_score(path: Path, seed: int, label: str = "churn", estimator: Any = None) -> float:
    """`estimator` (default LogisticRegression()) on the same split, with the same columns
    one-hot encoded, mean-imputed (with indicators) and standardised, as a scikit-learn user
    would write it: accuracy for a classifier, R² for a regressor."""
    from sklearn.compose import ColumnTransformer, make_column_selector
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    frame = open_file_dataset(str(path)).to_table().to_pandas()
    frame = frame[frame[label].notna()].reset_index(drop=True)
    y = frame[label].to_numpy()
    spec = SourceSpec(uri=str(path), seed=seed)
    train, test = split_rows(y, spec, "train"), split_rows(y, spec, "test")
    numeric = make_pipeline(SimpleImputer(add_indicator=True), StandardScaler())
    categorical = make_pipeline(
        SimpleImputer(strategy="constant", fill_value="(missing)"),
        OneHotEncoder(handle_unknown="ignore"),
    )
    encode = ColumnTransformer(
        [
            ("num", numeric, make_column_selector(dtype_include="number")),
            ("cat", categorical, make_column_selector(dtype_include=object)),
        ]
    )
    x = frame.drop(columns=[label])
    model = make_pipeline(encode, estimator or LogisticRegression()).fit(x.loc[train], y[train])
    return float(model.score(x.loc[test], y[test]))


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tables")
    return {
        "people": write_csv(customers(2000, seed=21), folder / "people.csv"),
        "holes": write_csv(customers(2000, seed=22, missing=0.1), folder / "holes.csv"),
    }


@pytest.mark.parametrize("table,seed", [("people", 0), ("people", 1), ("holes", 0)])
def test_logistic_at_its_defaults_matches_scikit_learn_on_the_same_split(
    ray_local, settings_session, registry_session, tables, table, seed
):
    outcome = kiln_train(
        settings_session,
        registry_session,
        tables[table],
        model="logistic",
        seed=seed,
        register=f"{table}-logistic-{seed}",
    )
    reference = sklearn_score(tables[table], seed)
    assert abs(outcome.test_metrics["accuracy"] - reference) <= 0.01, (
        outcome.test_metrics,
        reference,
    )
    spec = outcome.record.spec
    assert spec["classes"] == ["no", "yes"]
    assert [c["name"] for c in spec["inputs"]] == FEATURES
    assert outcome.columns["inputs"] == {
        "age": "numeric",
        "income": "numeric",
        "city": "categorical",
        "plan": "categorical",
    }
    schema = outcome.record.lineage["schema"]
    assert schema["label"] == {"name": "churn", "type": "string"}
    if table == "holes":
        holes = customers(2000, seed=22, missing=0.1)
        assert schema["dropped_rows"] == holes.column("churn").null_count > 0
        age = spec["inputs"][0]
        assert age["indicator"] and age["missing_count"] > 0
        assert spec["inputs"][2]["missing_count"] > 0  # empty city cells: their own category


@pytest.mark.parametrize("model", ["ridge", "linear"])
def test_exact_solvers_fit_one_hot_columns_as_scikit_learn_does(
    ray_local, settings_session, registry_session, tables, model
):
    """Regression on a table with categorical inputs: ridge (λ = 1) and linear (λ = 0, the
    complete one-hot blocks are collinear with the intercept: the minimum-norm solution)."""
    from sklearn.linear_model import LinearRegression, Ridge

    outcome = kiln_train(
        settings_session, registry_session, tables["holes"], model=model, label="income",
        register=f"income-{model}",
    )  # fmt: skip
    assert outcome.solver == "exact"
    estimator = Ridge(alpha=1.0) if model == "ridge" else LinearRegression()
    reference = sklearn_score(tables["holes"], 0, label="income", estimator=estimator)
    assert outcome.test_metrics["r2"] == pytest.approx(reference, abs=1e-3)
    assert "churn" in outcome.columns["inputs"]  # the string column is a categorical input


@pytest.fixture(scope="module")
def trained_people(ray_local, settings_session, registry_session, tables) -> TrainOutcome:
    """`kiln train --data people.csv`, no other flag: an MLP (Ray Train, 2 workers)."""
    return kiln_train(settings_session, registry_session, tables["people"], register="people")


def test_no_flags_trains_an_mlp_that_uses_every_column(trained_people, tables):
    spec = trained_people.record.spec
    assert spec["kind"] == "mlp" and [c["name"] for c in spec["inputs"]] == FEATURES
    # Within 2 points of the logistic reference: the target is a logistic model of the four.
    assert trained_people.test_metrics["accuracy"] >= sklearn_score(tables["people"], 0) - 0.02


@pytest.fixture(scope="module")
def served_people(trained_people, settings_session):
    from kiln.serving_control import deploy_models

    return deploy_models(settings_session, [trained_people.record.ref], auth=False)


def test_the_served_model_answers_by_feature_name_even_for_an_unseen_city(served_people):
    instances = [
        {"age": 25, "income": 30000, "city": "lima", "plan": "basic"},
        {"age": 70, "income": 120000, "city": "tokyo", "plan": "pro"},
        {"age": 40, "income": 55000, "city": "oslo", "plan": "basic"},  # never seen
        {"age": 40, "city": "paris"},  # missing keys are missing values
    ]
    response = httpx.post(
        f"{served_people}/v1/models/people:predict", json={"instances": instances}, timeout=30
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert predictions[:2] == ["yes", "no"]  # far on either side of the boundary
    assert set(predictions) <= {"yes", "no"}
    rows = httpx.post(
        f"{served_people}/v1/models/people:predict",
        json={"instances": [[25, 30000, "lima", "basic"]]},
        timeout=30,
    )
    assert rows.status_code == 200 and rows.json()["predictions"] == ["yes"]


@pytest.mark.parametrize(
    "instance,fragment",
    [
        ({"age": 31, "colour": "red"}, '"colour"'),
        ({"age": "31", "city": "lima"}, '"age" takes a number'),
        ({"age": 31, "city": 5}, '"city" takes a string'),
    ],
)
def test_bad_named_instances_get_a_422_naming_the_feature(served_people, instance, fragment):
    response = httpx.post(
        f"{served_people}/v1/models/people:predict", json={"instances": [instance]}, timeout=30
    )
    assert response.status_code == 422 and fragment in response.json()["error"]


def test_v2_metadata_lists_one_input_per_feature(served_people):
    metadata = httpx.get(f"{served_people}/v2/models/people", timeout=30).json()
    assert [(i["name"], i["datatype"]) for i in metadata["inputs"]] == [
        ("age", "FP32"),
        ("income", "FP32"),
        ("city", "BYTES"),
        ("plan", "BYTES"),
    ]
    assert metadata["outputs"][0]["datatype"] == "BYTES"


def test_tritonclient_calls_the_model_with_string_features(served_people):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(served_people.split("://", 1)[1])
    values = {
        "age": np.array([[25.0], [70.0]], dtype=np.float32),
        "income": np.array([[30000.0], [120000.0]], dtype=np.float32),
        "city": np.array([["lima"], ["tokyo"]], dtype=object),
        "plan": np.array([["basic"], ["pro"]], dtype=object),
    }
    inputs = []
    for name, array in values.items():
        tensor = triton.InferInput(
            name, list(array.shape), "BYTES" if array.dtype == object else "FP32"
        )
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer("people", inputs, outputs=[triton.InferRequestedOutput("predictions")])
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("predictions")] == [
        "yes",
        "no",
    ]


def test_rare_categories_share_the_other_slot(
    ray_local, settings_session, registry_session, tables
):
    """--min-category-count: lima (a fifth of the rows, about 320 training rows) is rarer than
    400, so it and every unseen city answer through `other`; the counts say so."""
    outcome = kiln_train(
        settings_session, registry_session, tables["people"], model="logistic",
        min_category_count=400, register="people-rare",
    )  # fmt: skip
    city = outcome.record.spec["inputs"][2]
    assert city["categories"] == ["paris", "tokyo"]
    assert 250 < city["other_count"] < 400 and all(n >= 400 for n in city["counts"])
