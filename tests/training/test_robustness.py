"""The robustness report's attacks (ART) against a hand computation, and its bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.training.errors import KilnError
from kiln.training.models import build_model
from kiln.training.robustness import (
    AttackRequest,
    attacked_inputs,
    check_attackable,
    robustness_report,
)

SPEC = {"kind": "logistic", "task": "classification", "num_features": 5, "classes": [0, 1, 2]}


def linear_model_and_rows() -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    rng = np.random.default_rng(7)
    return model, rng.normal(size=(64, 5)).astype(np.float32), rng.integers(0, 3, 64)


def hand_fgsm(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    """x + ε·sign(∇x loss) for softmax cross-entropy on z = Wx + b, computed by hand:
    ∇x = Wᵀ(softmax(z) − onehot(y)), with W and b read off the model by probing it."""
    with torch.no_grad():
        bias = model(torch.zeros(1, 5)).numpy()[0]
        weight = (model(torch.eye(5)).numpy() - bias).T  # (classes, features)
    logits = x @ weight.T + bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    gradient = (p - np.eye(3)[y]) @ weight
    return x + eps * np.sign(gradient)


def test_fgsm_on_a_linear_model_equals_the_hand_computation():
    model, x, y = linear_model_and_rows()
    attacked = attacked_inputs(model, x, y, 3, AttackRequest("fgsm", 0.25))
    np.testing.assert_allclose(attacked, hand_fgsm(model, x, y, 0.25), atol=1e-5)
    assert np.abs(attacked - x).max() == pytest.approx(0.25, abs=1e-6)


def test_attacks_lower_accuracy_and_pgd_stays_in_the_ball():
    model, x, _ = linear_model_and_rows()
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(dim=1).numpy()  # clean accuracy 1.0
    fgsm = robustness_report(model, x, y, 3, AttackRequest("fgsm", 1.0))
    pgd = robustness_report(model, x, y, 3, AttackRequest("pgd", 1.0, steps=20))
    assert fgsm["clean_accuracy"] == pgd["clean_accuracy"] == 1.0
    assert fgsm["attacked_accuracy"] < 1.0
    assert pgd["attacked_accuracy"] <= fgsm["attacked_accuracy"]
    assert pgd["max_change"] <= 1.0 + 1e-6


@pytest.mark.parametrize(
    ("attack", "epsilon", "steps", "flag"),
    [
        ("cw", 0.1, 10, "--attack"),
        ("fgsm", -0.1, 10, "--epsilon"),
        ("fgsm", 0.0, 10, "--epsilon"),
        ("pgd", float("nan"), 10, "--epsilon"),
        ("pgd", 0.1, 0, "--steps"),
    ],
)
def test_bad_requests_name_the_option(attack, epsilon, steps, flag):
    with pytest.raises(KilnError, match=f"for {flag}"):
        AttackRequest(attack, epsilon, steps)


def test_regressors_and_language_models_are_refused():
    with pytest.raises(KilnError, match="regression model"):
        check_attackable({"kind": "mlp", "task": "regression"}, "r@1")
    with pytest.raises(KilnError, match="language model"):
        check_attackable({"kind": "lm"}, "lm@1")
    check_attackable(SPEC, "c@1")
