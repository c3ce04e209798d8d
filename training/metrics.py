"""Evaluation metrics in plain numpy: classification and regression.

Both come in two forms: from arrays, and from sums (a confusion matrix; n, SSE, Σy, Σy²) that
data-parallel workers can all-reduce and turn into exact global metrics.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    return confusion


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy plus macro-averaged precision, recall and F1 (classes with no support skipped)."""
    true_pos = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    present = actual > 0
    zeros = np.zeros_like(true_pos)
    precision = np.divide(true_pos, predicted, out=zeros.copy(), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=zeros.copy(), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=zeros.copy(), where=denom > 0)
    return {
        "accuracy": float(true_pos.sum() / max(confusion.sum(), 1)),
        "precision": float(precision[present].mean()) if present.any() else 0.0,
        "recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    return metrics_from_confusion(confusion_matrix(y_true, y_pred, num_classes))


def regression_metrics_from_sums(n: float, sse: float, sum_y: float, sum_y2: float) -> dict:
    n = max(n, 1.0)
    total = sum_y2 - sum_y**2 / n
    return {"mse": sse / n, "r2": 1.0 - sse / total if total > 0 else 0.0}


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    y_true = y_true.astype(np.float64)
    sse = float(np.sum((y_true - y_pred) ** 2))
    return regression_metrics_from_sums(
        len(y_true), sse, float(y_true.sum()), float((y_true**2).sum())
    )
