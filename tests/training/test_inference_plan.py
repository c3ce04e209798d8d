"""InferencePlan: a model's eval forward as flat tensor operations gives the model's outputs bit
for bit, and a model it does not recognise has none. No Ray."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn.utils import prune

from kiln.training.compress import prune_model, quantize_model
from kiln.training.evaluate import InferencePlan, predict_outputs
from kiln.training.models import build_model, set_standardization
from kiln.training.tabular import Encoding
from tests.training.test_tabular_encoding import INPUTS

RNG = np.random.default_rng(7)
FEATURES = 12


def model_of(**spec: Any) -> tuple[Any, dict[str, Any]]:
    torch.manual_seed(1)
    spec = {"num_features": FEATURES, "task": "classification", "classes": [0, 1, 2], **spec}
    spec.setdefault("mean", RNG.normal(3, 2, spec["num_features"]).tolist())
    spec.setdefault("std", RNG.uniform(0.5, 4, spec["num_features"]).tolist())
    model = build_model(spec)
    set_standardization(model, spec)
    return model.eval(), spec


def rows(n: int, width: int = FEATURES) -> np.ndarray:
    return RNG.normal(3, 3, (n, width)).astype(np.float32)


def same_as_the_model(model: Any, x: np.ndarray) -> np.ndarray:
    plan = InferencePlan.of(model)
    assert plan is not None
    got, expected = plan(x), predict_outputs(model, x)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got, expected, equal_nan=True)  # bit for bit, not close
    return got


PCA = {"components": RNG.normal(0, 1, (5, FEATURES)).tolist()}


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "mlp", "hidden": [32, 16]},
        {"kind": "mlp", "hidden": [32], "dropout": 0.3},
        {"kind": "logistic"},
        {"kind": "mlp", "hidden": [8], "pca": PCA},
        {"kind": "linear", "task": "regression", "target_mean": 250.0, "target_std": 40.0},
        {"kind": "ridge", "task": "regression"},
    ],
    ids=["mlp", "dropout", "logistic", "pca", "linear-scaled-target", "ridge"],
)
def test_the_plan_gives_the_models_outputs_bit_for_bit(spec):
    model, _ = model_of(**spec)
    for n in (1, 3, 257):
        same_as_the_model(model, rows(n))
    # Past the chunk size, chunked as predict_outputs does; float64 rows rounded as it does.
    plan = InferencePlan.of(model)
    assert plan is not None
    x = rows(40).astype(np.float64)
    assert np.array_equal(plan(x, max_batch_rows=16), predict_outputs(model, x))
    assert plan(rows(0)).shape == predict_outputs(model, rows(0)).shape


def test_a_scaled_target_is_scaled_and_an_unscaled_one_costs_no_operation():
    scaled, _ = model_of(kind="linear", task="regression", target_mean=250.0, target_std=40.0)
    plain, _ = model_of(kind="logistic")
    x = rows(50)
    assert abs(float(same_as_the_model(scaled, x).mean()) - 250.0) < 120
    plain_plan, scaled_plan = InferencePlan.of(plain), InferencePlan.of(scaled)
    assert plain_plan is not None and scaled_plan is not None
    assert len(scaled_plan.steps) == len(plain_plan.steps) + 1


def test_encoded_inputs_with_missing_values_and_categories():
    spec_inputs = {"inputs": INPUTS}
    encoding = Encoding.from_spec(spec_inputs)
    model, _ = model_of(kind="mlp", hidden=[16], num_features=encoding.num_features, **spec_inputs)
    raw = np.empty((60, encoding.num_inputs), dtype=np.float32)
    raw[:, 0] = np.where(RNG.random(60) < 0.3, np.nan, RNG.normal(40, 10, 60))
    raw[:, 1] = np.where(RNG.random(60) < 0.3, np.nan, RNG.normal(5e4, 1e4, 60))
    for position in (2, 3, 4):
        raw[:, position] = RNG.integers(0, encoding.inputs[position].width, 60)
    same_as_the_model(model, raw)
    numbers = [
        {"name": "a", "kind": "numeric", "type": "double", "impute": 1.0},
        {"name": "b", "kind": "numeric", "type": "double", "impute": 2.0},
    ]
    numeric, _ = model_of(kind="mlp", hidden=[4], num_features=2, inputs=numbers)
    same_as_the_model(numeric, np.array([[np.nan, 3.0], [4.0, np.nan]], dtype=np.float32))


def test_read_only_rows_are_copied_not_written():
    model, _ = model_of(kind="mlp", hidden=[8])
    x = rows(5)
    x.flags.writeable = False
    same_as_the_model(model, x)


def test_models_the_plan_does_not_know_run_through_the_model():
    cnn, _ = model_of(kind="cnn", num_features=64)
    assert InferencePlan.of(cnn) is None
    mlp, spec = model_of(kind="mlp", hidden=[16, 8])
    quantized, _ = quantize_model(mlp, spec)
    assert InferencePlan.of(quantized) is None
    hooked = copy.deepcopy(mlp)
    prune.l1_unstructured(hooked.body[0], "weight", amount=0.5)  # a mask applied by a hook
    assert InferencePlan.of(hooked) is None
    assert InferencePlan.of(copy.deepcopy(mlp).train()) is None
    # Kiln's own pruning gives a smaller plain model, which has a plan again.
    pruned, _ = prune_model(mlp, spec, 0.5)
    same_as_the_model(pruned.eval(), rows(9))


def test_weights_loaded_in_place_after_the_plan_are_used():
    model, _ = model_of(kind="mlp", hidden=[8])
    plan = InferencePlan.of(model)
    assert plan is not None
    x = rows(4)
    before = plan(x)
    with torch.no_grad():
        model.body[0].weight.mul_(2)
    assert not np.array_equal(plan(x), before)
    assert np.array_equal(plan(x), predict_outputs(model, x))
