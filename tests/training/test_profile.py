"""The latency profile's measurement (training/profile.py): no Ray, and no real timings.

A fake clock that each fake forward pass advances by a known cost makes every figure exact,
so the tests check the percentiles, the counts and the time bounds, never the machine.
"""

import numpy as np
import pytest

from kiln.training.profile import ProfileConfig, measure_latency


class FakeModel:
    """A forward pass whose cost (s) depends on the batch size and the call number."""

    def __init__(self, costs: dict[int, list[float]]) -> None:
        self.now = 100.0
        self.costs = costs
        self.calls = {batch: 0 for batch in costs}
        self.shapes: set[tuple[int, int]] = set()

    def clock(self) -> float:
        return self.now

    def forward(self, x: np.ndarray) -> np.ndarray:
        batch = len(x)
        self.shapes.add(x.shape)
        assert x.dtype == np.float32 and not x.any()  # zero rows: valid input for any model
        cycle = self.costs[batch]
        self.now += cycle[self.calls[batch] % len(cycle)]
        self.calls[batch] += 1
        return np.zeros((batch, 3), dtype=np.float32)


def test_percentiles_counts_and_rows_per_s_are_those_of_the_passes():
    # Batch 1: 1 ms, but every tenth pass 5 ms (so p99 is 5 ms); batch 64: always 8 ms.
    model = FakeModel({1: [0.001] * 9 + [0.005], 64: [0.008]})
    cfg = ProfileConfig(budget_s=0.50125, max_s=3.0, warmup_passes=2)  # off whole ms: no ties
    profile = measure_latency(model.forward, 7, threads=2, config=cfg, clock=model.clock)

    assert model.shapes == {(1, 7), (64, 7)}
    assert (profile["b1_p50_ms"], profile["b1_p99_ms"]) == (1.0, 5.0)
    assert (profile["b64_p50_ms"], profile["b64_p99_ms"]) == (8.0, 8.0)
    assert profile["rows_per_s_b64"] == 8000.0  # 64 rows / 8 ms
    # Each runs its share of the budget: batch 1 0.4 x 0.50125 s = 200.5 ms, which 145 passes
    # after the warm-up's two reach (131 of 1 ms, 14 of 5 ms: 201 ms); batch 64 300.75 ms.
    assert profile["passes_b1"] == 145 and profile["passes_b64"] == 38  # 38 x 8 = 304 ms
    assert model.calls == {1: 145 + 2, 64: 38 + 2}  # and the warm-up passes before them
    assert profile["complete"] is True
    assert profile["duration_s"] == pytest.approx(model.now - 100.0)
    assert (profile["threads"], profile["backend"]) == (2, "torch")
    assert profile["cpu_model"] and profile["torch_version"] and profile["measured_at"] > 0


def test_a_slow_model_stops_at_the_cap_and_says_its_counts_fell_short():
    model = FakeModel({1: [0.125], 64: [1.0]})
    cfg = ProfileConfig(budget_s=0.5, max_s=3.0, warmup_passes=1)
    profile = measure_latency(model.forward, 4, threads=1, config=cfg, clock=model.clock)

    # Caps: 0.4 x 3 s for batch 1 (ten passes of 125 ms), 0.6 x 3 s for batch 64 (two of 1 s).
    assert (profile["passes_b1"], profile["passes_b64"]) == (10, 2)
    assert profile["complete"] is False
    assert profile["b64_p50_ms"] == 1000.0


def test_a_fast_model_reaches_its_minimum_counts_and_the_pass_limit_bounds_it():
    model = FakeModel({1: [1e-6], 64: [1e-6]})
    cfg = ProfileConfig(budget_s=0.5, max_s=1.0, min_passes=(100, 20), max_passes=500)
    profile = measure_latency(model.forward, 4, threads=1, config=cfg, clock=model.clock)
    assert (profile["passes_b1"], profile["passes_b64"]) == (500, 500)
    assert profile["complete"] is True


@pytest.mark.parametrize(
    "kwargs",
    [
        {"budget_s": 0},
        {"budget_s": 2.0, "max_s": 1.0},
        {"share_b1": 1.0},
        {"min_passes": (0, 20)},
        {"min_passes": (100, 20), "max_passes": 50},
    ],
)
def test_a_config_that_cannot_bound_the_time_is_refused(kwargs):
    with pytest.raises(ValueError):
        ProfileConfig(**kwargs)


def test_a_real_model_gives_a_complete_json_ready_profile():
    """Shape only: a tiny torch model through the real clock (no timing is asserted)."""
    import json

    import torch

    from kiln.training.evaluate import predict_outputs
    from kiln.training.models import build_model

    model = build_model({"kind": "mlp", "task": "classification", "num_features": 4,
                         "classes": [0, 1], "hidden": [8]}).eval()  # fmt: skip
    cfg = ProfileConfig(budget_s=0.05, max_s=0.5, min_passes=(5, 2))
    profile = measure_latency(lambda x: predict_outputs(model, x), 4, threads=1, config=cfg)
    assert json.loads(json.dumps(profile)) == profile
    assert 0 < profile["b1_p50_ms"] <= profile["b1_p99_ms"]
    assert 0 < profile["b64_p50_ms"] <= profile["b64_p99_ms"]
    assert profile["torch_version"] == torch.__version__
