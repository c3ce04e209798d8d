"""Evaluation metrics in plain numpy: classification and regression."""

from __future__ import annotations

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    """Accuracy plus macro-averaged precision, recall and F1 (classes with no support skipped)."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    true_pos = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    present = actual > 0
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    return {
        "accuracy": float(true_pos.sum() / max(len(y_true), 1)),
        "precision": float(precision[present].mean()),
        "recall": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    residual = y_true - y_pred
    mse = float(np.mean(residual**2))
    variance = float(np.var(y_true))
    r2 = 1.0 - mse / variance if variance > 0 else 0.0
    return {"mse": mse, "r2": float(r2)}
