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


def _require_choice(value: str, options: tuple[str, ...], option: str) -> None:
    _require(value in options, f'Got "{value}" for {option}. Choose one of: {", ".join(options)}.')


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
    patience: int = 0
    """Early stopping: stop after this many epochs without a better validation loss (0: off)."""
    gpu: str = "auto"
    """auto: use CUDA when the cluster has GPUs; on: require them; off: CPU only."""
    cpus_per_worker: int | None = None
    """CPUs each Train worker reserves, and its torch threads (None: its share of the free
    CPUs, so one worker on an idle 2-core node uses both)."""
    grad_accum: int = 1
    """Micro-batches whose gradients add up (DDP syncs once per group) before one step."""
    bucket_cap_mb: float | None = None
    """DDP's gradient bucket size in MB (None: DDP's default, 25)."""

    def __post_init__(self) -> None:
        _require_choice(self.model, MODEL_KINDS, "--model")
        _require_choice(self.optimizer, OPTIMIZERS, "--optimizer")
        _require_choice(self.lr_schedule, LR_SCHEDULES, "--lr-schedule")
        _require_choice(self.gpu, GPU_MODES, "--gpu")
        for option, value in (
            ("--workers", self.workers),
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("--grad-accum", self.grad_accum),
            ("--cpus-per-worker", 1 if self.cpus_per_worker is None else self.cpus_per_worker),
        ):
            _require(value >= 1, f'Got "{value}" for {option}. {option} must be at least 1.')
        _require(
            0 < self.lr < 10, f'Got "{self.lr}" for --lr. --lr must be greater than 0 and below 10.'
        )
        _require(self.patience >= 0, f'Got "{self.patience}" for --patience. Use 0 (off) or more.')
        _require(
            self.bucket_cap_mb is None or self.bucket_cap_mb > 0,
            f'Got "{self.bucket_cap_mb}" for --bucket-cap-mb. It must be greater than 0.',
        )
        _require(self.l2 >= 0, f'Got "{self.l2}" for --l2. --l2 (λ) must be 0 or more.')
        _require(
            len(self.hidden) >= 1 and all(w >= 1 for w in self.hidden),
            f'Got "{self.hidden}" for --hidden. Give widths of at least 1, e.g. 128,64.',
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
