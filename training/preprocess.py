"""Feature preprocessing on GPU with CuPy when one is usable, numpy otherwise, same results.

CuPy imports fine on a machine without a GPU and only fails at the first array
(cudaErrorInsufficientDriver), so the check makes a tiny array inside a `try`.
"""

from __future__ import annotations

import logging
from types import ModuleType

import numpy as np

logger = logging.getLogger(__name__)


def gpu_array_module() -> ModuleType | None:
    """cupy when it is installed and a CUDA device answers, else None."""
    try:
        import cupy  # type: ignore[import-not-found]

        if not cupy.cuda.is_available():
            return None
        cupy.zeros(1).sum()
        return cupy
    except Exception:  # ImportError, CUDARuntimeError, a driver mismatch...
        return None


def array_module(prefer_gpu: bool = True) -> ModuleType:
    return (gpu_array_module() if prefer_gpu else None) or np


def feature_moments(x: np.ndarray, prefer_gpu: bool = True) -> tuple[int, np.ndarray, np.ndarray]:
    """count, per-feature mean and M2 (sum of squared deviations) of x (N, F), in float64."""
    xp = array_module(prefer_gpu)
    data = xp.asarray(x, dtype=xp.float64)
    mean = data.mean(axis=0)
    m2 = ((data - mean) ** 2).sum(axis=0)
    if xp is not np:
        mean, m2 = xp.asnumpy(mean), xp.asnumpy(m2)
    return int(x.shape[0]), np.asarray(mean), np.asarray(m2)
