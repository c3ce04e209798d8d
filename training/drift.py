"""Drift of a served model's inputs and predictions from what it was trained on: pure numpy.

At registration Kiln stores a *drift reference* with the version (`reference.safetensors`):
per input, quantile bin edges and the exact share of training rows in each bin, plus a uniform
sample of training rows (raw inputs) and the model's predictions on it. The bins are a reduce
over the ShardStore actors in two passes: a sample of rows from each shard, proportional to its
size, gives the edges (deciles); then every shard counts all its rows into those bins and the
counts are summed (`bin_counts` merges by addition), so the proportions are exact whatever the
data size. Only the sample (at most `SAMPLE_ROWS` rows) leaves the shards.

Over a window of logged inputs, each input gets the population stability index against the
reference bins, PSI = Σ (cur − ref)·ln(cur / ref) with empty bins set to 1e-4 (drift at
PSI ≥ 0.2), and, for windows under 1,000 rows, a two-sample Kolmogorov–Smirnov test against the
reference sample (scipy's `ks_2samp`; drift at p < 0.05 / F, Bonferroni over the F inputs):
the defaults of Evidently and alibi-detect. A missing value (NaN) has a bin of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.numpy import load, save

REFERENCE_FILE = "reference.safetensors"
NUM_BINS = 10
SAMPLE_ROWS = 1000
PSI_THRESHOLD = 0.2
KS_ALPHA = 0.05
KS_MAX_ROWS = 1000
"""Windows with fewer rows than this are judged by the KS test, larger ones by PSI."""
PSI_FLOOR = 1e-4


def quantile_edges(sample: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """Inner bin edges (F, num_bins - 1) at the sample's quantiles, ignoring missing values.

    Repeated edges (a feature with few distinct values) leave empty bins, which are empty in
    the reference and the window alike and add nothing to the PSI.
    """
    sample = np.asarray(sample, dtype=np.float64)
    levels = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
    edges = np.zeros((sample.shape[1], num_bins - 1))
    for f in range(sample.shape[1]):
        column = sample[:, f]
        column = column[~np.isnan(column)]
        if len(column):
            edges[f] = np.quantile(column, levels)
    return edges


def bin_counts(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Rows of x (N, F) per bin (F, B + 1): B bins by the inner edges, then the missing bin.

    Counts over parts of the data add up to the counts over all of it (the shard reduce).
    """
    x = np.asarray(x, dtype=np.float64)
    num_bins = edges.shape[1] + 1
    counts = np.zeros((x.shape[1], num_bins + 1), dtype=np.int64)
    for f in range(x.shape[1]):
        column = x[:, f]
        missing = np.isnan(column)
        index = np.searchsorted(edges[f], column[~missing], side="right")
        counts[f, :num_bins] = np.bincount(index, minlength=num_bins)
        counts[f, num_bins] = int(missing.sum())
    return counts


def proportions(counts: np.ndarray) -> np.ndarray:
    """Counts (F, B) as shares of each row (all zeros for an empty one)."""
    totals = counts.sum(axis=1, keepdims=True).astype(np.float64)
    return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)


def psi(reference: np.ndarray, current: np.ndarray, floor: float = PSI_FLOOR) -> np.ndarray:
    """Population stability index per row of two (F, B) proportion arrays."""
    ref = np.maximum(np.asarray(reference, dtype=np.float64), floor)
    cur = np.maximum(np.asarray(current, dtype=np.float64), floor)
    return np.asarray(((cur - ref) * np.log(cur / ref)).sum(axis=1))


