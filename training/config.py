"""Typed training configuration, validated once before anything reaches a worker."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from kiln.training.errors import KilnError

MODEL_KINDS = ("linear", "ridge", "logistic", "mlp", "cnn")

OPTIMIZERS = ("sgd", "adam", "adamw")
SOLVERS = ("auto", "exact", "lbfgs", *OPTIMIZERS)
CONVEX_KINDS = ("linear", "ridge", "logistic")
PLANNED_STEPS = 600
MIN_EPOCHS = 30
MAX_EPOCHS = 300
DEFAULT_L2 = {"ridge": 1.0, "logistic": 1.0}
"""λ when the user gives none: scikit-learn's defaults (Ridge alpha=1; LogisticRegression C=1
for several classes, C=2 for two: see docs/commands.md, λ and scikit-learn). Other kinds: 0."""
LR_SCHEDULES = ("constant", "step", "cosine")
GPU_MODES = ("auto", "on", "off")
GRAD_SYNCS = ("auto", "ddp")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise KilnError(message)


def require_choice(value: str, options: tuple[str, ...], option: str) -> None:
    """`Got "x" for --option. Choose one of: ...` unless value is one of options."""
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
    epochs: int | None = 30
    """Passes over the training shards. None: planned from the rows (`planned`)."""
    batch_size: int = 64
    """Rows per step on each worker."""
    optimizer: str = "adam"
    lr: float = 1e-3
    """Learning rate."""
    l2: float | None = None
    """λ, the L2 coefficient (DESIGN.md); biases are not penalised. None: DEFAULT_L2."""
    solver: str = "auto"
    """exact (linear, ridge), lbfgs (linear, ridge, logistic: full batch), or sgd|adam|adamw
    (minibatches through Ray Train). auto: exact for linear and ridge, lbfgs for logistic,
    --optimizer for mlp and cnn."""
    max_iter: int = 1000
    """Most L-BFGS iterations."""
    tol: float = 1e-6
    """L-BFGS stops when no component of J's gradient exceeds this."""
    momentum: float = 0.9
    """SGD momentum."""
    lr_schedule: str = "constant"
    seed: int = 0
    patience: int | None = 0
    """Early stopping: stop after this many epochs without a better validation loss (0: off).
    None: a tenth of the epochs, at least 5."""
    gpu: str = "auto"
    """auto: use CUDA when the cluster has GPUs; on: require them; off: CPU only."""
    cpus_per_worker: int | None = None
    """CPUs each Train worker reserves, and its torch threads (None: its share of the free
    CPUs, so one worker on an idle 2-core node uses both)."""
    grad_accum: int = 1
    """Micro-batches whose gradients add up (DDP syncs once per group) before one step."""
    bucket_cap_mb: float | None = None
    """DDP's gradient bucket size in MB (None: DDP's default, 25)."""
    grad_sync: str = "auto"
    """How several workers average gradients. auto: through shared memory when every worker
    runs on one node's CPU with the shard feed (training/grad_sync.py), else DDP; ddp: DDP."""
    pca: float | None = None
    """PCA on the standardised features, a fixed layer of the model: a share of the variance
    to keep (0 < pca < 1) or a number of components (a whole number ≥ 1). None: no PCA."""

    def __post_init__(self) -> None:
        require_choice(self.model, MODEL_KINDS, "--model")
        require_choice(self.solver, SOLVERS, "--solver")
        if self.l2 is None:
            self.l2 = DEFAULT_L2.get(self.model, 0.0)
        self._check_solver()
        require_choice(self.optimizer, OPTIMIZERS, "--optimizer")
        require_choice(self.lr_schedule, LR_SCHEDULES, "--lr-schedule")
        require_choice(self.gpu, GPU_MODES, "--gpu")
        require_choice(self.grad_sync, GRAD_SYNCS, "--grad-sync")
        for option, value in (
            ("--workers", self.workers),
            ("--epochs", 1 if self.epochs is None else self.epochs),
            ("--batch-size", self.batch_size),
            ("--grad-accum", self.grad_accum),
            ("--cpus-per-worker", 1 if self.cpus_per_worker is None else self.cpus_per_worker),
        ):
            _require(value >= 1, f'Got "{value}" for {option}. {option} must be at least 1.')
        _require(
            0 < self.lr < 10, f'Got "{self.lr}" for --lr. --lr must be greater than 0 and below 10.'
        )
        _require(
            self.patience is None or self.patience >= 0,
            f'Got "{self.patience}" for --patience. Use 0 (off) or more.',
        )
        _require(
            self.bucket_cap_mb is None or self.bucket_cap_mb > 0,
            f'Got "{self.bucket_cap_mb}" for --bucket-cap-mb. It must be greater than 0.',
        )
        _require(self.penalty >= 0, f'Got "{self.l2}" for --l2. --l2 (λ) must be 0 or more.')
        _require(self.max_iter >= 1, f'Got "{self.max_iter}" for --max-iter. Use 1 or more.')
        _require(
            self.pca is None
            or (0 < self.pca < 1)
            or (self.pca >= 1 and float(self.pca).is_integer()),
            f'Got "{self.pca}" for --pca. Give a share of the variance in (0, 1), e.g. 0.95, '
            "or a whole number of components, e.g. 20.",
        )
        _require(
            self.pca is None or self.model != "cnn",
            "Got --pca with --model cnn, which reads the pixels as an image. Use mlp or "
            "logistic with --pca.",
        )
        _require(0 < self.tol < 1, f'Got "{self.tol}" for --tol. Use a value in (0, 1), e.g. 1e-6.')
        _require(
            len(self.hidden) >= 1 and all(w >= 1 for w in self.hidden),
            f'Got "{self.hidden}" for --hidden. Give widths of at least 1, e.g. 128,64.',
        )

    def _check_solver(self) -> None:
        if self.solver == "exact":
            _require(
                self.model in ("linear", "ridge"),
                f'Got "--solver exact" for --model {self.model}. The exact solver fits linear '
                "and ridge; use --solver lbfgs for logistic, adam|sgd|adamw for mlp and cnn.",
            )
        if self.solver == "lbfgs":
            _require(
                self.model in CONVEX_KINDS,
                f'Got "--solver lbfgs" for --model {self.model}. L-BFGS fits the convex models '
                "(linear, ridge, logistic); use --solver adam|sgd|adamw for mlp and cnn.",
            )
        if self.solver in OPTIMIZERS:
            self.optimizer = self.solver

    @property
    def resolved_solver(self) -> str:
        """exact, lbfgs, or `minibatch` (Ray Train with --optimizer)."""
        if self.solver == "auto":
            return {"linear": "exact", "ridge": "exact", "logistic": "lbfgs"}.get(
                self.model, "minibatch"
            )
        return self.solver if self.solver in ("exact", "lbfgs") else "minibatch"

    @property
    def penalty(self) -> float:
        """λ as a number (None is replaced in __post_init__)."""
        return float(self.l2 or 0.0)

    def planned(self, rows_per_worker: int) -> TrainConfig:
        """This config with `epochs` and `patience` chosen when left to Kiln (None).

        Epochs are planned in optimizer steps: a small dataset has few steps per epoch (iris on
        2 workers: one), so a fixed 30 epochs left it far from converged (test accuracy 0.90).
        Enough epochs for PLANNED_STEPS steps, between MIN_EPOCHS and MAX_EPOCHS; early stopping
        waits a tenth of them (at least 5) for a better validation loss.
        """
        epochs = self.epochs
        if epochs is None:
            steps_per_epoch = max(1, math.ceil(rows_per_worker / self.batch_size))
            wanted = math.ceil(PLANNED_STEPS / steps_per_epoch)
            epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, wanted))
        patience = max(5, epochs // 10) if self.patience is None else self.patience
        return dataclasses.replace(self, epochs=epochs, patience=patience)

    @property
    def max_epochs(self) -> int:
        """The epoch budget (after `planned`)."""
        assert self.epochs is not None, "plan the epochs first: TrainConfig.planned"
        return self.epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
