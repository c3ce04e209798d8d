"""The convex solvers' maths, without Ray: statistics merge exactly, solves equal scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from kiln.training.config import TrainConfig
from kiln.training.convergence import minibatch_convergence
from kiln.training.errors import KilnError
from kiln.training.linear import (
    CrossMoments,
    RidgePath,
    Scaling,
    fit_lbfgs,
    r2_score,
    raw_weights,
    softmax_sums,
    solve_ridge,
    squared_error,
    squared_sums,
    standard_system,
)


def diabetes_parts(cuts=(7, 100, 101, 300)):
    x, y = load_diabetes(return_X_y=True)
    return x, y, np.split(np.arange(len(x)), cuts)


def scaling_of(x, y=None) -> Scaling:
    if y is None:
        return Scaling(x.mean(0), x.std(0))
    return Scaling(x.mean(0), x.std(0), float(y.mean()), float(y.std()))


def test_moments_merged_over_an_uneven_split_equal_the_whole_array():
    x, y, parts = diabetes_parts()
    merged = CrossMoments.empty(x.shape[1])
    for part in reversed(parts):  # any order, empty and one-row parts included
        merged = merged.merge(CrossMoments.from_arrays(x[part], y[part]))
    whole = CrossMoments.from_arrays(x, y)
    assert merged.count == whole.count == len(x)
    np.testing.assert_allclose(merged.cxx, whole.cxx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(merged.cxy, whole.cxy, rtol=1e-10)
    assert merged.cyy == pytest.approx(whole.cyy, rel=1e-12)
    np.testing.assert_allclose(merged.cxx, np.cov(x.T, bias=True) * len(x), rtol=1e-10)


@pytest.mark.parametrize("l2", [0.0, 0.05, 1.0, 20.0])
def test_ridge_from_statistics_equals_sklearn_on_standardised_features(l2):
    x, y, _ = diabetes_parts()
    scaling = scaling_of(x, y)
    w, b = solve_ridge(standard_system(CrossMoments.from_arrays(x, y), scaling), l2)
    a, c = raw_weights(w, b, scaling)
    reference = Ridge(alpha=l2).fit(StandardScaler().fit_transform(x), y)
    np.testing.assert_allclose(a * x.std(0), reference.coef_, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(x @ a + c, reference.predict(StandardScaler().fit_transform(x)))


def test_a_constant_feature_at_lambda_0_falls_back_to_least_squares():
    x, y, _ = diabetes_parts()
    x = np.hstack([x, np.ones((len(x), 1))])  # no variance: ZᵀZ is singular
    std = x.std(0)
    std[std < 1e-6] = 1.0
    scaling = Scaling(x.mean(0), std, float(y.mean()), float(y.std()))
    w, _ = solve_ridge(standard_system(CrossMoments.from_arrays(x, y), scaling), 0.0)
    assert np.all(np.isfinite(w)) and w[-1] == pytest.approx(0.0, abs=1e-9)


def test_the_path_equals_one_solve_per_lambda_and_scores_match_the_rows():
    x, y, _ = diabetes_parts()
    fit, held = np.arange(350), np.arange(350, len(x))
    scaling = scaling_of(x[fit], y[fit])
    system = standard_system(CrossMoments.from_arrays(x[fit], y[fit]), scaling)
    path = RidgePath.of(system)
    held_moments = CrossMoments.from_arrays(x[held], y[held])
    for l2 in (0.0, 0.3, 30.0):
        w_path, b_path = path.weights(l2)
        w, b = solve_ridge(system, l2)
        np.testing.assert_allclose(w_path, w, rtol=1e-8, atol=1e-10)
        a, c = raw_weights(w, b, scaling)
        residual = x[held] @ a + c - y[held]
        assert squared_error(held_moments, a, c) == pytest.approx(residual @ residual, rel=1e-9)
        total = ((y[held] - y[held].mean()) ** 2).sum()
        assert r2_score(held_moments, a, c) == pytest.approx(1 - residual @ residual / total)


def test_gcv_is_the_textbook_formula():
    x, y, _ = diabetes_parts()
    scaling = scaling_of(x, y)
    path = RidgePath.of(standard_system(CrossMoments.from_arrays(x, y), scaling))
    z = (x - x.mean(0)) / x.std(0)
    t = (y - y.mean()) / y.std()
    l2 = 5.0
    hat = z @ np.linalg.solve(z.T @ z + l2 * np.eye(z.shape[1]), z.T)
    residual = t - hat @ t
    n, df = len(t), np.trace(hat) + 1
    assert path.gcv(l2) == pytest.approx((residual @ residual / n) / (1 - df / n) ** 2, rel=1e-9)


def test_loss_sums_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(40, 3)), rng.integers(0, 4, 40)
    a, c = rng.normal(size=(3, 4)), rng.normal(size=4)
    loss, grad_a, grad_c = softmax_sums(x, labels, a, c)
    step = 1e-6
    bumped = a.copy()
    bumped[1, 2] += step
    assert (softmax_sums(x, labels, bumped, c)[0] - loss) / step == pytest.approx(
        grad_a[1, 2], rel=1e-4
    )
    y = rng.normal(size=40)
    loss, grad_a, grad_c = squared_sums(x, y, a[:, :1], c[:1])
    assert loss == pytest.approx(0.5 * np.sum((x @ a[:, 0] + c[0] - y) ** 2))
    np.testing.assert_allclose(grad_c, [np.sum(x @ a[:, 0] + c[0] - y)])


@pytest.mark.parametrize("loader,classes", [(load_breast_cancer, 2), (load_digits, 10)])
def test_lbfgs_logistic_equals_sklearn_with_the_documented_c(loader, classes):
    x, y = loader(return_X_y=True)
    std = x.std(0)
    std[std < 1e-6] = 1.0
    scaling = Scaling(x.mean(0), std)
    found = fit_lbfgs(lambda a, c: softmax_sums(x, y, a, c), scaling, classes, len(x), l2=1.0)
    assert found.converged and found.iterations < 1000
    a, c = raw_weights(found.weight, found.bias, scaling)
    reference = LogisticRegression(C=2.0 if classes == 2 else 1.0, tol=1e-10, max_iter=10_000)
    reference.fit((x - scaling.mean) / std, y)
    z = (x - scaling.mean) / std
    np.testing.assert_allclose(
        (x @ a + c).argmax(1), reference.predict(z), err_msg="same predictions"
    )
    if classes == 2:  # two softmax rows w1 = -w2 = w/2 are one sigmoid weight w
        np.testing.assert_allclose(
            found.weight[:, 1] - found.weight[:, 0], reference.coef_[0], atol=1e-3
        )


def test_lbfgs_at_its_cap_says_it_did_not_converge():
    x, y = load_breast_cancer(return_X_y=True)
    scaling = Scaling(x.mean(0), x.std(0))
    found = fit_lbfgs(lambda a, c: softmax_sums(x, y, a, c), scaling, 2, len(x), 1.0, max_iter=3)
    assert not found.converged and found.iterations == 3 and found.final_rel_loss_change < 0


def history(*losses, stopped_early=False):
    rows = [{"epoch": i, "val_loss": v} for i, v in enumerate(losses)]
    rows[-1]["stopped_early"] = stopped_early
    return rows


def test_convergence_of_minibatch_runs():
    still_falling = minibatch_convergence(history(1.0, 0.8, 0.7), max_epochs=3)
    assert not still_falling.converged and "raise --epochs" in (still_falling.warning or "")
    assert still_falling.final_rel_loss_change == pytest.approx(-0.125)
    flat = minibatch_convergence(history(1.0, 0.5, 0.498), max_epochs=3)
    assert flat.converged and flat.warning is None
    stopped = minibatch_convergence(history(0.5, 0.4, 0.3, stopped_early=True), max_epochs=9)
    assert stopped.converged
    single = minibatch_convergence(history(0.9), max_epochs=1)
    assert not single.converged and single.final_rel_loss_change is None
    assert "raise --epochs" in (single.warning or "")


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"model": "mlp", "solver": "exact"}, 'Got "--solver exact" for --model mlp'),
        ({"model": "logistic", "solver": "exact"}, "use --solver lbfgs for logistic"),
        ({"model": "cnn", "solver": "lbfgs"}, 'Got "--solver lbfgs" for --model cnn'),
        ({"model": "ridge", "solver": "newton"}, 'Got "newton" for --solver'),
        ({"model": "logistic", "max_iter": 0}, 'Got "0" for --max-iter'),
    ],
)
def test_a_solver_that_does_not_fit_the_model_is_one_clear_error(options, fragment):
    with pytest.raises(KilnError, match=fragment.replace("(", r"\(")):
        TrainConfig(**options)


def test_solvers_and_default_lambda_by_model():
    assert TrainConfig(model="ridge").resolved_solver == "exact"
    assert TrainConfig(model="ridge").penalty == 1.0  # scikit-learn's Ridge() default
    assert TrainConfig(model="linear").penalty == 0.0
    assert TrainConfig(model="logistic").resolved_solver == "lbfgs"
    assert TrainConfig(model="mlp").resolved_solver == "minibatch"
    sgd = TrainConfig(model="logistic", solver="sgd")
    assert sgd.resolved_solver == "minibatch" and sgd.optimizer == "sgd"


def test_leave_one_out_errors_equal_refits_without_each_row():
    x, y, _ = diabetes_parts()
    x, y = x[:60], y[:60]
    scaling = scaling_of(x, y)
    path = RidgePath.of(standard_system(CrossMoments.from_arrays(x, y), scaling))
    l2s = [0.0, 2.0, 50.0]
    basis = path.loo_basis(scaling, l2s)
    by_parts = basis.squared_errors(x[:25], y[:25]) + basis.squared_errors(x[25:], y[25:])
    for index, l2 in enumerate(l2s):
        errors = []
        for i in range(len(x)):
            keep = np.arange(len(x)) != i
            system = standard_system(CrossMoments.from_arrays(x[keep], y[keep]), scaling)
            w, b = solve_ridge(system, l2)
            z = (x[i] - scaling.mean) / scaling.std
            t = (y[i] - scaling.target_mean) / scaling.target_std
            errors.append(t - (z @ w + b))
        assert by_parts[index] == pytest.approx(np.sum(np.square(errors)), rel=1e-8)


def test_epochs_are_planned_in_optimizer_steps_when_left_to_kiln():
    tiny = TrainConfig(model="mlp", epochs=None, patience=None).planned(rows_per_worker=54)
    assert tiny.epochs == 300 and tiny.patience == 30  # one step per epoch: the cap
    mid = TrainConfig(model="mlp", epochs=None, patience=None).planned(rows_per_worker=647)
    assert mid.epochs == 55 and mid.patience == 5  # 11 steps per epoch
    big = TrainConfig(model="mlp", epochs=None, patience=None).planned(rows_per_worker=10**6)
    assert big.epochs == 30
    given = TrainConfig(model="mlp", epochs=7, patience=None).planned(rows_per_worker=54)
    assert given.epochs == 7 and given.patience == 5