def ks_pvalues(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Two-sample KS p-value per column of two (N, F) samples (missing values dropped; 1.0
    when either side has no value)."""
    from scipy import stats as scipy_stats  # here: ShardStore processes import this module

    out = np.ones(reference.shape[1])
    for f in range(reference.shape[1]):
        ref = reference[:, f][~np.isnan(reference[:, f])]
        cur = current[:, f][~np.isnan(current[:, f])]
        if len(ref) and len(cur):
            out[f] = float(scipy_stats.ks_2samp(ref, cur).pvalue)
    return out


@dataclass
class DriftReference:
    """What a version's inputs and predictions looked like in training (see the module doc)."""

    names: list[str]
    edges: np.ndarray  # (F, B - 1) inner quantile edges
    counts: np.ndarray  # (F, B + 1) training rows per bin, the last the missing bin
    sample: np.ndarray  # (S, F) float32 raw inputs, a uniform sample of the training rows
    prediction_edges: np.ndarray  # (1, B - 1); a classifier's are the class indices
    prediction_counts: np.ndarray  # (1, B + 1) the sample's predictions per bin
    predictions: np.ndarray  # (S,) the model's predictions on the sample (class index or value)
    classifier: bool = False

    def to_bytes(self) -> bytes:
        tensors: dict[str, np.ndarray] = {
            "edges": self.edges.astype(np.float64),
            "counts": self.counts.astype(np.int64),
            "sample": self.sample.astype(np.float32),
            "prediction_edges": self.prediction_edges.astype(np.float64),
            "prediction_counts": self.prediction_counts.astype(np.int64),
            "predictions": self.predictions.astype(np.float64),
        }
        metadata = {"names": json.dumps(self.names), "classifier": json.dumps(self.classifier)}
        return save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> DriftReference:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        return cls(
            names=json.loads(metadata["names"]),
            classifier=bool(json.loads(metadata.get("classifier", "false"))),
            **tensors,
        )

    @property
    def num_rows(self) -> int:
        return int(self.counts[0].sum()) if len(self.counts) else 0


def prediction_edges(predictions: np.ndarray, classes: int | None) -> np.ndarray:
    """Bins for predictions: one per class for a classifier, deciles of the values otherwise."""
    if classes is not None:  # class k falls in bin k
        return (np.arange(1, max(classes, 2), dtype=np.float64) - 0.5)[None, :]
    return quantile_edges(predictions[:, None])


def build_reference(
    names: list[str],
    sample: np.ndarray,
    edges: np.ndarray,
    counts: np.ndarray,
    predictions: np.ndarray,
    classes: int | None,
) -> DriftReference:
    """The reference from the reduced sample and counts, and the model's predictions on the
    sample (class indices for a classifier, `classes` their number; values for a regressor)."""
    pred_edges = prediction_edges(predictions, classes)
    return DriftReference(
        names=names,
        edges=edges,
        counts=counts,
        sample=sample.astype(np.float32),
        prediction_edges=pred_edges,
        prediction_counts=bin_counts(predictions[:, None], pred_edges),
        predictions=predictions.astype(np.float64),
        classifier=classes is not None,
    )


def feature_drift(reference: DriftReference, window: np.ndarray) -> list[dict[str, Any]]:
    """Per input: PSI, the KS p-value (windows under KS_MAX_ROWS rows) and whether it drifted."""
    if len(window) == 0:
        return []
    scores = psi(proportions(reference.counts), proportions(bin_counts(window, reference.edges)))
    pvalues = ks_pvalues(reference.sample, window) if len(window) < KS_MAX_ROWS else None
    alpha = KS_ALPHA / max(len(reference.names), 1)
    out = []
    for f, name in enumerate(reference.names):
        row: dict[str, Any] = {"feature": name, "psi": float(scores[f])}
        if pvalues is not None:
            row["ks_pvalue"] = float(pvalues[f])
            row["drifted"] = bool(pvalues[f] < alpha)
        else:
            row["drifted"] = bool(scores[f] >= PSI_THRESHOLD)
        out.append(row)
    return out


def prediction_drift(reference: DriftReference, predictions: np.ndarray) -> dict[str, Any] | None:
    """PSI of the window's predictions against the reference's, and for a small window a test:
    chi-square on the class counts (a classifier), KS on the values (a regressor)."""
    if len(predictions) == 0:
        return None
    values = np.asarray(predictions, dtype=np.float64)[:, None]
    current = bin_counts(values, reference.prediction_edges)
    score = float(psi(proportions(reference.prediction_counts), proportions(current))[0])
    out: dict[str, Any] = {"psi": score}
    if len(predictions) < KS_MAX_ROWS and reference.classifier:
        table = np.stack([reference.prediction_counts[0], current[0]])
        table = table[:, table.sum(axis=0) > 0]
        from scipy import stats as scipy_stats

        p = 1.0 if table.shape[1] < 2 else float(scipy_stats.chi2_contingency(table).pvalue)
        out["chi2_pvalue"] = p
        out["drifted"] = p < KS_ALPHA
    elif len(predictions) < KS_MAX_ROWS:
        p = float(ks_pvalues(reference.predictions[:, None], np.asarray(predictions)[:, None])[0])
        out["ks_pvalue"] = p
        out["drifted"] = p < KS_ALPHA
    else:
        out["drifted"] = score >= PSI_THRESHOLD
    return out


def drift_summary(
    reference: DriftReference, window: np.ndarray, predictions: np.ndarray
) -> dict[str, Any]:
    """Everything `kiln monitor` shows about drift for one version over one window."""
    features = feature_drift(reference, window)
    return {
        "rows": int(len(window)),
        "test": "ks" if 0 < len(window) < KS_MAX_ROWS else "psi",
        "drifted_features": [row["feature"] for row in features if row["drifted"]],
        "features": features,
        "predictions": prediction_drift(reference, predictions),
    }
