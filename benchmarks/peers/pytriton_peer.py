"""PyTriton: Triton Inference Server's C++ HTTP/gRPC front end and dynamic batcher (max batch
64, no queue delay) in front of N model instances (N Python callables of this process, one
torch model each), V2 protocol: POST /v2/models/peer/infer {"inputs": [{"name": "x", "shape":
[1, 64], "datatype": "FP32", "data": [...]}]}; gRPC on PEER_GRPC_PORT."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from common import GRPC_PORT, MODEL, PORT, WORKERS, load_model
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def instance() -> Callable[..., dict[str, np.ndarray]]:
    predict_rows = load_model()

    @batch  # type: ignore[misc]
    def infer(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"label": predict_rows(x).reshape(-1, 1)}

    return infer  # type: ignore[no-any-return]


if __name__ == "__main__":
    import os

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=PORT,
        grpc_port=GRPC_PORT,
        metrics_port=int(os.environ.get("PEER_METRICS_PORT", "8002")),
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL,
            infer_func=[instance() for _ in range(WORKERS)],
            inputs=[Tensor(name="x", dtype=np.float32, shape=(64,))],
            outputs=[Tensor(name="label", dtype=np.int64, shape=(1,))],
            config=ModelConfig(
                max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=0)
            ),
            strict=False,
        )
        triton.serve()
