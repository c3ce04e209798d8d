"""Acceptance: `kiln tune --model ridge` at its defaults reaches scikit-learn's RidgeCV.

The issue's own example: diabetes, an 80/20 split written to Parquet, `--eval-data` for the test
part, no option but the model. RidgeCV fits on every training row; so does Kiln's registered
model, fitted at the λ that generalised cross-validation chose on those rows."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_diabetes
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import train_test_split

pytestmark = pytest.mark.slow


def write_split(path, x, y):
    pq.write_table(pa.table({**{f"f{i}": x[:, i] for i in range(x.shape[1])}, "target": y}), path)


@pytest.mark.parametrize("seed", [0, 3])
def test_kiln_tune_ridge_at_its_defaults_reaches_ridgecv(
    seed, ray_local, tmp_path, monkeypatch, capsys
):
    from kiln.cli import main

    x, y = load_diabetes(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed)
    write_split(tmp_path / "train.parquet", x_train, y_train)
    write_split(tmp_path / "test.parquet", x_test, y_test)
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    args = ["tune", "--data", str(tmp_path / "train.parquet"), "--label", "target"]
    main([*args, "--eval-data", str(tmp_path / "test.parquet"), "--model", "ridge", "--json"])
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    reference = RidgeCV(alphas=np.logspace(-4, 2, 50)).fit(x_train, y_train).score(x_test, y_test)
    assert abs(result["best_metrics"]["r2"] - reference) <= 0.005, (result, reference)
    assert result["solver"] == "exact" and result["searched"] == ["l2"]
    assert result["converged"] is True and set(result["best_config"]) == {"l2"}
    assert "learning rate is not searched" in captured.err
