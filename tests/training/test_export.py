"""kiln.training.export: ONNX export of every model kind, int8, and the checks. No Ray.

Each export runs the real dynamo exporter and ONNX Runtime (2-3 s each here, 5 s for the
first of a process); the models are built from specs as the registry rebuilds them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import pytest
import torch

from kiln.training.evaluate import evaluate_model, predict_outputs
from kiln.training.export import (
    FP32_MAX_ABS_DIFF,
    ONNXRUNTIME,
    TORCH,
    OnnxModel,
    check_onnx,
    compare_outputs,
    int8_export,
    onnx_bytes,
    onnx_metrics,
    quantize_onnx,
    serving_backend,
)
from kiln.training.models import KilnModel, build_model, num_inputs, set_standardization
from kiln.training.tabular import Encoding
from tests.training.test_tabular_encoding import INPUTS

TABLE_FEATURES = Encoding.from_spec({"inputs": INPUTS}).num_features  # type: ignore[union-attr]


def table_spec(kind: str, **extra) -> dict:
    """A spec as make_spec writes one for a table with categoricals and a column with gaps."""
    mean = [0.0] * TABLE_FEATURES
    std = [1.0] * TABLE_FEATURES
    mean[0], std[0] = 41.5, 12.0  # age (its indicator follows it)
    mean[2], std[2] = 50000.0, 15000.0  # income
    spec = {
        "kind": kind,
        "task": "classification",
        "classes": ["no", "yes"],
        "num_features": TABLE_FEATURES,
        "inputs": INPUTS,
        "label": {"name": "churn", "type": "string"},
        "mean": mean,
        "std": std,
        **extra,
    }
    if spec["task"] == "regression":
        spec.pop("classes")
    return spec


def table_rows(n: int, seed: int = 0) -> np.ndarray:
    """Raw inputs: ages and incomes with gaps (NaN), every slot of each categorical (its
    categories, other, missing)."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, 5), dtype=np.float32)
    x[:, 0] = rng.normal(41.5, 12.0, n)
    x[:, 1] = rng.normal(50000.0, 15000.0, n)
    x[:, 2] = rng.integers(0, 5, n)  # city: 3 categories, other, missing
    x[:, 3] = rng.integers(0, 4, n)  # vip
    x[:, 4] = rng.integers(0, 5, n)  # tier
    x[rng.random(n) < 0.2, 0] = np.nan
    x[rng.random(n) < 0.1, 1] = np.nan
    return x


def built(spec: dict, seed: int = 0) -> KilnModel:
    torch.manual_seed(seed)
    model = build_model(spec)
    set_standardization(model, spec)
    return model.eval()


def pixel_spec(kind: str, **extra) -> dict:
    """Digits-shaped: 64 numeric inputs recorded (NaN imputed), as kiln train writes them."""
    inputs = [
        {"name": f"f{i}", "kind": "numeric", "type": "double", "impute": 4.0} for i in range(64)
    ]
    return {
        "kind": kind,
        "task": "classification",
        "classes": list(range(10)),
        "num_features": 64,
        "inputs": inputs,
        "mean": [4.0] * 64,
        "std": [5.0] * 64,
        **extra,
    }


def pca_of(num_features: int, k: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(num_features, k)))
    return {"components": q.T.tolist(), "requested": k, "variance_kept": 0.9}


SPECS = {
    "logistic-table": table_spec("logistic"),
    "mlp-table": table_spec("mlp", hidden=[16, 8]),
    "mlp-table-pca": table_spec("mlp", hidden=[16], pca=pca_of(TABLE_FEATURES, 5)),
    "ridge-table-income": table_spec(
        "ridge", task="regression", target_mean=50000.0, target_std=15000.0
    ),
    "cnn-pixels": pixel_spec("cnn"),
    "logistic-pixels-pca": pixel_spec("logistic", pca=pca_of(64, 20)),
    "linear-no-inputs": {
        "kind": "linear",
        "task": "regression",
        "num_features": 3,
        "mean": [1.0, 2.0, 3.0],
        "std": [2.0, 2.0, 2.0],
        "target_mean": 100.0,
        "target_std": 30.0,
    },
}
SLOW = {"logistic-pixels-pca", "linear-no-inputs", "logistic-table", "mlp-table"}


