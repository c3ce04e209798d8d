"""Exact and full-batch solvers for Kiln's convex models, from statistics that merge.

Ridge and linear regression are solved from sufficient statistics: each shard reduces its rows
to `CrossMoments` (count, means, centred co-moments: F x F numbers, whatever the row count),
moments merge exactly (Chan's update, as `FeatureStats` does), and one F x F system
`(ZᵀZ + λI) w = Zᵀt` gives the optimum of J. Every λ of a path reuses one eigendecomposition,
and a validation split's moments score any weights exactly, so a whole λ sweep needs no rows.

Logistic regression has no closed form: `fit_softmax_lbfgs` runs scipy's L-BFGS on the full
objective, calling a `loss_sums` function (a reduce over the shards, handed in) once per
iteration. Everything here is numpy, and scipy inside the two driver-side solvers: the shard
actors import this module for the per-row sums and load neither torch nor scipy (every
megabyte a shard process imports is paid for as long as the dataset stays resident).

Parameters live in the model's space: features standardised by the spec's mean and std, and
(for regression) the target standardised by the spec's target mean and std, so the weights go
straight into the model's linear layer. `raw_weights` maps them onto raw features for the shards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

LossSums = Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray, np.ndarray]]
"""(raw weights (F, K), raw biases (K,)) -> (Σ loss, Xᵀ·dloss (F, K), Σ dloss (K,))."""


# ----------------------------------------------------------------------------- statistics


@dataclass
class CrossMoments:
    """Count, means and centred co-moments of features x (F) and a target y.

    cxx = Σ(x-x̄)(x-x̄)ᵀ, cxy = Σ(x-x̄)(y-ȳ), cyy = Σ(y-ȳ)², all float64.
    """

    count: int
    mean_x: np.ndarray
    mean_y: float
    cxx: np.ndarray
    cxy: np.ndarray
    cyy: float

    @classmethod
    def empty(cls, num_features: int) -> CrossMoments:
        f = num_features
        return cls(0, np.zeros(f), 0.0, np.zeros((f, f)), np.zeros(f), 0.0)

    @classmethod
    def from_arrays(cls, x: np.ndarray, y: np.ndarray) -> CrossMoments:
        """Moments of rows x (N, F) and targets y (N,), in float64."""
        x64 = np.asarray(x, dtype=np.float64)
        y64 = np.asarray(y, dtype=np.float64)
        if len(x64) == 0:
            return cls.empty(x64.shape[1])
        mean_x, mean_y = x64.mean(axis=0), float(y64.mean())
        xc = x64 - mean_x  # (N, F)
        yc = y64 - mean_y  # (N,)
        return cls(len(x64), mean_x, mean_y, xc.T @ xc, xc.T @ yc, float(yc @ yc))

    def merge(self, other: CrossMoments) -> CrossMoments:
        """Chan's pairwise update: exact whatever the split of rows between the parts."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        weight = self.count * other.count / count
        dx = other.mean_x - self.mean_x
        dy = other.mean_y - self.mean_y
        return CrossMoments(
            count,
            self.mean_x + dx * (other.count / count),
            self.mean_y + dy * (other.count / count),
            self.cxx + other.cxx + np.outer(dx, dx) * weight,
            self.cxy + other.cxy + dx * dy * weight,
            self.cyy + other.cyy + dy * dy * weight,
        )


@dataclass(frozen=True)
class Scaling:
    """The model's standardisation: features (x - mean) / std, target (y - t_mean) / t_std."""

    mean: np.ndarray
    std: np.ndarray
    target_mean: float = 0.0
    target_std: float = 1.0


@dataclass(frozen=True)
class StandardSystem:
    """The ridge normal equations in the model's space: gram = ZcᵀZc, rhs = Zcᵀtc (centred)."""

    gram: np.ndarray
    rhs: np.ndarray
    tt: float
    """tcᵀtc, for residual sums."""
    count: int
    z_mean: np.ndarray
    t_mean: float
    """Means of the standardised rows (0 when the scaling came from the same rows)."""


def standard_system(moments: CrossMoments, scaling: Scaling) -> StandardSystem:
    inv = 1.0 / scaling.std
    sigma = scaling.target_std
    return StandardSystem(
        gram=moments.cxx * np.outer(inv, inv),
        rhs=moments.cxy * inv / sigma,
        tt=moments.cyy / sigma**2,
        count=moments.count,
        z_mean=(moments.mean_x - scaling.mean) * inv,
        t_mean=(moments.mean_y - scaling.target_mean) / sigma,
    )


