"""Typed training configuration, validated once before anything reaches a worker."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from training.errors import KilnError
from training.models import MODEL_KINDS

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "step", "cosine")
GPU_MODES = ("auto", "on", "off")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise KilnError(message)


@dataclass(kw_only=True)
class TrainConfig:
    """What to train and how; every field maps to a `kiln train` option of the same name."""

    model: str = "mlp"
    """Model kind: linear, ridge, logistic, mlp or cnn."""
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    """Hidden layer widths of the MLP."""
    workers: int = 2
    """Ray Train workers (data-parallel ranks)."""
    epochs: int = 30
    """Passes over the training shards."""
    batch_size: int = 64
    """Rows per step on each worker."""
    optimizer: str = "adam"
    lr: float = 1e-3
    """Learning rate."""
    l2: float = 0.0
    """λ, the L2 coefficient (DESIGN.md); biases are not penalised."""
    momentum: float = 0.9
    """SGD momentum."""
    lr_schedule: str = "constant"
    seed: int = 0
    gpu: str = "auto"
    """auto: use CUDA when the cluster has GPUs; on: require them; off: CPU only."""

    def __post_init__(self) -> None:
        _require(
            self.model in MODEL_KINDS,
            f'Got "{self.model}" for --model. Choose one of: {", ".join(MODEL_KINDS)}.',
        )
        _require(self.workers >= 1, f'Got "{self.workers}" for --workers. --workers must be at least 1.')
        _require(self.epochs >= 1, f'Got "{self.epochs}" for --epochs. --epochs must be at least 1.')
        _require(
            self.batch_size >= 1,
            f'Got "{self.batch_size}" for --batch-size. --batch-size must be at least 1.',
        )
        _require(
            self.optimizer in OPTIMIZERS,
            f'Got "{self.optimizer}" for --optimizer. Choose one of: {", ".join(OPTIMIZERS)}.',
        )
        _require(
            self.lr > 0 and self.lr < 10,
            f'Got "{self.lr}" for --lr. --lr must be greater than 0 and below 10.',
        )
        _require(self.l2 >= 0, f'Got "{self.l2}" for --l2. --l2 (λ) must be 0 or more.')
        _require(
            self.lr_schedule in LR_SCHEDULES,
            f'Got "{self.lr_schedule}" for --lr-schedule. Choose one of: {", ".join(LR_SCHEDULES)}.',
        )
        _require(
            self.gpu in GPU_MODES,
            f'Got "{self.gpu}" for --gpu. Choose one of: {", ".join(GPU_MODES)}.',
        )
        _require(
            all(w >= 1 for w in self.hidden) and len(self.hidden) >= 1,
            f'Got "{self.hidden}" for --hidden. Give one or more widths of at least 1, e.g. 128,64.',
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
