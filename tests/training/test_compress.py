"""Quantisation, pruning and the distillation loss as plain torch (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from kiln.training.artifacts import SPEC_FILE, WEIGHTS_FILE, model_from_files, model_to_files
from kiln.training.compress import (
    count_parameters,
    distillation_loss,
    parse_student,
    prune_model,
    quantize_model,
    student_spec,
)
from kiln.training.errors import CorruptArtifactError, KilnError
from kiln.training.models import build_model, set_standardization


def spec_of(kind: str = "mlp", features: int = 64, classes: int = 10, **extra) -> dict:
    spec = {
        "kind": kind,
        "task": "classification",
        "num_features": features,
        "classes": list(range(classes)),
        "mean": [0.5] * features,
        "std": [2.0] * features,
        **extra,
    }
    if kind == "mlp":
        spec.setdefault("hidden", [128, 64])
    return spec


def model_of(spec: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(spec)
    set_standardization(model, spec)
    return model.eval()


def rows(n: int = 400, features: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, features)).astype("f4"))


def outputs(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------- quantisation


def test_int8_files_hold_int8_tensors_and_rebuild_the_same_model():
    spec = spec_of()
    model = model_of(spec)
    quantized, qspec = quantize_model(model, spec)
    files = model_to_files(quantized, qspec)
    stored = load_safetensors(files[WEIGHTS_FILE])
    assert stored["body.0.weight_int8"].dtype == torch.int8
    assert stored["body.0.weight_int8"].shape == (128, 64)
    assert stored["body.0.weight_scale"].shape == (128,)
    assert json.loads(files[SPEC_FILE])["quantization"]["layers"] == ["body.0", "body.2", "body.4"]
    # About a quarter of the fp32 bytes (scales and biases stay float).
    assert len(files[WEIGHTS_FILE]) < 0.4 * len(model_to_files(model, spec)[WEIGHTS_FILE])
    loaded, _ = model_from_files(files)
    x = rows()
    assert torch.equal(outputs(loaded, x), outputs(quantized, x))
    # int8 is close to, not equal to, the fp32 model.
    difference = (outputs(loaded, x) - outputs(model, x)).abs().max()
    assert 0 < difference < 0.05


def test_quantising_twice_is_refused():
    spec = spec_of()
    quantized, qspec = quantize_model(model_of(spec), spec)
    with pytest.raises(KilnError, match="already quantised"):
        quantize_model(quantized, qspec)


def test_int8_weights_that_do_not_fit_the_spec_are_refused():
    spec = spec_of()
    quantized, qspec = quantize_model(model_of(spec), spec)
    files = model_to_files(quantized, qspec)
    state = load_safetensors(files[WEIGHTS_FILE])
    state["body.0.weight_int8"] = state["body.0.weight_int8"][:, :10].contiguous()
    with pytest.raises(CorruptArtifactError, match="body.0"):
        model_from_files({**files, WEIGHTS_FILE: save_safetensors(state)})
    state = load_safetensors(files[WEIGHTS_FILE])
    state["body.2.weight_scale"] = -state["body.2.weight_scale"]
    with pytest.raises(CorruptArtifactError, match="body.2"):
        model_from_files({**files, WEIGHTS_FILE: save_safetensors(state)})


def test_a_quantised_cnn_keeps_its_convolutions_in_fp32():
    spec = spec_of("cnn")
    quantized, qspec = quantize_model(model_of(spec), spec)
    assert qspec["quantization"]["layers"] == ["body.head"]
    loaded, _ = model_from_files(model_to_files(quantized, qspec))
    x = rows()
    assert torch.equal(outputs(loaded, x), outputs(quantized, x))


def test_no_pickle_in_int8_artifacts(tmp_path):
    spec = spec_of()
    quantized, qspec = quantize_model(model_of(spec), spec)
    path = tmp_path / "w.safetensors"
    path.write_bytes(model_to_files(quantized, qspec)[WEIGHTS_FILE])
    with safe_open(str(path), "pt") as stored:  # safetensors: a JSON header and raw tensors
        assert all(not key.endswith("_packed_params") for key in stored.keys())


# ----------------------------------------------------------------------------- pruning


def test_pruning_shrinks_the_matrices():
    spec = spec_of()
    model = model_of(spec)
    pruned, pruned_spec = prune_model(model, spec, 0.5)
    assert pruned_spec["hidden"] == [64, 32]
    state = pruned.state_dict()
    assert state["body.0.weight"].shape == (64, 64)
    assert state["body.2.weight"].shape == (32, 64)
    assert state["body.4.weight"].shape == (10, 32)
    assert count_parameters(pruned) < 0.45 * count_parameters(model)
    rebuilt, _ = model_from_files(model_to_files(pruned, pruned_spec))
    x = rows()
    assert torch.equal(outputs(rebuilt, x), outputs(pruned, x))


def test_pruning_removes_the_units_that_carry_nothing():
    """Half the hidden units have no outgoing weights: pruning half keeps the function."""
    spec = spec_of(hidden=[32])
    model = model_of(spec)
    with torch.no_grad():
        model.body[2].weight[:, 1::2] = 0.0  # units 1, 3, 5, ... feed nothing
        model.body[0].weight[::2] *= 0.01  # and 0, 2, 4 ... have small but useful inputs
    pruned, pruned_spec = prune_model(model, spec, 0.5)
    assert pruned_spec["hidden"] == [16]
    x = rows()
    assert torch.allclose(outputs(pruned, x), outputs(model, x), atol=1e-6)


def test_pruning_a_cnn_removes_channels():
    spec = spec_of("cnn")
    model = model_of(spec)
    pruned, pruned_spec = prune_model(model, spec, 0.5)
    assert pruned_spec["channels"] == [16, 32]
    assert pruned.state_dict()["body.features.2.weight"].shape == (32, 16, 3, 3)
    assert pruned.state_dict()["body.head.weight"].shape == (10, 128)
    # A tiny fraction keeps every channel: the copied weights compute the same function.
    same, _ = prune_model(model, spec, 0.001)
    x = rows()
    assert torch.allclose(outputs(same, x), outputs(model, x), atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_pruning_a_linear_model_says_there_is_nothing_to_prune(kind):
    spec = spec_of(kind)
    if kind == "linear":
        spec = {**spec, "task": "regression", "classes": None}
    with pytest.raises(KilnError, match="nothing to prune"):
        prune_model(model_of(spec), spec, 0.5)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_pruning_fractions_outside_zero_one_are_refused(fraction):
    spec = spec_of()
    with pytest.raises(KilnError, match="--prune"):
        prune_model(model_of(spec), spec, fraction)


# ----------------------------------------------------------------------------- distillation


@pytest.mark.parametrize("text,hidden", [("mlp:64", [64]), ("mlp:128,64", [128, 64])])
def test_student_specs_parse(text, hidden):
    assert parse_student(text) == hidden


@pytest.mark.parametrize("text", ["mlp", "mlp:", "cnn:64", "mlp:a", "mlp:0", "64"])
def test_bad_student_specs_are_refused(text):
    with pytest.raises(KilnError, match="--student"):
        parse_student(text)


def test_a_student_keeps_the_teachers_inputs_and_classes():
    teacher = spec_of("cnn", channels=[8, 16])
    quantized = {**teacher, "quantization": {"method": "dynamic-int8"}}
    student = student_spec(quantized, [32])
    assert student["kind"] == "mlp" and student["hidden"] == [32]
    assert "channels" not in student and "quantization" not in student
    assert student["mean"] == teacher["mean"] and student["classes"] == teacher["classes"]


def test_distillation_loss_mixes_soft_and_hard_targets():
    torch.manual_seed(0)
    student, teacher = torch.randn(32, 5), torch.randn(32, 5)
    labels = torch.randint(0, 5, (32,))
    hard = torch.nn.functional.cross_entropy(student, labels)
    only_labels = distillation_loss(student, teacher, labels, "classification", 4.0, 0.0)
    assert torch.allclose(only_labels, hard)
    # Matching the teacher exactly leaves no soft loss.
    assert distillation_loss(teacher, teacher, labels, "classification", 4.0, 1.0).abs() < 1e-6
    mixed = distillation_loss(student, teacher, labels, "classification", 4.0, 0.5)
    soft = distillation_loss(student, teacher, labels, "classification", 4.0, 1.0)
    assert torch.allclose(mixed, 0.5 * soft + 0.5 * hard)


def test_regression_distillation_pulls_towards_the_teacher():
    student, teacher = torch.zeros(8, 1), torch.ones(8, 1)
    targets = torch.full((8,), 3.0)
    soft = distillation_loss(student, teacher, targets, "regression", 1.0, 1.0, target_std=2.0)
    assert torch.isclose(soft, torch.tensor(0.5 * 1.0 / 4.0))
