"""PCA from merged co-moments against scikit-learn's PCA on the same standardised rows (no
Ray), and `kiln train --pca` on real Ray: the components a fixed layer, callers still sending
raw features, each solver against scikit-learn on the projected rows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from kiln.training.linear import CrossMoments, Scaling, fit_lbfgs, principal_components

SETS = {"digits": load_digits, "breast_cancer": load_breast_cancer, "diabetes": load_diabetes}


def merged_moments(x: np.ndarray, cuts: list[int]) -> CrossMoments:
    """Co-moments of x merged over uneven parts, as the ShardStore reduce does."""
    parts = np.split(x, cuts)
    moments = CrossMoments.from_arrays(parts[0], np.zeros(len(parts[0])))
    for part in parts[1:]:
        moments = moments.merge(CrossMoments.from_arrays(part, np.zeros(len(part))))
    return moments


@pytest.mark.parametrize("name", sorted(SETS))
@pytest.mark.parametrize("keep", [0.5, 0.8, 0.95, 0.99, 3])
def test_components_and_kept_variance_equal_scikit_learns(name, keep):
    x = SETS[name](return_X_y=True)[0].astype(np.float64)
    scaler = StandardScaler().fit(x)
    std = np.where(scaler.scale_ < 1e-6, 1.0, scaler.scale_)  # as Kiln: constant columns
    scaling = Scaling(mean=scaler.mean_, std=std)
    found = principal_components(merged_moments(x, [7, 300, 301]), scaling, keep)
    reference = PCA(n_components=keep, svd_solver="full").fit((x - scaler.mean_) / std)
    assert len(found.components) == reference.n_components_
    assert found.variance_kept == pytest.approx(reference.explained_variance_ratio_.sum(), abs=1e-4)
    np.testing.assert_allclose(found.variance_ratio, reference.explained_variance_ratio_, atol=1e-9)
    # The same directions, each up to its sign (Kiln: largest entry positive), where the
    # eigenvalues are distinct enough to make a direction unique.
    gaps = np.abs(np.diff(reference.explained_variance_))
    for i, (ours, theirs) in enumerate(zip(found.components, reference.components_, strict=True)):
        if i + 1 < len(gaps) and gaps[i] > 1e-6 * reference.explained_variance_[0]:
            assert abs(float(ours @ theirs)) == pytest.approx(1.0, abs=1e-6)


def test_lbfgs_on_the_components_equals_the_fit_on_projected_rows():
    """The projection's chain rule: L-BFGS with `projection` is L-BFGS on the rows P·z."""
    x, y = load_breast_cancer(return_X_y=True)
    scaling = Scaling(mean=x.mean(axis=0), std=x.std(axis=0))
    projection = principal_components(merged_moments(x, [100]), scaling, 5)
    labels = y.astype(np.int64)

    def sums_on(rows: np.ndarray):
        def loss_sums(a, c):
            from kiln.training.linear import softmax_sums

            return softmax_sums(rows, labels, a, c)

        return loss_sums

    through = fit_lbfgs(sums_on(x), scaling, 2, len(x), 1.0, projection=projection.components)
    projected = ((x - scaling.mean) / scaling.std) @ projection.components.T
    direct = fit_lbfgs(
        sums_on(projected), Scaling(mean=np.zeros(5), std=np.ones(5)), 2, len(x), 1.0
    )
    assert through.converged and direct.converged
    np.testing.assert_allclose(through.weight, direct.weight, atol=1e-5)
    np.testing.assert_allclose(through.loss, direct.loss, rtol=1e-9)


# ----------------------------------------------------------------------------- on real Ray


def reference_rows(name: str, seed: int = 0) -> tuple[np.ndarray, ...]:
    """The non-test rows (what the convex solvers fit) and the test rows of Kiln's split."""
    from kiln.actors.sources import SourceSpec, split_rows

    x, y = SETS[name](return_X_y=True)
    spec = SourceSpec(uri=f"sklearn:{name}", seed=seed)
    train, test = split_rows(y, spec, "train"), split_rows(y, spec, "test")
    return x[train], y[train], x[test], y[test]


def test_logistic_with_pca_keeps_scikit_learns_components_and_accuracy(
    ray_local, settings_session, registry_session
):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from tests.cluster.test_tables import kiln_train

    outcome = kiln_train(
        settings_session, registry_session, "sklearn:digits", model="logistic", pca=0.95,
        register="digits-logistic-pca",
    )  # fmt: skip
    x_train, y_train, x_test, y_test = reference_rows("digits")
    pca = PCA(n_components=0.95, svd_solver="full")
    reference = make_pipeline(StandardScaler(), pca, LogisticRegression(max_iter=5000))
    reference.fit(x_train, y_train)
    lineage = outcome.record.lineage["pca"]
    assert lineage["components"] == pca.n_components_ < 64
    assert lineage["variance_kept"] == pytest.approx(pca.explained_variance_ratio_.sum(), abs=1e-4)
    assert outcome.converged
    assert outcome.test_metrics["accuracy"] == pytest.approx(
        reference.score(x_test, y_test), abs=0.01
    )
    assert len(outcome.record.spec["pca"]["components"][0]) == 64  # callers send 64 pixels


def test_exact_ridge_on_components_equals_scikit_learns_pipeline(
    ray_local, settings_session, registry_session
):
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline

    from tests.cluster.test_tables import kiln_train

    outcome = kiln_train(
        settings_session, registry_session, "sklearn:diabetes", model="ridge", pca=5,
        register="diabetes-ridge-pca",
    )  # fmt: skip
    x_train, y_train, x_test, y_test = reference_rows("diabetes")
    reference = make_pipeline(StandardScaler(), PCA(5, svd_solver="full"), Ridge(alpha=1.0))
    reference.fit(x_train, y_train)
    assert outcome.solver == "exact"
    assert outcome.test_metrics["r2"] == pytest.approx(reference.score(x_test, y_test), abs=1e-5)


@pytest.mark.slow
def test_an_mlp_trains_on_the_components_through_ray_train(
    ray_local, settings_session, registry_session
):
    from tests.cluster.test_tables import kiln_train

    outcome = kiln_train(
        settings_session, registry_session, "sklearn:digits", model="mlp", pca=20, epochs=20,
        register="digits-mlp-pca",
    )  # fmt: skip
    spec = outcome.record.spec
    assert len(spec["pca"]["components"]) == 20 and spec["num_features"] == 64
    assert outcome.num_workers == 2 and outcome.test_metrics["accuracy"] >= 0.9
