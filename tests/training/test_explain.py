"""Attributions without Ray: Captum's integrated gradients are complete on a trained MLP, equal
wᵢ·(xᵢ − baselineᵢ) on linear models (and rank the features that matter first), and a table
model's categorical input is attributed as the module docstring says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from kiln.training.errors import KilnError
from kiln.training.explain import (
    FEATURE_ABLATION,
    GAUSSIAN_SAMPLE,
    GRADIENT_SHAP,
    INTEGRATED_GRADIENTS,
    REFERENCE_SAMPLE,
    TRAINING_MEAN,
    ExplainConfig,
    FeatureSpace,
    completeness_gap,
    explain_rows,
    gaussian_baselines,
    training_mean,
)
from kiln.training.linear import CrossMoments, Scaling, raw_weights, solve_ridge, standard_system
from kiln.training.models import build_model, linear_model, set_standardization
from kiln.training.tabular import Encoding

SEEDS = [0, 1, 2]


def digits_mlp(seed: int) -> tuple[torch.nn.Module, dict, np.ndarray]:
    """An MLP trained for a few hundred steps on digits (about 1 s), and its held-out rows."""
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    train, test = order[:1400], order[1400:]
    std = x[train].std(0)
    spec = {
        "kind": "mlp",
        "task": "classification",
        "num_features": 64,
        "classes": list(range(10)),
        "hidden": [32],
        "mean": x[train].mean(0).tolist(),
        "std": np.where(std < 1e-6, 1.0, std).tolist(),
    }
    torch.manual_seed(seed)
    model = build_model(spec)
    set_standardization(model, spec)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _ in range(300):
        batch = torch.from_numpy(rng.choice(len(train), 64))
        loss = torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval(), spec, x[test]


@pytest.mark.parametrize("seed", SEEDS)
def test_integrated_gradients_are_complete_within_one_percent_on_a_trained_mlp(seed):
    model, spec, rows = digits_mlp(seed)
    explanations = explain_rows(model, spec, rows[:20], ExplainConfig())  # the defaults
    gaps = completeness_gap(model, spec, rows[:20], explanations)
    assert gaps.max() < 0.01, gaps
    assert all(
        e.baseline == TRAINING_MEAN and e.method == INTEGRATED_GRADIENTS for e in explanations
    )
    # The default target is the predicted class, and the delta Captum reports is the same gap.
    with torch.no_grad():
        predicted = model(torch.from_numpy(rows[:20])).argmax(1).tolist()
    assert [e.target for e in explanations] == predicted
    assert max(abs(e.convergence_delta) for e in explanations) < 0.01 * max(
        abs(sum(e.attributions)) for e in explanations
    )


def test_too_few_steps_show_in_the_gap_and_the_delta():
    """The completeness check can fail: 2 steps through a ReLU net leave a visible gap."""
    model, spec, rows = digits_mlp(0)
    rough = explain_rows(model, spec, rows[:20], ExplainConfig(n_steps=2))
    fine = explain_rows(model, spec, rows[:20], ExplainConfig(n_steps=50))
    gap_rough = completeness_gap(model, spec, rows[:20], rough)
    gap_fine = completeness_gap(model, spec, rows[:20], fine)
    assert gap_rough.mean() > 3 * gap_fine.mean()
    assert max(abs(e.convergence_delta) for e in rough) > max(
        abs(e.convergence_delta) for e in fine
    )


# ------------------------------------------------------------------------- linear models


def sparse_regression(seed: int, rows: int = 600) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """y depends on 3 of 8 features (of different scales); the rest are noise."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.5, 20.0, size=8)
    x = rng.normal(loc=rng.uniform(-5, 5, size=8), scale=scales, size=(rows, 8))
    true = sorted(rng.choice(8, size=3, replace=False).tolist())
    y = 100.0 + sum(rng.choice([-1, 1]) * 3.0 / scales[f] * x[:, f] for f in true)
    return x.astype(np.float32), (y + rng.normal(scale=0.05, size=rows)).astype(np.float64), true


