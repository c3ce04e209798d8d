"""LitServe with `workers_per_device=N` inference workers on the CPU:
POST /predict {"instances": [[...]]} -> {"predictions": [...]}."""

from __future__ import annotations

from typing import Any

import litserve as ls
import numpy as np
from common import PORT, WORKERS, load_model


class Peer(ls.LitAPI):  # type: ignore[misc]
    def setup(self, device: str) -> None:
        self.predict_rows = load_model()

    def decode_request(self, request: dict) -> np.ndarray:
        return np.asarray(request["instances"], dtype=np.float32)

    def predict(self, rows: np.ndarray) -> Any:
        return self.predict_rows(rows)

    def encode_response(self, output: Any) -> dict:
        return {"predictions": output.tolist()}


if __name__ == "__main__":
    server = ls.LitServer(Peer(), accelerator="cpu", workers_per_device=WORKERS)
    server.run(port=PORT, log_level="warning", generate_client_file=False)
