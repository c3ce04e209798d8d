"""KServe's ModelServer (its Python runtime) with `workers=N` uvicorn processes, V1 protocol:
POST /v1/models/peer:predict {"instances": [[...]]} -> {"predictions": [...]}."""

from __future__ import annotations

from typing import Any

import kserve
import numpy as np
from common import GRPC_PORT, MODEL, PORT, WORKERS, load_model


class Peer(kserve.Model):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__(MODEL)
        self.predict_rows: Any = None
        self.load()

    def load(self) -> bool:
        self.predict_rows = load_model()
        self.ready = True
        return True

    def __getstate__(self) -> dict:
        """With workers > 1 KServe spawns its workers and pickles the model to them: each
        worker loads its own (a closure does not pickle)."""
        return {**self.__dict__, "predict_rows": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.load()

    def predict(self, payload: dict, headers: dict[str, str] | None = None) -> dict:
        rows = np.asarray(payload["instances"], dtype=np.float32)
        return {"predictions": self.predict_rows(rows).tolist()}


if __name__ == "__main__":
    kserve.ModelServer(http_port=PORT, grpc_port=GRPC_PORT, workers=WORKERS).start([Peer()])
