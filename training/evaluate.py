"""Forward passes and metrics shared by training, evaluation and serving.

Serving calls `predict_outputs` too, so a served model gives the evaluated model's answers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.training.metrics import classification_metrics, regression_metrics


@torch.inference_mode()
def predict_outputs(
    model: nn.Module, x: np.ndarray, device: torch.device | str = "cpu", max_batch_rows: int = 8192
) -> np.ndarray:
    """Raw model outputs (logits or values) for rows of x, as float32 numpy."""
    chunks = []
    for start in range(0, len(x), max_batch_rows):
        chunk = np.ascontiguousarray(x[start : start + max_batch_rows])
        if not chunk.flags.writeable:  # shard arrays are read-only views of the object store
            chunk = chunk.copy()
        xb = torch.from_numpy(chunk).to(device)
        chunks.append(model(xb.float()).float().cpu().numpy())
    if not chunks:
        return np.zeros((0, 1), dtype=np.float32)
    return np.concatenate(chunks)


def outputs_to_predictions(outputs: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Class indices for classifiers, values for regressors."""
    if spec["task"] == "classification":
        return outputs.argmax(axis=1)
    return outputs[:, 0]


def softmax(outputs: np.ndarray) -> np.ndarray:
    shifted = outputs - outputs.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def evaluate_model(model: nn.Module, spec: dict[str, Any], x: np.ndarray, y: np.ndarray) -> dict:
    """Test metrics; y holds class indices (classification) or values (regression)."""
    predictions = outputs_to_predictions(predict_outputs(model, x), spec)
    if spec["task"] == "classification":
        return classification_metrics(y.astype(np.int64), predictions, len(spec["classes"]))
    return regression_metrics(y.astype(np.float64), predictions.astype(np.float64))