# ----------------------------------------------------------------------------- ridge


def solve_ridge(system: StandardSystem, l2: float) -> tuple[np.ndarray, float]:
    """The minimiser (w, b) of (1/2m)·Σ(w·z + b - t)² + (λ/2m)·|w|², b unpenalised.

    Cholesky of ZᵀZ + λI; when λ = 0 and ZᵀZ is singular (a constant or duplicated feature),
    the minimum-norm least-squares solution instead.
    """
    from scipy import linalg  # driver side only: the shard processes never load scipy

    f = len(system.rhs)
    try:
        factor = linalg.cho_factor(system.gram + l2 * np.eye(f), check_finite=True)
        w = linalg.cho_solve(factor, system.rhs)
        if not np.all(np.isfinite(w)) or _ill_conditioned(system.gram, l2):
            raise linalg.LinAlgError("ill-conditioned")
    except linalg.LinAlgError:
        w = np.linalg.lstsq(system.gram + l2 * np.eye(f), system.rhs, rcond=None)[0]
    return w, intercept(system, w)


def _ill_conditioned(gram: np.ndarray, l2: float) -> bool:
    if l2 > 0:
        return False
    eigenvalues = np.linalg.eigvalsh(gram)
    return bool(eigenvalues[0] <= 1e-10 * max(eigenvalues[-1], 1e-300))


def intercept(system: StandardSystem, w: np.ndarray) -> float:
    return float(system.t_mean - system.z_mean @ w)


@dataclass(frozen=True)
class RidgePath:
    """Every λ of a sweep solved from one eigendecomposition of ZᵀZ = V·diag(d)·Vᵀ."""

    system: StandardSystem
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    projected: np.ndarray
    """Vᵀ·rhs."""

    @classmethod
    def of(cls, system: StandardSystem) -> RidgePath:
        d, v = np.linalg.eigh(system.gram)
        d = np.clip(d, 0.0, None)
        return cls(system, d, v, v.T @ system.rhs)

    def _shrink(self, l2: float) -> np.ndarray:
        d = self.eigenvalues
        if l2 > 0:
            return 1.0 / (d + l2)
        # λ = 0: the pseudo-inverse, ignoring directions with no variance.
        keep = d > 1e-10 * max(float(d[-1]), 1e-300)
        return np.where(keep, 1.0 / np.where(keep, d, 1.0), 0.0)

    def weights(self, l2: float) -> tuple[np.ndarray, float]:
        w = self.eigenvectors @ (self._shrink(l2) * self.projected)
        return w, intercept(self.system, w)

    def loo_basis(self, scaling: Scaling, l2s: list[float]) -> LooBasis:
        solved = [self.weights(v) for v in l2s]
        return LooBasis(
            scaling=scaling,
            z_mean=self.system.z_mean,
            eigenvectors=self.eigenvectors,
            shrink=np.stack([self._shrink(v) for v in l2s], axis=1),
            weights=np.stack([w for w, _ in solved]),
            intercepts=np.asarray([b for _, b in solved]),
            count=self.system.count,
        )

    def gcv(self, l2: float) -> float:
        """Generalised cross-validation score, (RSS/n) / (1 - df/n)², in standardised units.

        df counts the intercept; RSS comes from the statistics: tᵀt - 2wᵀZᵀt + wᵀZᵀZw.
        """
        n = self.system.count
        shrink = self._shrink(l2)
        df = float(np.sum(self.eigenvalues * shrink)) + 1.0
        w, _ = self.weights(l2)
        rss = self.system.tt - 2 * w @ self.system.rhs + w @ self.system.gram @ w
        rss = max(float(rss), 0.0)
        if df >= n:
            return float("inf")
        return (rss / n) / (1.0 - df / n) ** 2


