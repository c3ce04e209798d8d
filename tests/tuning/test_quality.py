"""Acceptance: a tuned ridge on diabetes matches scikit-learn's RidgeCV on the same split.

RidgeCV fits on every training row; so does Kiln's registered model, refit on train +
validation rows after the sweep has chosen λ on the validation rows (SweepRequest.refit)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_diabetes
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from actors.sources import SourceSpec
from cluster.sweeps import SweepRequest, tune_and_register
from training.config import TrainConfig
from tuning.space import SearchSpace
from tuning.sweep import SweepConfig

pytestmark = pytest.mark.slow


def write_split(path, x, y):
    pq.write_table(pa.table({**{f"f{i}": x[:, i] for i in range(x.shape[1])}, "target": y}), path)


def test_tuned_ridge_on_diabetes_is_within_002_r2_of_ridgecv(
    ray_local, settings_session, registry_session, tmp_path
):
    x, y = load_diabetes(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    write_split(tmp_path / "train.parquet", x_train, y_train)
    write_split(tmp_path / "test.parquet", x_test, y_test)
    request = SweepRequest(
        data=str(tmp_path / "train.parquet"),
        source=SourceSpec(
            uri=str(tmp_path / "train.parquet"), label="target", test_fraction=0.0, val_fraction=0.2
        ),
        eval_data=str(tmp_path / "test.parquet"),
        train=TrainConfig(model="ridge", workers=1, epochs=60, batch_size=16),
        sweep=SweepConfig(
            space=SearchSpace.from_dict({"lr": "5e-3:5e-2", "l2": "0,1e-1:100"}),
            scheduler="asha",
            num_trials=8,
            max_epochs=60,
        ),
        name="diabetes-ridge-tuned",
    )
    outcome = tune_and_register(settings_session, request, registry_session)
    # Kiln standardises features (population std) before the linear layer: compare on the same.
    scaler = StandardScaler().fit(x_train)
    ridge = RidgeCV(alphas=np.logspace(-2, 3, 30)).fit(scaler.transform(x_train), y_train)
    sklearn_r2 = ridge.score(scaler.transform(x_test), y_test)
    assert outcome.record.lineage["refit"]["rows"] == len(x_train)  # all the training rows
    assert abs(outcome.test_metrics["r2"] - sklearn_r2) <= 0.02, (outcome.test_metrics, sklearn_r2)
