"""The benchmark's model inside a peer's own venv (no Kiln there): the same layers and weights
as Kiln's `bench-<kind>` version, read from the .npz the driver wrote from Kiln's model.

Settings come in the environment: PEER_KIND (light, medium), PEER_WEIGHTS (the .npz),
PEER_THREADS (torch threads per worker), PEER_WORKERS, PEER_PORT, PEER_GRPC_PORT.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

KIND = os.environ.get("PEER_KIND", "light")
WORKERS = int(os.environ.get("PEER_WORKERS", "1"))
PORT = int(os.environ.get("PEER_PORT", "8500"))
GRPC_PORT = int(os.environ.get("PEER_GRPC_PORT", "8501"))
MODEL = "peer"
"""The model's name in every peer's URL."""


def load_model() -> Callable[[np.ndarray], np.ndarray]:
    """rows (n, 64) float32 -> class labels (n,) int64: standardise, the MLP, argmax, as
    Kiln's classification model does."""
    torch.set_num_threads(int(os.environ.get("PEER_THREADS", "1")))
    saved = np.load(os.environ["PEER_WEIGHTS"])
    count = int(saved["layers"])
    layers: list[torch.nn.Module] = []
    for i in range(count):
        weight = torch.from_numpy(saved[f"w{i}"])
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(torch.from_numpy(saved[f"b{i}"]))
        layers.append(linear)
        if i < count - 1:
            layers.append(torch.nn.ReLU())
    body = torch.nn.Sequential(*layers).eval()
    mean = torch.from_numpy(saved["mean"])
    std = torch.from_numpy(saved["std"])
    classes = saved["classes"]

    def predict(rows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
            logits = body((x - mean) / std)
            return classes[logits.argmax(dim=1).numpy()]  # type: ignore[no-any-return]

    predict(np.zeros((1, saved["mean"].shape[0]), dtype=np.float32))  # first call's set-up
    return predict
