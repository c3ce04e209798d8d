"""FastAPI under `uvicorn --workers N` (uvloop, httptools): what a user writes without a
model server. An async route (no thread-pool hop per request).
POST /predict {"instances": [[...]]} -> {"predictions": [...]}."""

from __future__ import annotations

import numpy as np
from common import load_model
from fastapi import FastAPI


def app() -> FastAPI:
    """An app factory: each worker process loads its own model."""
    predict = load_model()
    api = FastAPI()

    @api.post("/predict")
    async def route(body: dict) -> dict:
        rows = np.asarray(body["instances"], dtype=np.float32)
        return {"predictions": predict(rows).tolist()}

    return api