def ridge_model(x: np.ndarray, y: np.ndarray):
    """Kiln's exact ridge (λ = 0) in a KilnModel, and its raw-space weights."""
    scaling = Scaling(x.mean(0), x.std(0), float(y.mean()), float(y.std()))
    w, b = solve_ridge(standard_system(CrossMoments.from_arrays(x, y), scaling), 0.0)
    spec = {
        "kind": "linear",
        "task": "regression",
        "num_features": x.shape[1],
        "mean": scaling.mean.tolist(),
        "std": scaling.std.tolist(),
        "target_mean": scaling.target_mean,
        "target_std": scaling.target_std,
    }
    a, _ = raw_weights(w, b, scaling)
    return linear_model(spec, w, b), spec, a


@pytest.mark.parametrize("method", [INTEGRATED_GRADIENTS, FEATURE_ABLATION])
@pytest.mark.parametrize("seed", SEEDS)
def test_linear_attributions_are_weight_times_distance_from_the_mean(seed, method):
    x, y, true = sparse_regression(seed)
    model, spec, a = ridge_model(x, y)
    rows = x[:10]
    explanations = explain_rows(model, spec, rows, ExplainConfig(method=method))
    got = np.asarray([e.attributions for e in explanations])
    expected = a * (rows - x.mean(0))  # wᵢ·(xᵢ − baselineᵢ), the baseline the training mean
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    # The features y depends on rank first, by mean |attribution| over the rows.
    ranking = np.argsort(-np.abs(got).mean(axis=0))
    assert sorted(ranking[:3].tolist()) == true
    assert all(e.target is None for e in explanations)


@pytest.mark.parametrize("seed", SEEDS)
def test_logistic_attributions_of_the_target_logit_match_sklearn_weights(seed):
    """scikit-learn's LogisticRegression() at its defaults, the weights put in a KilnModel."""
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))[:800]
    x, y = x[idx].astype(np.float32), y[idx]
    std = np.where(x.std(0) < 1e-6, 1.0, x.std(0))
    clf = LogisticRegression(max_iter=2000).fit((x - x.mean(0)) / std, y)
    spec = {
        "kind": "logistic",
        "task": "classification",
        "num_features": 64,
        "classes": clf.classes_.tolist(),
        "mean": x.mean(0).tolist(),
        "std": std.tolist(),
    }
    model = linear_model(spec, clf.coef_, clf.intercept_)
    target = int(clf.classes_[3])
    explanations = explain_rows(model, spec, x[:5], ExplainConfig(target=target))
    got = np.asarray([e.attributions for e in explanations])
    expected = clf.coef_[3] / std * (x[:5] - x.mean(0))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    assert {e.target for e in explanations} == {target}


# ---------------------------------------------------------------------- table models

CITIES = ["lima", "paris", "tokyo"]
TABLE = {
    "kind": "logistic",
    "task": "classification",
    "num_features": 7,
    "classes": ["no", "yes"],
    "inputs": [
        {
            "name": "age",
            "kind": "numeric",
            "type": "double",
            "impute": 40.0,
            "indicator": True,
            "missing_count": 10,
        },
        {
            "name": "city",
            "kind": "categorical",
            "type": "string",
            "categories": CITIES,
            "counts": [50, 30, 15],
            "other_count": 3,
            "missing_count": 2,
        },
    ],
    # age 0, age_missing 1, city 2-6 (lima, paris, tokyo, other, missing)
    "mean": [40.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],
    "std": [10.0, 0.3, 1.0, 1.0, 1.0, 1.0, 1.0],
}
TABLE_WEIGHT = np.array([[0.0] * 7, [0.5, 0.8, 1.0, -2.0, 0.5, 0.0, 0.3]], dtype=np.float32)


def table_model():
    return linear_model(TABLE, TABLE_WEIGHT, np.zeros(2))


