"""The numpy path of preprocessing (the CuPy path is the same code on a GPU)."""

import sys
import types

import numpy as np
import pytest

from kiln.actors.shards import FeatureStats
from kiln.training.preprocess import array_module, feature_moments


def test_numpy_moments_equal_numpy_statistics():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(1000, 5)).astype(np.float32)
    count, mean, m2 = feature_moments(x, prefer_gpu=False)
    assert count == 1000
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m2 / count, x.astype(np.float64).var(axis=0), rtol=1e-10)


def test_merged_shard_moments_equal_the_whole_whatever_the_split():
    x = np.random.default_rng(1).normal(size=(999, 3)) * [1, 100, 1e-3]
    whole = FeatureStats(*feature_moments(x, prefer_gpu=False))
    merged = FeatureStats(0, np.zeros(0), np.zeros(0))
    for part in np.array_split(x, [10, 11, 500]):
        merged = merged.merge(FeatureStats(*feature_moments(part, prefer_gpu=False)))
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.std, whole.std, rtol=1e-10)


def test_without_a_gpu_the_array_module_is_numpy():
    import torch

    if not torch.cuda.is_available():
        assert array_module(prefer_gpu=True) is np


class FakeCupy(types.ModuleType):
    """Stands in for cupy: `available` says whether CUDA answers, `broken` fails the first array."""

    def __init__(self, available: bool, broken: bool = False) -> None:
        super().__init__("cupy")
        self.cuda = types.SimpleNamespace(is_available=lambda: available)
        self.broken = broken

    def zeros(self, n: int) -> np.ndarray:
        if self.broken:
            raise RuntimeError("cudaErrorInsufficientDriver")
        return np.zeros(n)


@pytest.mark.parametrize(
    "fake,prefer_gpu,chosen",
    [
        (FakeCupy(available=True), True, "cupy"),
        (FakeCupy(available=True), False, "numpy"),  # asked not to, though a GPU answers
        (FakeCupy(available=False), True, "numpy"),
        (FakeCupy(available=True, broken=True), True, "numpy"),  # imports, fails at first use
        (None, True, "numpy"),  # not installed
    ],
)
def test_the_gpu_module_is_used_only_when_asked_for_and_working(
    fake, prefer_gpu, chosen, monkeypatch
):
    monkeypatch.setitem(sys.modules, "cupy", fake)  # None: `import cupy` raises ImportError
    assert array_module(prefer_gpu=prefer_gpu).__name__ == chosen
