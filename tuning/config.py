"""`SweepConfig`: how a sweep searches, validated once, up front (no Ray Tune import)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.training.config import require_choice
from kiln.training.errors import KilnError
from kiln.tuning.space import SearchSpace, grid_size

SCHEDULERS = ("asha", "hyperband", "pbt", "none")
SEARCHES = ("random", "grid", "optuna")


@dataclass(kw_only=True)
class SweepConfig:
    """How to search; every field maps to a `kiln tune` option."""

    space: SearchSpace
    scheduler: str = "asha"
    search: str = "random"
    num_trials: int = 16
    """Trials to sample (random, optuna); a grid runs every point once instead."""
    max_epochs: int = 20
    """Epochs of a trial that no scheduler stops."""
    workers_per_trial: int = 1
    metric: str = "val_loss"
    grid_points: int = 4
    """Values per continuous axis of a grid (lr, λ), log-spaced."""
    seed: int = 0

    def __post_init__(self) -> None:
        require_choice(self.scheduler, SCHEDULERS, "--scheduler")
        require_choice(self.search, SEARCHES, "--search")
        for option, value in (
            ("--trials", self.num_trials),
            ("--epochs", self.max_epochs),
            ("--workers-per-trial", self.workers_per_trial),
            ("--grid-points", self.grid_points),
        ):
            if value < 1:
                raise KilnError(f'Got "{value}" for {option}. {option} must be at least 1.')
        if self.scheduler == "pbt" and self.search == "optuna":
            raise KilnError(
                'Got "--scheduler pbt" with "--search optuna". PBT picks its own configurations: '
                "use --search random with pbt, or another scheduler with optuna."
            )
        if not self.metric.startswith("val_"):
            raise KilnError(
                f'Got "{self.metric}" for --metric. Use a validation metric, e.g. val_loss, '
                "val_accuracy or val_r2."
            )

    @property
    def mode(self) -> str:
        return "min" if self.metric.endswith("loss") or self.metric.endswith("mse") else "max"

    @property
    def planned_trials(self) -> int:
        if self.search == "grid":
            return grid_size(self.space, self.grid_points)
        return self.num_trials