def rows_for(spec: dict, n: int) -> np.ndarray:
    if spec.get("inputs") == INPUTS:
        return table_rows(n)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 16, size=(n, num_inputs(spec))).astype(np.float32)
    if spec.get("inputs"):
        x[rng.random(x.shape) < 0.05] = np.nan  # missing pixels: imputed by the model
    return x


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in SPECS],
)
def test_every_model_kind_exports_and_answers_as_torch_does(name):
    spec = SPECS[name]
    model = built(spec)
    data = onnx_bytes(model, spec)
    x = rows_for(spec, 200)
    found = check_onnx(model, spec, data, x)
    assert found["within_tolerance"] and found["rows"] == 200
    if spec["task"] == "classification":
        assert found["max_abs_diff"] <= FP32_MAX_ABS_DIFF and found["agreement"] == 1.0
    # The batch dimension is dynamic: one row, and a batch size never traced, answer too.
    session = OnnxModel(data)
    for rows in (x[:1], x[:37]):
        np.testing.assert_allclose(
            session.forward(rows), predict_outputs(model, rows), rtol=1e-5, atol=1e-4
        )
    graph = onnx.load_model_from_string(data).graph
    (given,) = graph.input
    dims = given.type.tensor_type.shape.dim
    assert given.name == "inputs" and graph.output[0].name == "outputs"
    assert dims[0].dim_param and dims[1].dim_value == num_inputs(spec)


def digits_split() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order].astype(np.float32), y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def fitted(spec: dict, x: np.ndarray, y: np.ndarray, steps: int) -> KilnModel:
    """The model of `spec` fitted to (x, y) by full-batch Adam in this process."""
    model = built(spec)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        optimizer.step()
    return model.eval()


def trained_digits_mlp(hidden: tuple[int, ...] = (128, 64), steps: int = 300) -> tuple:
    """An MLP fitted on digits in this process (about a second): a trained model's logits,
    not a random one's near-ties, are what int8 is judged on."""
    x_train, y_train, x_test, y_test = digits_split()
    spec = pixel_spec("mlp", hidden=list(hidden))
    spec["mean"] = x_train.mean(axis=0).tolist()
    spec["std"] = np.maximum(x_train.std(axis=0), 1e-3).tolist()
    return fitted(spec, x_train, y_train, steps), spec, x_test, y_test


def test_int8_keeps_the_first_layer_fp32_when_all_int8_misses_the_bar():
    """A digits MLP trained as kiln train trains one (Adam, batches of 32, 8 epochs): with
    every layer int8 it keeps the class of 99.24% of these rows, under the bar."""
    from kiln.training.errors import KilnError

    x_train, y_train, x_test, _ = digits_split()
    spec = pixel_spec("mlp", hidden=[128, 64])
    std = x_train.std(axis=0)
    spec["mean"], spec["std"] = x_train.mean(axis=0).tolist(), np.where(std > 0, std, 1).tolist()
    model = built(spec, seed=2).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(2)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(8):
        perm = torch.randperm(len(xt), generator=order)
        for start in range(0, len(xt), 32):
            batch = perm[start : start + 32]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            optimizer.step()
    model.eval()
    fp32 = onnx_bytes(model, spec)
    with pytest.raises(KilnError, match="under the 99.5% bar"):
        check_onnx(model, spec, quantize_onnx(fp32), x_test, quantized=True)
    data, check = int8_export(model, spec, fp32, x_test)
    assert check["first_layer"] == "fp32" and check["agreement"] >= 0.995
    ops = [node.op_type for node in onnx.load_model_from_string(data).graph.node]
    assert ops.count("MatMulInteger") == 2 and ops.count("Gemm") + ops.count("MatMul") == 1


def table_labels(x: np.ndarray) -> np.ndarray:
    """churn: older customers in paris or tokyo, and anyone with a missing income."""
    age = np.nan_to_num(x[:, 0], nan=41.5)
    return (((age > 45) & (x[:, 2] >= 1) & (x[:, 2] <= 2)) | np.isnan(x[:, 1])).astype(np.int64)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "logistic-table"])
def test_int8_keeps_the_classes_of_a_trained_cnn_and_table_model(kind):
    if kind == "cnn":
        x_train, y_train, x_test, _ = digits_split()
        spec = pixel_spec("cnn")
        spec["mean"], spec["std"] = [float(x_train.mean())] * 64, [float(x_train.std())] * 64
        model = fitted(spec, x_train[:500], y_train[:500], steps=25)
    else:
        spec = table_spec("logistic")
        x_train, x_test = table_rows(2000, seed=1), table_rows(1000, seed=2)
        model = fitted(spec, x_train, table_labels(x_train), steps=300)
    int8 = quantize_onnx(onnx_bytes(model, spec))
    assert check_onnx(model, spec, int8, x_test, quantized=True)["agreement"] >= 0.995


