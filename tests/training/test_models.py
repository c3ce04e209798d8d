"""Models, the L2 objective and metrics: pure torch/numpy, no Ray."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_score, r2_score, recall_score

from kiln.training.errors import KilnError
from kiln.training.losses import l2_penalty, objective, penalized_weights
from kiln.training.metrics import classification_metrics, regression_metrics
from kiln.training.models import build_model


def spec(kind: str, task: str = "classification", num_features: int = 64) -> dict:
    out = {"kind": kind, "task": task, "num_features": num_features}
    if task == "classification":
        out["classes"] = list(range(10))
    return out


@pytest.mark.parametrize(
    "kind,task,out_dim",
    [
        ("mlp", "classification", 10),
        ("logistic", "classification", 10),
        ("cnn", "classification", 10),
        ("ridge", "regression", 1),
        ("linear", "regression", 1),
        ("mlp", "regression", 1),
    ],
)
def test_every_kind_maps_rows_to_outputs(kind, task, out_dim):
    model = build_model(spec(kind, task))
    assert model(torch.randn(5, 64)).shape == (5, out_dim)


def test_bad_specs_are_refused_with_the_fix():
    with pytest.raises(KilnError, match="Use logistic, mlp or cnn"):
        build_model(spec("ridge", "classification"))
    with pytest.raises(KilnError, match="square"):
        build_model(spec("cnn", num_features=10))


def test_l2_penalty_excludes_biases_and_follows_the_design_formula():
    model = build_model(spec("ridge", "regression", num_features=3))
    with torch.no_grad():
        model.body.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        model.body.bias.fill_(100.0)
    names = [n for n, _ in model.named_parameters()]
    assert "body.bias" in names and len(penalized_weights(model)) == 1
    # (λ/2m)·Σθ² with λ=4, m=2: (4/4)·(1+4+9) = 14; the bias (100) is not counted.
    penalty = l2_penalty(model, l2=4.0, num_train_rows=2).detach()
    assert float(penalty) == pytest.approx(14.0)


def test_regression_objective_is_half_mse_plus_penalty():
    model = build_model(spec("ridge", "regression", num_features=2))
    outputs, targets = torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])
    weight_sq = float(model.body.weight.pow(2).sum())
    expected = 0.5 * (1.0 + 4.0) / 2 + (0.5 / (2 * 10)) * weight_sq
    got = objective(model, outputs, targets, "regression", l2=0.5, num_train_rows=10)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    got = classification_metrics(y_true, y_pred, 4)
    assert got["accuracy"] == pytest.approx(np.mean(y_true == y_pred))
    assert got["precision"] == pytest.approx(precision_score(y_true, y_pred, average="macro"))
    assert got["recall"] == pytest.approx(recall_score(y_true, y_pred, average="macro"))
    assert got["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_regression_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    y_true = rng.normal(size=100)
    y_pred = y_true + rng.normal(scale=0.3, size=100)
    got = regression_metrics(y_true, y_pred)
    assert got["r2"] == pytest.approx(r2_score(y_true, y_pred))
    assert got["mse"] == pytest.approx(np.mean((y_true - y_pred) ** 2))
