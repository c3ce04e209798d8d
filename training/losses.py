"""Losses with Kiln's L2 convention.

J(θ) = (1/2m)·Σ(h(x)-y)² + (λ/2m)·Σθ² for regression; cross-entropy plus the same penalty for
classification. m is the number of training rows, so a minibatch loss is an unbiased estimate
of J. Biases and standardisation buffers are excluded from the penalty.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def penalized_weights(model: nn.Module) -> list[torch.Tensor]:
    """Weight matrices and kernels only: parameters named `*.bias` are not penalised."""
    return [p for name, p in model.named_parameters() if not name.endswith("bias")]


def l2_penalty(model: nn.Module, l2: float, num_train_rows: int) -> torch.Tensor:
    weights = penalized_weights(model)
    total = sum((w.pow(2).sum() for w in weights), torch.zeros((), device=weights[0].device))
    return (l2 / (2.0 * num_train_rows)) * total


def data_loss(outputs: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(outputs, targets)  # outputs (B, K), targets (B,)
    return 0.5 * F.mse_loss(outputs.squeeze(-1), targets)  # (1/2m)·Σ(h-y)²


def objective(
    model: nn.Module,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    task: str,
    l2: float,
    num_train_rows: int,
    target_std: float = 1.0,
) -> torch.Tensor:
    """J for classification; J/σ² for a regressor whose body predicts the standardised target
    (the same minimiser, since its weights are the original ones divided by σ)."""
    loss = data_loss(outputs, targets, task) / (target_std**2)
    if l2 > 0:
        loss = loss + l2_penalty(model, l2, num_train_rows)
    return loss