@dataclass(frozen=True)
class LooBasis:
    """What a shard needs to add up the exact leave-one-out errors of a ridge path.

    With an unpenalised intercept the hat matrix is 1/n + Zc·(ZcᵀZc + λI)⁻¹·Zcᵀ, so row i's
    leverage is h_i(λ) = 1/n + Σ_j (zc_i·v_j)² / (d_j + λ), and its leave-one-out error is
    r_i(λ) / (1 - h_i(λ)), r_i the ordinary residual: scikit-learn's RidgeCV criterion, summed
    by each shard over its own rows.
    """

    scaling: Scaling
    z_mean: np.ndarray
    """Mean of the standardised rows of the whole fit (centres zc)."""
    eigenvectors: np.ndarray
    shrink: np.ndarray
    """(F, L): 1/(d_j + λ_l), 0 for directions without variance at λ = 0."""
    weights: np.ndarray
    """(L, F) ridge weights along the path."""
    intercepts: np.ndarray
    """(L,)"""
    count: int

    def squared_errors(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Σ over these rows of the leave-one-out error², one per λ (standardised target)."""
        scaling = self.scaling
        z = (np.asarray(x, dtype=np.float64) - scaling.mean) / scaling.std  # (N, F)
        t = (np.asarray(y, dtype=np.float64) - scaling.target_mean) / scaling.target_std
        projected = (z - self.z_mean) @ self.eigenvectors  # (N, F)
        leverage = 1.0 / self.count + (projected**2) @ self.shrink  # (N, L)
        residual = t[:, None] - (z @ self.weights.T + self.intercepts)  # (N, L)
        errors = residual / np.clip(1.0 - leverage, 1e-12, None)
        return np.sum(errors**2, axis=0)


def raw_weights(
    w: np.ndarray, b: np.ndarray | float, scaling: Scaling
) -> tuple[np.ndarray, np.ndarray]:
    """Weights on raw features and raw target: ŷ = x·a + c (a: (F,) or (F, K))."""
    w = np.asarray(w, dtype=np.float64)
    scale = (1.0 / scaling.std).reshape(-1, *([1] * (w.ndim - 1)))
    a = w * scale * scaling.target_std
    c = np.asarray(b, dtype=np.float64) * scaling.target_std + scaling.target_mean
    return a, c - scaling.mean @ a


def squared_error(moments: CrossMoments, a: np.ndarray, c: float) -> float:
    """Σ(x·a + c - y)² over the rows summarised by `moments`, exactly, without the rows."""
    offset = float(moments.mean_x @ a + c - moments.mean_y)
    value = a @ moments.cxx @ a - 2.0 * a @ moments.cxy + moments.cyy
    return max(float(value) + moments.count * offset**2, 0.0)


def r2_score(moments: CrossMoments, a: np.ndarray, c: float) -> float:
    if moments.cyy <= 0:
        return 0.0
    return 1.0 - squared_error(moments, a, c) / moments.cyy


# ----------------------------------------------------------------------------- L-BFGS


def softmax_sums(
    x: np.ndarray, labels: np.ndarray, a: np.ndarray, c: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Cross-entropy summed over rows x (N, F) with class indices `labels`, and its gradient
    with respect to raw weights a (F, K) and biases c (K,), in float64."""
    x64 = np.asarray(x, dtype=np.float64)
    logits = x64 @ a + c  # (N, K)
    top = logits.max(axis=1, keepdims=True)
    exp = np.exp(logits - top)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(np.sum(np.log(total[:, 0]) + top[:, 0] - logits[rows, labels]))
    residual = exp / total  # (N, K): softmax - one-hot
    residual[rows, labels] -= 1.0
    return loss, x64.T @ residual, residual.sum(axis=0)


def squared_sums(
    x: np.ndarray, y: np.ndarray, a: np.ndarray, c: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """½·Σ(x·a + c - y)² and its gradient, with a (F, 1) and c (1,) as for softmax_sums."""
    x64 = np.asarray(x, dtype=np.float64)
    residual = (x64 @ a + c) - np.asarray(y, dtype=np.float64)[:, None]  # (N, 1)
    return 0.5 * float(np.sum(residual**2)), x64.T @ residual, residual.sum(axis=0)


@dataclass
class LbfgsResult:
    weight: np.ndarray
    """(F, K) in the model's space (the linear layer's weight is its transpose)."""
    bias: np.ndarray
    converged: bool
    iterations: int
    loss: float
    grad_norm: float
    final_rel_loss_change: float
    message: str


def fit_lbfgs(
    loss_sums: LossSums,
    scaling: Scaling,
    num_outputs: int,
    count: int,
    l2: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    projection: np.ndarray | None = None,
) -> LbfgsResult:
    """Minimise J = (1/m)·Σ loss + (λ/2m)·|W|² (biases unpenalised) with L-BFGS.

    `loss_sums` sees weights on raw features (the shards standardise nothing); the chain rule
    brings its sums back to the model's space. With a `projection` P (K, F) the model's
    weights act on p = P·z (PCA), so the standardised weights are Pᵀ·W and W's gradient is P
    times theirs. Stops when the largest gradient component is below `tol` (converged) or
    after `max_iter` iterations (not converged).
    """
    from scipy import optimize  # driver side only: the shard processes never load scipy

    f = len(scaling.mean) if projection is None else len(projection)
    k, m = num_outputs, float(count)
    inv_std = 1.0 / scaling.std
    sigma = scaling.target_std
    trace: list[float] = []

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: f * k].reshape(f, k), theta[f * k :]
        a, c = raw_weights(w if projection is None else projection.T @ w, b, scaling)
        loss, grad_a, grad_c = loss_sums(a, c)
        # d/dw of loss(a(w), c(w)): a = w·σ/s, c = b·σ + t_mean - mean·a.
        grad_w = (grad_a - np.outer(scaling.mean, grad_c)) * (inv_std * sigma)[:, None]
        if projection is not None:
            grad_w = projection @ grad_w
        grad_b = grad_c * sigma
        value = loss / (m * sigma**2) + (l2 / (2 * m)) * float(np.sum(w * w))
        grad = np.concatenate(
            [(grad_w / (m * sigma**2) + (l2 / m) * w).ravel(), grad_b / (m * sigma**2)]
        )
        trace.append(value)
        return value, grad

    start = np.zeros(f * k + k) if init is None else np.concatenate([init[0].ravel(), init[1]])
    per_iteration = [objective(start)[0]]
    found = optimize.minimize(
        objective,
        start,
        jac=True,
        method="L-BFGS-B",
        # J after each iteration: the last evaluation is the point the line search accepted.
        callback=lambda _: per_iteration.append(trace[-1]),
        options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-15, "maxcor": 20},
    )
    _, grad = objective(found.x)
    grad_norm = float(np.max(np.abs(grad)))
    last, before = per_iteration[-1], per_iteration[-2] if len(per_iteration) > 1 else np.inf
    return LbfgsResult(
        weight=found.x[: f * k].reshape(f, k),
        bias=found.x[f * k :],
        converged=grad_norm <= tol * 10 or bool(found.success and found.nit < max_iter),
        iterations=int(found.nit),
        loss=float(found.fun),
        grad_norm=grad_norm,
        final_rel_loss_change=(last - before) / max(abs(before), 1e-300)
        if np.isfinite(before)
        else 0.0,
        message=str(found.message),
    )


