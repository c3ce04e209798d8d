"""The convex models at their defaults against scikit-learn, on real Ray (issue 12).

Splits come from several seeds that the code under test does not see; the comparison is with
the settings a user would type (`--model ridge --l2 λ`, `--model logistic`), no optimiser flags.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from sklearn.linear_model import LogisticRegression, Ridge, RidgeCV
from sklearn.metrics import log_loss
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from kiln.actors.registry import read_verified_files
from kiln.actors.sources import SourceSpec
from kiln.pipeline import train_and_register
from kiln.requests import SweepRequest, TrainRequest
from kiln.training.artifacts import model_from_files
from kiln.training.config import TrainConfig
from kiln.training.evaluate import predict_outputs, softmax
from kiln.tune_pipeline import tune_and_register
from kiln.tuning.config import SweepConfig
from kiln.tuning.space import SearchSpace, default_l2_range

# Seed 0 runs in `make test`; the other splits in `make test-slow` (each fit loads its shards
# into fresh actors, which a loaded 2-core machine starts slowly).
SEEDS = (0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow))


def write_split(path, x, y) -> str:
    columns = {f"f{i}": x[:, i] for i in range(x.shape[1])}
    pq.write_table(pa.table({**columns, "target": y}), path)
    return str(path)


def split_files(tmp_path, loader, seed):
    x, y = loader(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed)
    train = write_split(tmp_path / f"train{seed}.parquet", x_train, y_train)
    test = write_split(tmp_path / f"test{seed}.parquet", x_test, y_test)
    return (x_train, x_test, y_train, y_test), train, test


def train_request(train: str, test: str, name: str, **options) -> TrainRequest:
    return TrainRequest(
        data=train,
        # The CLI's defaults: a validation share is held out unless the solver needs none.
        source=SourceSpec(uri=train, label="target", test_fraction=0.0, val_fraction=0.1),
        eval_data=test,
        train=TrainConfig(**options),
        name=name,
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_exact_ridge_equals_sklearn_at_every_lambda(
    seed, ray_local, settings_session, registry_session, tmp_path
):
    (x_train, x_test, y_train, y_test), train, test = split_files(tmp_path, load_diabetes, seed)
    scaler = StandardScaler().fit(x_train)
    for l2 in (0.0, 0.05, 1.0, 20.0):
        request = train_request(train, test, f"ridge-{seed}", model="ridge", l2=l2)
        outcome = train_and_register(settings_session, request, registry_session)
        sklearn_r2 = (
            Ridge(alpha=l2)
            .fit(scaler.transform(x_train), y_train)
            .score(scaler.transform(x_test), y_test)
        )
        assert abs(outcome.test_metrics["r2"] - sklearn_r2) <= 1e-4, (l2, outcome.test_metrics)
        assert outcome.solver == "exact" and outcome.converged
        lineage = outcome.record.lineage
        assert lineage["solver"] == "exact" and lineage["train_rows"] == len(y_train)
        assert outcome.epochs_run == 0  # no Ray Train run
    for l2 in (0.01, 0.05):  # λ on standardised features vs alpha on raw ones (docs/commands.md)
        request = train_request(train, test, f"ridge-{seed}", model="ridge", l2=l2)
        outcome = train_and_register(settings_session, request, registry_session)
        raw_r2 = Ridge(alpha=l2).fit(x_train, y_train).score(x_test, y_test)
        assert abs(outcome.test_metrics["r2"] - raw_r2) <= 0.01, (l2, outcome.test_metrics)


@pytest.mark.parametrize(
    "loader,seed",
    [(load_breast_cancer, 0), (load_breast_cancer, 1), (load_wine, 0), (load_wine, 2)],
)
def test_logistic_at_its_defaults_matches_sklearn(
    loader, seed, ray_local, settings_session, registry_session, tmp_path
):
    (x_train, x_test, y_train, y_test), train, test = split_files(tmp_path, loader, seed)
    outcome = train_and_register(
        settings_session,
        train_request(train, test, "logistic", model="logistic"),
        registry_session,
    )
    assert outcome.solver == "lbfgs" and outcome.converged and outcome.warning is None
    # λ = 1 by default; Kiln's softmax has a weight row per class, so λ ↔ C = 1/λ with three
    # or more classes and C = 2/λ with two (docs/commands.md: "λ and scikit-learn").
    classes = len(np.unique(y_train))
    scaler = StandardScaler().fit(x_train)
    reference = LogisticRegression(C=2.0 if classes == 2 else 1.0, tol=1e-10, max_iter=10_000)
    reference.fit(scaler.transform(x_train), y_train)
    sklearn_accuracy = reference.score(scaler.transform(x_test), y_test)
    sklearn_loss = log_loss(y_test, reference.predict_proba(scaler.transform(x_test)))

    files = read_verified_files(settings_session.storage_uri, outcome.record)
    model, spec = model_from_files(files)
    probabilities = softmax(predict_outputs(model, x_test.astype(np.float32)))
    kiln_loss = log_loss(y_test, probabilities, labels=spec["classes"])
    assert abs(outcome.test_metrics["accuracy"] - sklearn_accuracy) <= 0.005
    assert abs(kiln_loss - sklearn_loss) <= 0.01 * sklearn_loss, (kiln_loss, sklearn_loss)


def path_sweep(train: str, test: str, model: str, val_fraction: float, name: str) -> SweepRequest:
    """`kiln tune --model MODEL` with its defaults on a train file, evaluated on a test file."""
    base = TrainConfig(model=model, workers=1)
    return SweepRequest(
        data=train,
        source=SourceSpec(uri=train, label="target", test_fraction=0.0, val_fraction=val_fraction),
        eval_data=test,
        train=base,
        sweep=SweepConfig(space=SearchSpace.from_dict({"l2": default_l2_range(base)})),
        name=name,
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_ridge_sweep_reaches_ridgecv(seed, ray_local, settings_session, registry_session, tmp_path):
    (x_train, x_test, y_train, y_test), train, test = split_files(tmp_path, load_diabetes, seed)
    request = path_sweep(train, test, "ridge", 0.15, f"ridge-path-{seed}")
    outcome = tune_and_register(settings_session, request, registry_session)
    reference = RidgeCV(alphas=np.logspace(-4, 2, 50)).fit(x_train, y_train).score(x_test, y_test)
    assert abs(outcome.test_metrics["r2"] - reference) <= 0.005, (outcome.test_metrics, reference)
    assert outcome.extra["searched"] == ["l2"] and outcome.extra["solver"] == "exact"
    assert any("learning rate is not searched" in n for n in outcome.extra["notes"])
    assert len(outcome.trials) > 50 and outcome.record.lineage["train_rows"] == len(y_train)
    for key in ("csv", "heatmap", "curves"):
        assert outcome.artifacts[key].endswith((".csv", ".png"))
    rows = open(outcome.artifacts["csv"]).read().splitlines()
    assert len(rows) == len(outcome.trials) + 1 and rows[0].startswith("trial_id,l2,best_loo_mse")


@pytest.mark.slow
def test_logistic_sweep_picks_lambda_on_validation_rows(
    ray_local, settings_session, registry_session, tmp_path
):
    (x_train, x_test, y_train, y_test), train, test = split_files(tmp_path, load_wine, 1)
    request = path_sweep(train, test, "logistic", 0.2, "wine-path")
    outcome = tune_and_register(settings_session, request, registry_session)
    assert outcome.extra["solver"] == "lbfgs" and outcome.extra["converged"]
    losses = [t.best for t in outcome.trials]
    assert outcome.best.best == min(losses) and max(losses) > 1.5 * min(losses)
    assert outcome.test_metrics["accuracy"] >= 0.94


@pytest.mark.slow  # about 30-60 s: `make test` keeps to about 10 minutes
def test_cli_train_epochs_1_says_it_did_not_converge(ray_local, tmp_path, monkeypatch, capsys):
    from kiln.cli import main

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    main(["train", "--data", "sklearn:iris", "--model", "mlp", "--epochs", "1", "--json"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["converged"] is False and summary["final_rel_loss_change"] is None
    assert "raise --epochs" in captured.err
