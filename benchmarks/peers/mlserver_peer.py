"""MLServer with `parallel_workers=N` inference processes (N=1 is its default), V2 protocol:
POST /v2/models/peer/infer {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
"data": [...]}]} -> {"outputs": [{"name": "label", "data": [...]}, ...]}."""

from __future__ import annotations

from typing import Any

from common import load_model
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class TorchMLP(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        self.predict_rows: Any = load_model()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = NumpyCodec.decode_input(payload.inputs[0])
        labels = self.predict_rows(rows.reshape(len(rows), -1))
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output("label", labels)]
        )
