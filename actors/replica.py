"""ModelReplica: one registered model version loaded for inference, on CPU or GPU.

It is a plain object, so it runs inside a Serve replica (which is itself a Ray actor) and in
tests without Ray. Its `predict` uses the same forward pass as evaluation, so a served model
answers exactly as the evaluated one did.

Two backends run the forward pass: torch (the model rebuilt from spec.json and safetensors)
and ONNX Runtime (the version's model.onnx, from `kiln export`; an ONNX Runtime session with
one intra-op thread per CPU of the replica). Both take the same raw inputs and give the same
(N, K) float32 outputs, so everything above `forward` (V1, V2, batching, health) is shared.
`auto` picks ONNX Runtime when the version has model.onnx (kiln.training.export.serving_backend).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import torch

from kiln.actors.catalog import VersionRecord
from kiln.actors.registry import read_verified_files
from kiln.training.artifacts import SPEC_FILE, model_from_files
from kiln.training.evaluate import (
    InferencePlan,
    outputs_to_predictions,
    predict_outputs,
    softmax,
)
from kiln.training.export import (
    ONNX_FILE,
    ONNXRUNTIME,
    PLATFORMS,
    TORCH,
    OnnxModel,
    serving_backend,
)
from kiln.training.models import num_inputs
from kiln.training.tabular import Encoding

logger = logging.getLogger(__name__)


SMALL_ROWS = 16


def pick_device(gpu: str = "auto") -> torch.device:
    if gpu != "off" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class ModelReplica:
    """A verified, loaded model version with a batched `predict`."""

    def __init__(
        self,
        record: VersionRecord,
        storage_uri: str,
        gpu: str = "auto",
        backend: str = TORCH,
        num_cpus: float = 1.0,
    ) -> None:
        self.backend = serving_backend(record.spec, record.artifacts, backend, record.ref)
        """torch or onnxruntime: the backend asked for, `auto` resolved."""
        files = read_verified_files(storage_uri, record)  # every file, model.onnx included
        self.device = pick_device(gpu)
        self.model: Any = None
        self.plan: InferencePlan | None = None
        """The torch model's forward as flat tensor operations, where it has one (the same
        outputs for a third of the time on one row: training/evaluate.py)."""
        self.onnx: OnnxModel | None = None
        if self.backend == ONNXRUNTIME:
            self.spec = json.loads(files[SPEC_FILE])
            self.onnx = OnnxModel(files[ONNX_FILE], num_threads=int(num_cpus), gpu=gpu)
        else:
            model, self.spec = model_from_files(files)
            self.model = model.to(self.device)
            self.plan = InferencePlan.of(self.model, self.device)
        self.encoding = Encoding.from_spec(self.spec)
        """How the model's table columns become its features; None for a model trained before
        inputs were recorded (it takes rows of num_features numbers)."""
        self.num_inputs = num_inputs(self.spec)
        """Raw values per row the model takes: one per input column (NaN for a missing value,
        a categorical column's slot), or its num_features for a model without inputs."""
        self.record = record
        self.small_forward_s = 0.0
        """Moving average of the seconds a forward pass of a few rows takes (serving uses it
        to run cheap passes inline and costly ones on a worker thread)."""
        # Warm-up, the first pass is slow. Zeros are valid raw inputs: slot 0 of a categorical.
        self.forward(np.zeros((1, self.num_inputs), dtype=np.float32))
        where = ",".join(self.onnx.providers) if self.onnx else self.device
        logger.info("loaded %s with %s on %s", record.ref, self.backend, where)

    @property
    def num_features(self) -> int:
        """Encoded features the network sees (num_inputs for a model without inputs)."""
        return int(self.spec["num_features"])

    @property
    def platform(self) -> str:
        """What V2 metadata calls the backend (kiln-pytorch, onnxruntime_onnx)."""
        return PLATFORMS[self.backend]

    @property
    def is_classifier(self) -> bool:
        return self.spec["task"] == "classification"

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Raw outputs (N, K) for raw inputs x of shape (N, num_inputs) (see `encoding`)."""
        started = time.perf_counter()
        if self.onnx is not None:
            out = self.onnx.forward(x)
        elif self.plan is not None:
            out = self.plan(x)
        else:
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