@functools.cache
def trained_digits_export() -> tuple:
    """The trained digits MLP, its test rows, its fp32 and int8 exports: made once per test
    process (the serving tests use them too)."""
    model, spec, x_test, y_test = trained_digits_mlp()
    fp32 = onnx_bytes(model, spec)
    return model, spec, x_test, y_test, fp32, quantize_onnx(fp32)


@pytest.fixture(scope="module")
def digits_export():
    return trained_digits_export()


def test_int8_keeps_the_classes_and_shrinks_the_file(digits_export):
    model, spec, x_test, y_test, fp32, int8 = digits_export
    found = check_onnx(model, spec, int8, x_test, quantized=True)
    assert found["agreement"] >= 0.995 and found["quantized"] == "int8"
    assert found["max_abs_diff"] > 0  # it is really another model: its weights are int8
    assert len(int8) < 0.4 * len(fp32)
    ops = {node.op_type for node in onnx.load_model_from_string(int8).graph.node}
    assert "MatMulInteger" in ops and "Gemm" not in ops
    torch_accuracy = evaluate_model(model, spec, x_test, y_test)["accuracy"]
    assert torch_accuracy > 0.9
    assert onnx_metrics(int8, spec, x_test, y_test)["accuracy"] == pytest.approx(
        torch_accuracy, abs=0.01
    )


def test_fp32_metrics_through_onnx_runtime_equal_torch_evaluation(digits_export):
    model, spec, x_test, y_test, fp32, _ = digits_export
    assert onnx_metrics(fp32, spec, x_test, y_test) == evaluate_model(model, spec, x_test, y_test)


def test_an_export_that_misses_its_bar_is_refused(digits_export):
    from kiln.training.errors import KilnError

    model, spec, x_test, _, fp32, _ = digits_export
    other = built(spec, seed=7)  # other weights: what a wrong export would answer
    with pytest.raises(KilnError, match="differs from the torch model by up to .* 0.0001 bar"):
        check_onnx(other, spec, fp32, x_test)
    with pytest.raises(KilnError, match=r"agrees with the torch model on .*under the 99.5% bar"):
        check_onnx(model, spec, onnx_bytes(other, spec), x_test, quantized=True)
    with pytest.raises(KilnError, match="no rows to check"):
        check_onnx(model, spec, fp32, x_test[:0])


def test_compare_outputs_bars():
    classifier = {"task": "classification"}
    logits = np.array([[1.0, 2.0], [3.0, -1.0]], dtype=np.float32)
    assert compare_outputs(logits, logits + 5e-5, classifier).within_tolerance
    assert not compare_outputs(logits, logits + 2e-4, classifier).within_tolerance
    flipped = compare_outputs(logits, logits[:, ::-1].copy(), classifier)
    assert flipped.agreement == 0.0
    nan = logits.copy()
    nan[0, 0] = math.nan
    assert not compare_outputs(logits, nan, classifier).within_tolerance
    # A regressor's outputs are in the target's units: past 1, the bar is relative.
    regressor = {"task": "regression"}
    incomes = np.array([[52000.0], [61000.0], [0.5]], dtype=np.float32)
    assert compare_outputs(incomes, incomes + np.float32([[4.0], [-4.0], [0.0]]), regressor)
    assert not compare_outputs(incomes, incomes + 7.0, regressor).within_tolerance
    assert not compare_outputs(
        incomes, incomes + np.float32([[0], [0], [2e-4]]), regressor
    ).within_tolerance
    assert compare_outputs(incomes, incomes, regressor).agreement == 1.0


def test_serving_backend_resolves_auto_and_refuses_what_cannot_run():
    from kiln.training.errors import KilnError

    plain, exported = {"model.safetensors": "a"}, {"model.safetensors": "a", "model.onnx": "b"}
    spec, int8 = {"kind": "mlp"}, {"kind": "mlp", "onnx_quantized": "int8"}
    assert serving_backend(spec, plain, "auto", "m@1") == TORCH
    assert serving_backend(spec, exported, "auto", "m@1") == ONNXRUNTIME
    assert serving_backend(spec, exported, "torch", "m@1") == TORCH
    assert serving_backend(int8, exported, "auto", "m@2") == ONNXRUNTIME
    with pytest.raises(
        KilnError, match=r"m@1 has no model.onnx .* `kiln export m@1 --format onnx`"
    ):
        serving_backend(spec, plain, "onnxruntime", "m@1")
    with pytest.raises(
        KilnError, match="m@2 is an ONNX int8 variant.*--backend onnxruntime or auto"
    ):
        serving_backend(int8, exported, "torch", "m@2")
    with pytest.raises(KilnError, match='Got "tensorrt" for --backend'):
        serving_backend(spec, exported, "tensorrt", "m@1")