def test_the_baseline_is_the_training_mean_of_every_encoded_feature():
    mean = training_mean(TABLE)
    np.testing.assert_allclose(mean[:2], [40.0, 0.1])
    np.testing.assert_allclose(mean[2:], [0.5, 0.3, 0.15, 0.03, 0.02])  # category shares
    space = FeatureSpace.from_spec(TABLE)
    assert space.input_names == ["age", "city"]
    assert space.owner.tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_a_categorical_input_is_attributed_against_the_training_mix_of_categories():
    encoding = Encoding.from_spec(TABLE)
    rows = [{"age": 50, "city": "paris"}, {"city": "tokyo"}, {"age": 20, "city": "oslo"}]
    x = encoding.rows_to_inputs(rows)
    explanations = explain_rows(table_model(), TABLE, x, ExplainConfig(target="yes"))
    got = np.asarray([e.attributions for e in explanations])
    w = TABLE_WEIGHT[1] / np.asarray(TABLE["std"])  # per encoded feature
    z = encoding.expand(x)
    mean = training_mean(TABLE)
    per_feature = w * (z - mean)
    np.testing.assert_allclose(got[:, 0], per_feature[:, :2].sum(1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[:, 1], per_feature[:, 2:].sum(1), rtol=1e-4, atol=1e-6)
    # Paris (weight −2, below the mix) pulls "yes" down; an unseen city counts as "other".
    assert got[0, 1] < 0 and got[2, 1] == pytest.approx(per_feature[2, 2:].sum(), rel=1e-4)
    feature = np.asarray(explanations[0].feature_attributions)
    np.testing.assert_allclose(feature, per_feature[0], rtol=1e-4, atol=1e-6)
    # The missing age: its imputed value adds nothing, its indicator does.
    assert got[1, 0] == pytest.approx(w[0] * (40 - 40) + w[1] * (1 - 0.1), rel=1e-4)
    # Ablation replaces an input's whole group with the mean: the same numbers, linear model.
    ablation = explain_rows(
        table_model(), TABLE, x, ExplainConfig(method=FEATURE_ABLATION, target="yes")
    )
    np.testing.assert_allclose([e.attributions for e in ablation], got, rtol=1e-4, atol=1e-6)
    assert all(e.convergence_delta is None and e.feature_attributions is None for e in ablation)


def test_gradient_shap_uses_the_reference_sample_when_there_is_one():
    x, y, true = sparse_regression(0)
    model, spec, a = ridge_model(x, y)
    reference = x[100:400]
    with_sample = explain_rows(
        model, spec, x[:4], ExplainConfig(method=GRADIENT_SHAP), reference_sample=reference
    )
    assert with_sample[0].baseline == REFERENCE_SAMPLE
    without = explain_rows(model, spec, x[:4], ExplainConfig(method=GRADIENT_SHAP))
    assert without[0].baseline == GAUSSIAN_SAMPLE
    # A linear model: each draw is complete, so the deltas vanish, and the attributions are
    # w·(x − the mean of the drawn baselines), close to w·(x − training mean).
    for explanations in (with_sample, without):
        assert max(abs(e.convergence_delta) for e in explanations) < 1e-3 * np.abs(a).sum()
        got = np.asarray([e.attributions for e in explanations])
        ranking = np.argsort(-np.abs(got).mean(axis=0))
        assert sorted(ranking[:3].tolist()) == true
    # The same request explains the same way (seeded draws).
    again = explain_rows(
        model, spec, x[:4], ExplainConfig(method=GRADIENT_SHAP), reference_sample=reference
    )
    assert [e.attributions for e in again] == [e.attributions for e in with_sample]
    first = np.asarray(with_sample[0].attributions)
    assert not np.allclose(first, without[0].attributions)


def test_gaussian_baselines_draw_whole_categories_by_their_share():
    rows = gaussian_baselines(TABLE, 4000, seed=0)
    one_hot = rows[:, 2:]
    assert set(np.unique(one_hot)) == {0.0, 1.0} and (one_hot.sum(1) == 1).all()
    np.testing.assert_allclose(one_hot.mean(0), [0.5, 0.3, 0.15, 0.03, 0.02], atol=0.02)
    assert rows[:, 0].mean() == pytest.approx(40.0, abs=0.5)
    assert rows[:, 0].std() == pytest.approx(10.0, rel=0.05)


def test_bad_requests_say_what_to_send():
    model, spec, rows = digits_mlp(0)
    with pytest.raises(KilnError, match="Choose one of: integrated_gradients"):
        ExplainConfig(method="lime")
    with pytest.raises(KilnError, match="n_steps"):
        ExplainConfig(n_steps=0)
    with pytest.raises(KilnError, match="not a class of this model"):
        explain_rows(model, spec, rows[:1], ExplainConfig(target="3"))
    x, y, _ = sparse_regression(0)
    ridge, ridge_spec, _ = ridge_model(x, y)
    with pytest.raises(KilnError, match="regressor"):
        explain_rows(ridge, ridge_spec, x[:1], ExplainConfig(target=1))
    quantized = {**spec, "quantization": {"method": "dynamic"}}
    with pytest.raises(KilnError, match="feature_ablation"):
        explain_rows(model, quantized, rows[:1], ExplainConfig())