# ----------------------------------------------------------------------------- PCA


@dataclass(frozen=True)
class Projection:
    """Principal components of the standardised features, kept as a fixed layer of the model."""

    components: np.ndarray
    """(K, F): rows are unit directions in the standardised feature space, largest first."""
    variance_ratio: np.ndarray
    """(K,): each component's share of the total variance."""

    @property
    def variance_kept(self) -> float:
        return float(self.variance_ratio.sum())


def principal_components(moments: CrossMoments, scaling: Scaling, keep: float) -> Projection:
    """PCA of the standardised rows summarised by `moments` (their centred co-moments, from a
    reduce over the shards: no rows needed). `keep` < 1 is a share of the variance, and K is
    the fewest components whose cumulative share exceeds it, as scikit-learn's
    `PCA(n_components=keep)` chooses; `keep` ≥ 1 is K itself. Each component's sign is fixed
    so that its largest entry is positive (scikit-learn's `svd_flip` convention)."""
    inv = 1.0 / scaling.std
    covariance = moments.cxx * np.outer(inv, inv)  # Σ(z - z̄)(z - z̄)ᵀ, z standardised
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.clip(eigenvalues[order], 0.0, None)
    eigenvectors = eigenvectors[:, order]
    ratio = eigenvalues / max(float(eigenvalues.sum()), 1e-300)
    if keep < 1:
        count = int(np.searchsorted(np.cumsum(ratio), keep, side="right")) + 1
    else:
        count = int(keep)
    count = min(count, len(ratio))
    components = eigenvectors[:, :count].T.copy()  # (K, F)
    biggest = np.argmax(np.abs(components), axis=1)
    components *= np.sign(components[np.arange(count), biggest])[:, None]
    return Projection(components, ratio[:count])


def project_system(system: StandardSystem, components: np.ndarray) -> StandardSystem:
    """The ridge normal equations of the projected rows p = P·z (a linear map of z)."""
    return StandardSystem(
        gram=components @ system.gram @ components.T,
        rhs=components @ system.rhs,
        tt=system.tt,
        count=system.count,
        z_mean=components @ system.z_mean,
        t_mean=system.t_mean,
    )
