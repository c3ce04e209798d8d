"""Accuracy under adversarial attack: FGSM and PGD (L-inf) from the Adversarial Robustness
Toolbox, run on a Kiln classifier's test rows.

ART (a maintained library, Linux Foundation AI) makes the perturbed inputs; Kiln only wraps
the model and counts. Both attacks use the rows' true labels (not the model's predictions,
which would hide the attack from rows the model already gets wrong) and change each input by
at most epsilon, in the units of the model's inputs (the values a caller sends; the model's
own standardisation is a layer inside it). FGSM is one step, x + ε·sign(∇x loss); PGD takes
`steps` steps of 2.5·ε/steps, each projected back into the ε-ball, from x itself (no random
start, so a report is reproducible).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.training.errors import KilnError, check_options

ATTACKS = ("fgsm", "pgd")
BATCH_ROWS = 512


@dataclass(frozen=True)
class AttackRequest:
    attack: str
    epsilon: float
    steps: int = 10

    def __post_init__(self) -> None:
        check_options(
            [
                (self.attack in ATTACKS, "--attack", self.attack, "one of " + ", ".join(ATTACKS)),
                (
                    np.isfinite(self.epsilon) and self.epsilon > 0,
                    "--epsilon",
                    self.epsilon,
                    "a number above 0 (the largest change to each input)",
                ),
                (self.steps >= 1, "--steps", self.steps, "at least 1"),
            ]
        )


def check_attackable(spec: dict[str, Any], ref: str) -> None:
    """Only classifiers have an accuracy to attack."""
    if spec.get("kind") == "lm":
        raise KilnError(
            f"{ref} is a language model; --attack measures a classifier's accuracy "
            "(use kiln evaluate without --attack for perplexity)"
        )
    if spec.get("task") != "classification":
        raise KilnError(
            f"{ref} is a {spec.get('task', 'regression')} model; --attack measures a "
            "classifier's accuracy. Give a classifier."
        )


def attacked_inputs(
    model: nn.Module, x: np.ndarray, labels: np.ndarray, num_classes: int, request: AttackRequest
) -> np.ndarray:
    """The rows of x as the attack changes them (float32, same shape)."""
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(
        model=model.float().eval(),
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=num_classes,
        device_type="cpu",
    )
    if request.attack == "fgsm":
        attack: Any = FastGradientMethod(
            classifier, norm=np.inf, eps=request.epsilon, batch_size=BATCH_ROWS
        )
    else:
        attack = ProjectedGradientDescent(
            classifier,
            norm=np.inf,
            eps=request.epsilon,
            eps_step=2.5 * request.epsilon / request.steps,
            max_iter=request.steps,
            num_random_init=0,
            batch_size=BATCH_ROWS,
            verbose=False,
        )
    data = np.array(x, dtype=np.float32)  # a writable copy: shard arrays are read-only
    return np.asarray(attack.generate(x=data, y=labels.astype(np.int64)), dtype=np.float32)


@torch.inference_mode()
def accuracy(model: nn.Module, x: np.ndarray, labels: np.ndarray) -> float:
    outputs = model(torch.from_numpy(np.array(x, dtype=np.float32)))  # a writable copy
    return float((outputs.argmax(dim=1).numpy() == labels).mean())


def robustness_report(
    model: nn.Module, x: np.ndarray, labels: np.ndarray, num_classes: int, request: AttackRequest
) -> dict[str, Any]:
    """Clean and attacked accuracy on the same rows, and how far the attack moved them."""
    if len(x) == 0:
        raise KilnError("the test split is empty: there are no rows to attack")
    adversarial = attacked_inputs(model, x, labels, num_classes, request)
    return {
        "attack": request.attack,
        "epsilon": request.epsilon,
        "steps": request.steps if request.attack == "pgd" else 1,
        "norm": "inf",
        "rows": int(len(x)),
        "clean_accuracy": accuracy(model, x, labels),
        "attacked_accuracy": accuracy(model, adversarial, labels),
        "max_change": float(np.abs(adversarial - x).max()),
        "library": "adversarial-robustness-toolbox",
    }
