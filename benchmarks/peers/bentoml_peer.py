"""A BentoML service with `workers=N` processes (`bentoml serve bentoml_peer:Peer`), an async
API: POST /predict {"instances": [[...]]} -> {"predictions": [...]}."""

from __future__ import annotations

import bentoml
import numpy as np
from common import WORKERS, load_model


@bentoml.service(workers=WORKERS)
class Peer:
    def __init__(self) -> None:
        self.predict_rows = load_model()

    @bentoml.api
    async def predict(self, instances: list[list[float]]) -> dict:
        rows = np.asarray(instances, dtype=np.float32)
        return {"predictions": self.predict_rows(rows).tolist()}
