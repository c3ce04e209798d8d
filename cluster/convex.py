"""Exact and L-BFGS fits of the convex models over resident shards.

Linear and ridge regression are solved exactly from one reduce of sufficient statistics over
the ShardStore actors (`ShardStore.linear_moments`, F x F numbers per shard); logistic
regression (and linear/ridge with `--solver lbfgs`) runs full-batch L-BFGS on the driver, each
iteration one reduce of the loss and its gradient over the actors (`ShardStore.loss_sums`).
No rows reach the driver, and no Ray Train start-up is paid: a fit of diabetes takes a
fraction of a second once the shards are resident.

Why a reduce over the actors rather than DDP workers: each L-BFGS iteration needs one global
loss and gradient, which the actors compute where the rows already are, in parallel; DDP
workers would first cost a TorchTrainer start (12-15 s measured, RAY_NOTES.md) and a copy of
the rows into each worker, to then all-reduce the same sums.

A convex fit has no early stopping, so it fits on the validation rows too (train + val), with
standardisation statistics of those rows: the same rows and scaling scikit-learn would see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.actors.shards import (
    ShardSet,
    reduce_feature_moments,
    reduce_linear_moments,
    reduce_loss_sums,
)
from kiln.training.config import TrainConfig
from kiln.training.linear import (
    CrossMoments,
    LbfgsResult,
    RidgePath,
    Scaling,
    fit_lbfgs,
    principal_components,
    project_system,
    solve_ridge,
    standard_system,
)
from kiln.training.models import KilnModel, linear_model, num_outputs
from kiln.training.tabular import Encoding

logger = logging.getLogger(__name__)


@dataclass
class ConvexFit:
    """A fitted convex model and what its run reports."""

    model: KilnModel
    solver: str
    converged: bool
    final_rel_loss_change: float
    iterations: int
    details: dict[str, Any] = field(default_factory=dict)


def scaling_of(spec: dict[str, Any]) -> Scaling:
    """The model's standardisation, as the spec records it."""
    return Scaling(
        mean=np.asarray(spec["mean"], dtype=np.float64),
        std=np.asarray(spec["std"], dtype=np.float64),
        target_mean=float(spec.get("target_mean", 0.0)),
        target_std=float(spec.get("target_std", 1.0)),
    )


def projection_of(spec: dict[str, Any]) -> np.ndarray | None:
    """The PCA components (K, F) a spec keeps, or None."""
    pca = spec.get("pca")
    return None if pca is None else np.asarray(pca["components"], dtype=np.float64)


def with_pca(spec: dict[str, Any], keep: float, shard_sets: list[ShardSet]) -> dict[str, Any]:
    """The spec with the principal components of its standardised features over every row of
    `shard_sets` (one reduce of F x F co-moments over the actors; no rows leave them)."""
    moments = reduce_feature_moments(handles_of(shard_sets), Encoding.from_spec(spec))
    found = principal_components(moments, scaling_of(spec), keep)
    return {
        **spec,
        "pca": {
            "requested": keep,
            "components": found.components.tolist(),
            "variance_ratio": found.variance_ratio.tolist(),
            "variance_kept": found.variance_kept,
        },
    }


def handles_of(shard_sets: list[ShardSet]) -> list[Any]:
    return [h for s in shard_sets for h in s.handles]


def fit_exact(cfg: TrainConfig, spec: dict[str, Any], shard_sets: list[ShardSet]) -> ConvexFit:
    """Ridge (λ ≥ 0) from the statistics of every row of `shard_sets`."""
    moments = reduce_linear_moments(handles_of(shard_sets), Encoding.from_spec(spec))
    system = standard_system(moments, scaling_of(spec))
    components = projection_of(spec)
    if components is not None:  # ridge on the principal components p = P·z
        system = project_system(system, components)
    w, b = solve_ridge(system, cfg.penalty)
    return ConvexFit(
        model=linear_model(spec, w[None, :], [b]),
        solver="exact",
        converged=True,
        final_rel_loss_change=0.0,
        iterations=1,
        details={"rows": moments.count},
    )


def fit_full_batch(
    cfg: TrainConfig,
    spec: dict[str, Any],
    shard_sets: list[ShardSet],
    l2: float | None = None,
    init: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[ConvexFit, LbfgsResult]:
    """L-BFGS on J over every row of `shard_sets`, one reduce over the actors per iteration."""
    handles = handles_of(shard_sets)
    classify = spec["task"] == "classification"
    classes = spec.get("classes") if classify else None
    loss = "softmax" if classify else "squared"
    encoding = Encoding.from_spec(spec)

    def loss_sums(a: np.ndarray, c: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        return reduce_loss_sums(handles, loss, a, c, classes, encoding)

    rows = sum(s.num_rows for s in shard_sets)
    found = fit_lbfgs(
        loss_sums,
        scaling_of(spec),
        num_outputs(spec),
        rows,
        cfg.penalty if l2 is None else l2,
        max_iter=cfg.max_iter,
        tol=cfg.tol,
        init=init,
        projection=projection_of(spec),
    )
    if not found.converged:
        logger.warning("L-BFGS stopped before converging: %s", found.message)
    fit = ConvexFit(
        model=linear_model(spec, found.weight.T, found.bias),
        solver="lbfgs",
        converged=found.converged,
        final_rel_loss_change=found.final_rel_loss_change,
        iterations=found.iterations,
        details={"rows": rows, "grad_max": found.grad_norm, "objective": found.loss},
    )
    return fit, found


def fit_convex(cfg: TrainConfig, spec: dict[str, Any], shard_sets: list[ShardSet]) -> ConvexFit:
    if cfg.resolved_solver == "exact":
        return fit_exact(cfg, spec, shard_sets)
    return fit_full_batch(cfg, spec, shard_sets)[0]


def lbfgs_warning(fit: ConvexFit, cfg: TrainConfig) -> str | None:
    """The one line an unconverged L-BFGS run prints."""
    if fit.converged or fit.solver != "lbfgs":
        return None
    return (
        f"L-BFGS stopped after --max-iter {cfg.max_iter} iterations before J's gradient fell "
        f"below --tol {cfg.tol:g}: raise --max-iter, or --l2 if the classes are separable"
    )


def path_moments(shard_sets: list[ShardSet], spec: dict[str, Any]) -> CrossMoments:
    return reduce_linear_moments(handles_of(shard_sets), Encoding.from_spec(spec))


def ridge_path_of(moments: CrossMoments, spec: dict[str, Any]) -> RidgePath:
    return RidgePath.of(standard_system(moments, scaling_of(spec)))
