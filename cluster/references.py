"""The drift reference registered with each version (training/drift.py says what it holds).

Computed from the training split's ShardStore actors at registration: a sample and the
quantile-bin counts of the raw inputs (`reduce_drift_reference`), and the model's predictions
on the sample. About 0.3 s for digits; the sample is `SAMPLE_ROWS` training rows, stored with
the version's other artifacts (the same access as its weights).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kiln.actors.shards import ShardSet, reduce_drift_reference
from kiln.training.drift import REFERENCE_FILE, SAMPLE_ROWS, build_reference
from kiln.training.evaluate import outputs_to_predictions, predict_outputs
from kiln.training.tabular import Encoding

logger = logging.getLogger(__name__)


def input_names(spec: dict[str, Any]) -> list[str]:
    encoding = Encoding.from_spec(spec)
    if encoding is not None:
        return list(encoding.names)
    return [f"x{i}" for i in range(int(spec["num_features"]))]


def reference_files(
    train: ShardSet, model: torch.nn.Module, spec: dict[str, Any]
) -> dict[str, bytes]:
    """{reference.safetensors: bytes} for a model trained on `train`."""
    encoding = Encoding.from_spec(spec)
    sample, edges, counts = reduce_drift_reference(train, encoding, SAMPLE_ROWS)
    outputs = predict_outputs(model, sample, torch.device("cpu"))
    predictions = outputs_to_predictions(outputs, spec)
    classes = len(spec["classes"]) if spec["task"] == "classification" else None
    reference = build_reference(input_names(spec), sample, edges, counts, predictions, classes)
    return {REFERENCE_FILE: reference.to_bytes()}
