"""Acceptance quality of `kiln train` against scikit-learn, on real Ray Train runs."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from actors.shards import attach_dataset, drop_dataset, load_dataset
from actors.sources import SourceSpec
from cluster.pipeline import TrainRequest, train_and_register
from training.config import TrainConfig

pytestmark = pytest.mark.slow


def write_split(path, x, y):
    pq.write_table(pa.table({**{f"f{i}": x[:, i] for i in range(x.shape[1])}, "target": y}), path)


def test_ridge_on_diabetes_matches_sklearn_at_the_same_lambda(
    ray_local, settings_session, registry_session, tmp_path
):
    x, y = load_diabetes(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    write_split(tmp_path / "train.parquet", x_train, y_train)
    write_split(tmp_path / "test.parquet", x_test, y_test)
    l2 = 20.0
    request = TrainRequest(
        data=str(tmp_path / "train.parquet"),
        source=SourceSpec(uri=str(tmp_path / "train.parquet"), label="target", test_fraction=0.0),
        eval_data=str(tmp_path / "test.parquet"),
        train=TrainConfig(model="ridge", workers=2, epochs=60, batch_size=16, lr=0.02, l2=l2),
        name="diabetes-ridge",
    )
    outcome = train_and_register(settings_session, request, registry_session)
    # Kiln standardises features (population std) before the linear layer: compare on the same.
    scaler = StandardScaler().fit(x_train)
    sklearn_r2 = (
        Ridge(alpha=l2)
        .fit(scaler.transform(x_train), y_train)
        .score(scaler.transform(x_test), y_test)
    )
    assert outcome.record.lineage["eval_data"].endswith("test.parquet")
    assert outcome.record.lineage["test_rows"] == len(y_test)
    assert abs(outcome.test_metrics["r2"] - sklearn_r2) <= 0.02, (outcome.test_metrics, sklearn_r2)


def test_logistic_on_breast_cancer_from_a_named_dataset(
    ray_local, settings_session, registry_session
):
    load_dataset(
        SourceSpec(uri="sklearn:breast_cancer", val_fraction=0.1), 2, name="bc", detached=True
    )
    try:
        request = TrainRequest(
            data="bc",
            source=SourceSpec(uri="unused:the-named-dataset-is-used"),
            train=TrainConfig(
                model="logistic", workers=2, epochs=40, batch_size=16, lr=0.01, patience=8
            ),
            name="bc-logistic",
        )
        outcome = train_and_register(settings_session, request, registry_session)
        assert outcome.test_metrics["accuracy"] >= 0.97
        assert outcome.record.lineage["dataset_name"] == "bc"
        assert outcome.record.lineage["dataset_uri"] == "sklearn:breast_cancer"
        assert "val_loss" in outcome.history[-1] and "val_macro_f1" in outcome.history[-1]
        assert attach_dataset("bc") is not None  # the shared shards outlive the run
    finally:
        drop_dataset("bc")


def test_kiln_train_cli_mlp_on_digits(ray_local, tmp_path, monkeypatch, capsys):
    """The CLI end to end, in-process on the session's Ray (the demo test covers a fresh one)."""
    from cluster.cli import main

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    main(
        [
            "train",
            "--data",
            "sklearn:digits",
            "--model",
            "mlp",
            "--epochs",
            "40",
            "--batch-size",
            "32",
            "--lr",
            "0.002",
            "--l2",
            "1",
            "--val-fraction",
            "0",
            "--register",
            "digits-cli",
            "--json",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == "digits-cli" and summary["num_workers"] == 2
    assert summary["metrics"]["accuracy"] >= 0.97
    assert set(summary["metrics"]) >= {"accuracy", "precision", "recall", "macro_f1"}
    assert np.isfinite(summary["elapsed_s"]) and summary["run"].startswith("digits-cli-")
