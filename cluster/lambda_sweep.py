"""`kiln tune` for the convex models: the λ path instead of Tune trials.

Linear and ridge regression: one reduce of sufficient statistics over the ShardStore actors
(train + validation rows), one eigendecomposition, then every λ of the path is an F x F solve.
λ is chosen by exact leave-one-out cross-validation on those same rows, scikit-learn's `RidgeCV`
criterion: each shard adds up its rows' leave-one-out errors for every λ from the path's
eigenbasis (one more pass over the resident rows, an L-vector back per shard), and the model at
the chosen λ is fitted on all the rows. Generalised cross-validation (GCV, from the statistics
alone) is reported beside it; on diabetes it chose a λ 0.005 R² worse than RidgeCV's on one
split of ten, where leave-one-out stays within 0.001 (docs/commands.md).

Logistic regression: L-BFGS fits along the path from the largest λ down, each warm-started
from the previous one, on the training rows; each is scored by its log-loss on the validation
rows (a reduce over the validation shards), and the best λ is fitted again on train +
validation rows. The learning rate is not searched: no solver here has one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from kiln.actors.shards import Dataset, reduce_loo_errors, reduce_loss_sums
from kiln.convex import (
    fit_exact,
    fit_full_batch,
    handles_of,
    path_moments,
    ridge_path_of,
    scaling_of,
)
from kiln.pipeline import make_spec, spec_with_stats
from kiln.training.config import TrainConfig
from kiln.training.linear import raw_weights
from kiln.training.tabular import Encoding
from kiln.tuning.space import LogRange
from kiln.tuning.tuner import TrialSummary

logger = logging.getLogger(__name__)

RIDGE_PATH_POINTS = 81
LOGISTIC_PATH_POINTS = 17
NOT_SEARCHED = "the learning rate is not searched: the {solver} solver has none"


def path_values(l2: LogRange, points: int) -> list[float]:
    """λ values of the path, largest first (the order warm starts want), 0 last if included."""
    values = sorted({v for v in l2.grid(points) if v > 0}, reverse=True)
    return values + ([0.0] if l2.include_zero else [])


def ridge_path_trials(
    cfg: TrainConfig, data: Dataset, l2: LogRange
) -> tuple[list[TrialSummary], dict[str, Any], Any]:
    """Every λ scored by GCV on train + validation rows; returns (rows, spec, best model fit)."""
    sets = [s for s in (data.train, data.val) if s is not None]
    stats = data.train.stats.merge(data.val.stats) if data.val is not None else data.train.stats
    spec = make_spec(cfg, data.train, stats)
    path = ridge_path_of(path_moments(sets, spec), spec)
    values = path_values(l2, RIDGE_PATH_POINTS)
    basis = path.loo_basis(scaling_of(spec), values)
    loo = reduce_loo_errors(handles_of(sets), basis, Encoding.from_spec(spec))
    rows = path.system.count
    trials = []
    for i, value in enumerate(values):
        score = float(loo[i]) / rows
        trials.append(path_trial(i, value, {"loo_mse": score, "gcv": path.gcv(value)}, score))
    best = min(trials, key=lambda t: t.best)
    fit = fit_exact(with_l2(cfg, best.config["l2"]), spec, sets)
    return trials, spec, fit


def logistic_path_trials(
    cfg: TrainConfig, data: Dataset, l2: LogRange
) -> tuple[list[TrialSummary], dict[str, Any], Any]:
    """Warm-started L-BFGS fits on train rows, scored on validation rows, best refitted."""
    assert data.val is not None  # checked by the caller: the path ranks λ on validation rows
    spec = make_spec(cfg, data.train)
    val_handles = handles_of([data.val])
    scaling = scaling_of(spec)
    trials: list[TrialSummary] = []
    init = None
    for i, value in enumerate(path_values(l2, LOGISTIC_PATH_POINTS)):
        fit, found = fit_full_batch(cfg, spec, [data.train], l2=value, init=init)
        init = (found.weight, found.bias)
        a, c = raw_weights(found.weight, found.bias, scaling)
        loss, _, _ = reduce_loss_sums(
            val_handles, "softmax", a, c, spec["classes"], Encoding.from_spec(spec)
        )
        val_loss = loss / data.val.num_rows
        trials.append(
            path_trial(
                i,
                value,
                {"val_loss": val_loss, "converged": fit.converged, "iterations": fit.iterations},
                val_loss,
            )
        )
    best = min(trials, key=lambda t: t.best)
    full_spec = spec_with_stats(spec, data.train.stats.merge(data.val.stats))
    final, _ = fit_full_batch(with_l2(cfg, best.config["l2"]), full_spec, [data.train, data.val])
    return trials, full_spec, final


def path_trial(index: int, l2: float, metrics: dict[str, Any], score: float) -> TrialSummary:
    return TrialSummary(
        trial_id=f"l2_{index:03d}",
        config={"l2": l2},
        metrics=metrics,
        best=score if math.isfinite(score) else float("nan"),
        epochs=0,
        history=[],
        status="TERMINATED",
    )


def with_l2(cfg: TrainConfig, l2: float) -> TrainConfig:
    return TrainConfig(**{**cfg.to_dict(), "l2": l2})
