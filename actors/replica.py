"""ModelReplica: one registered model version loaded for inference, on CPU or GPU.

It is a plain object, so it runs inside a Serve replica (which is itself a Ray actor) and in
tests without Ray. Its `predict` uses the same forward pass as evaluation, so a served model
answers exactly as the evaluated one did.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from actors.catalog import VersionRecord
from actors.registry import read_verified_files
from training.artifacts import model_from_files
from training.evaluate import outputs_to_predictions, predict_outputs, softmax
from training.models import num_inputs
from training.tabular import Encoding

logger = logging.getLogger(__name__)


SMALL_ROWS = 16


def pick_device(gpu: str = "auto") -> torch.device:
    if gpu != "off" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class ModelReplica:
    """A verified, loaded model version with a batched `predict`."""

    def __init__(self, record: VersionRecord, storage_uri: str, gpu: str = "auto") -> None:
        files = read_verified_files(storage_uri, record)
        model, self.spec = model_from_files(files)
        self.encoding = Encoding.from_spec(self.spec)
        """How the model's table columns become its features; None for a model trained before
        inputs were recorded (it takes rows of num_features numbers)."""
        self.num_inputs = num_inputs(self.spec)
        """Raw values per row the model takes: one per input column (NaN for a missing value,
        a categorical column's slot), or its num_features for a model without inputs."""
        self.device = pick_device(gpu)
        self.model = model.to(self.device)
        self.record = record
        self.small_forward_s = 0.0
        """Moving average of the seconds a forward pass of a few rows takes (serving uses it
        to run cheap passes inline and costly ones on a worker thread)."""
        # Warm-up, the first pass is slow. Zeros are valid raw inputs: slot 0 of a categorical.
        self.forward(np.zeros((1, self.num_inputs), dtype=np.float32))
        logger.info("loaded %s on %s", record.ref, self.device)

    @property
    def num_features(self) -> int:
        """Encoded features the network sees (num_inputs for a model without inputs)."""
        return int(self.spec["num_features"])

    @property
    def is_classifier(self) -> bool:
        return self.spec["task"] == "classification"

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Raw outputs (N, K) for raw inputs x of shape (N, num_inputs) (see `encoding`)."""
        started = time.perf_counter()
        out = predict_outputs(self.model, x, self.device)
        if len(x) <= SMALL_ROWS:
            took = time.perf_counter() - started
            self.small_forward_s = (
                took if not self.small_forward_s else (0.9 * self.small_forward_s + 0.1 * took)
            )
        return out

    def predict(self, x: np.ndarray, probabilities: bool = False) -> dict[str, Any]:
        """x is (N, num_inputs) float32; returns predictions (class labels or values)."""
        return self.format(self.forward(x), probabilities)

    def format(self, outputs: np.ndarray, probabilities: bool = False) -> dict[str, Any]:
        """Turn raw outputs into class labels (and probabilities) or regression values."""
        predictions = outputs_to_predictions(outputs, self.spec)
        result: dict[str, Any] = {}
        if self.is_classifier:
            classes = self.spec["classes"]
            result["predictions"] = [classes[i] for i in predictions.tolist()]
            if probabilities:
                result["probabilities"] = softmax(outputs).tolist()
        else:
            result["predictions"] = predictions.tolist()
        return result
