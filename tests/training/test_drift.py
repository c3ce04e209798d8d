"""Drift maths against plain numpy/scipy reference computations on the same samples."""

import numpy as np
import pytest
from scipy import stats

from kiln.training.drift import (
    KS_MAX_ROWS,
    DriftReference,
    bin_counts,
    build_reference,
    feature_drift,
    prediction_drift,
    proportions,
    psi,
    quantile_edges,
)


def reference_psi(ref: np.ndarray, cur: np.ndarray, num_bins: int = 10) -> float:
    """PSI as a textbook computes it: decile bins of the reference, 1e-4 for an empty bin."""
    inner = np.quantile(ref, np.linspace(0, 1, num_bins + 1)[1:-1])
    ref_share = np.histogram(ref, bins=np.concatenate([[-np.inf], inner, [np.inf]]))[0] / len(ref)
    cur_share = np.histogram(cur, bins=np.concatenate([[-np.inf], inner, [np.inf]]))[0] / len(cur)
    ref_share, cur_share = np.maximum(ref_share, 1e-4), np.maximum(cur_share, 1e-4)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psi_equals_the_textbook_computation_on_continuous_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(5000, 1))
    cur = rng.normal(0.5, 1.3, size=(700, 1))
    edges = quantile_edges(ref)
    ours = psi(proportions(bin_counts(ref, edges)), proportions(bin_counts(cur, edges)))[0]
    # np.histogram closes its last bin on the right and puts a value on an edge in the upper
    # bin, as searchsorted(side="right") does: equal on continuous data.
    assert ours == pytest.approx(reference_psi(ref[:, 0], cur[:, 0]), rel=1e-9)
    assert ours > 0.2  # a half-sigma shift with a wider spread is drift by the usual rule


def test_psi_is_small_for_the_same_distribution_and_zero_for_identical_shares() -> None:
    rng = np.random.default_rng(3)
    ref, cur = rng.normal(size=(20000, 3)), rng.normal(size=(20000, 3))
    edges = quantile_edges(ref)
    scores = psi(proportions(bin_counts(ref, edges)), proportions(bin_counts(cur, edges)))
    assert (scores < 0.01).all()
    share = proportions(bin_counts(ref, edges))
    assert np.allclose(psi(share, share), 0.0)


def test_counts_over_shards_sum_to_the_counts_over_all_rows() -> None:
    rng = np.random.default_rng(4)
    x = rng.integers(0, 17, size=(1797, 5)).astype(np.float32)  # digits-like discrete values
    x[rng.random(x.shape) < 0.05] = np.nan
    edges = quantile_edges(x[:500])
    parts = [x[:100], x[100:1000], x[1000:]]
    assert np.array_equal(sum(bin_counts(p, edges) for p in parts), bin_counts(x, edges))
    counts = bin_counts(x, edges)
    assert (counts.sum(axis=1) == len(x)).all()
    assert np.array_equal(counts[:, -1], np.isnan(x).sum(axis=0))  # the missing bin


def test_ks_matches_scipy_and_applies_bonferroni() -> None:
    rng = np.random.default_rng(5)
    sample = rng.normal(size=(1000, 4)).astype(np.float32)
    window = rng.normal(size=(300, 4)).astype(np.float32)
    window[:, 2] += 0.5  # only feature 2 moves
    reference = build_reference(
        ["a", "b", "c", "d"],
        sample,
        quantile_edges(sample),
        bin_counts(sample, quantile_edges(sample)),
        rng.normal(size=1000),
        None,
    )
    rows = feature_drift(reference, window)
    for f, row in enumerate(rows):
        expected = stats.ks_2samp(sample[:, f], window[:, f]).pvalue
        assert row["ks_pvalue"] == pytest.approx(expected, rel=1e-9)
    assert [r["feature"] for r in rows if r["drifted"]] == ["c"]


def test_large_windows_are_judged_by_psi() -> None:
    rng = np.random.default_rng(6)
    sample = rng.normal(size=(1000, 2))
    reference = build_reference(
        ["a", "b"],
        sample,
        quantile_edges(sample),
        bin_counts(sample, quantile_edges(sample)),
        rng.normal(size=1000),
        None,
    )
    window = rng.normal(size=(KS_MAX_ROWS + 500, 2))
    window[:, 0] = window[:, 0] * 2 + 1
    rows = feature_drift(reference, window)
    assert "ks_pvalue" not in rows[0]
    assert rows[0]["drifted"] and not rows[1]["drifted"]


def test_reference_round_trips_through_safetensors() -> None:
    rng = np.random.default_rng(7)
    sample = rng.normal(size=(50, 3)).astype(np.float32)
    edges = quantile_edges(sample)
    predictions = rng.integers(0, 3, size=50).astype(np.float64)
    reference = build_reference(
        ["x", "y", "z"], sample, edges, bin_counts(sample, edges), predictions, 3
    )
    back = DriftReference.from_bytes(reference.to_bytes())
    assert back.names == ["x", "y", "z"] and back.classifier
    assert np.array_equal(back.sample, sample)
    assert np.array_equal(back.prediction_counts, reference.prediction_counts)
    assert back.num_rows == 50


def test_classifier_prediction_drift_uses_the_class_counts() -> None:
    rng = np.random.default_rng(8)
    predictions = rng.integers(0, 3, size=1000).astype(np.float64)
    sample = rng.normal(size=(1000, 1))
    edges = quantile_edges(sample)
    reference = build_reference(["x"], sample, edges, bin_counts(sample, edges), predictions, 3)
    assert (
        reference.prediction_counts[0][:3].tolist()
        == np.bincount(predictions.astype(int), minlength=3).tolist()
    )
    same = prediction_drift(reference, rng.integers(0, 3, size=300))
    skewed = prediction_drift(reference, np.zeros(300))
    assert same is not None and not same["drifted"]
    assert skewed is not None and skewed["drifted"] and skewed["psi"] > 0.2
    table = np.stack([reference.prediction_counts[0][:3], [300, 0, 0]])
    assert skewed["chi2_pvalue"] == pytest.approx(stats.chi2_contingency(table).pvalue)
