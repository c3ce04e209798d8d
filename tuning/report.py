"""What a finished sweep leaves behind: a CSV of every trial, a heatmap, learning curves.

`sweep_summary` holds the same content as JSON-safe data (the heatmap's cells with the PNG's
bins, every trial's learning curve), so a console that cannot read the driver's files can
draw them from shared storage.

The heatmap shows the sweep metric over (lr, λ) on log axes, binned so random and Optuna
samples read like a grid (each cell: the best trial in it), with λ = 0 as its own column and
every trial drawn as a dot. Figures are fixed-size PNGs from matplotlib's Agg backend, so they
render on a headless node and their pixel size is known.
"""

from __future__ import annotations

import csv
import logging
import math
import numbers
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on a cluster node or in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kiln.tuning.tuner import TrialSummary  # noqa: E402

logger = logging.getLogger(__name__)

FIGURE_SIZE_IN = (7.0, 5.0)
FIGURE_DPI = 100
"""So every PNG is 700 x 500 pixels."""
CSV_METRICS = (
    "val_loss",
    "val_accuracy",
    "val_r2",
    "val_mse",
    "train_loss",
    "train_accuracy",
)
MAX_HISTORY_ENTRIES = 500
"""Epochs kept per trial in a sweep summary: enough for a curve, small enough to serve."""
RAY_BOOKKEEPING = frozenset(
    {
        "pid",
        "timestamp",
        "time_this_iter_s",
        "time_since_restore",
        "iterations_since_restore",
        "done",
    }
)
"""Keys Ray Tune adds to every report that no table or curve of a sweep shows."""


def write_csv(trials: list[TrialSummary], metric: str, path: Path) -> Path:
    """One row per trial: id, status, epochs run, hyperparameters, best and last metrics."""
    params = sorted({k for t in trials for k in t.config})
    metrics = [m for m in CSV_METRICS if any(m in t.metrics for t in trials)]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["trial_id", "status", "epochs", *params, f"best_{metric}", *metrics])
        for t in sorted(trials, key=lambda t: t.trial_id):
            writer.writerow(
                [
                    t.trial_id,
                    t.status,
                    t.epochs,
                    *[t.config.get(p, "") for p in params],
                    t.best,
                    *[t.metrics.get(m, "") for m in metrics],
                ]
            )
    return path


def _log_edges(values: list[float], bins: int) -> np.ndarray:
    logs = np.log10(values)
    low, high = float(logs.min()), float(logs.max())
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    pad = 0.05 * (high - low)  # keep the dots of the extreme trials inside the axes
    low, high = low - pad, high + pad
    return np.linspace(low, high + 1e-9, bins + 1)


def heatmap_grid(
    trials: list[TrialSummary], mode: str, bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(cells[λ bin, lr bin], lr edges, λ edges, has_zero): the best metric per cell, NaN empty.

    Column 0 of the λ axis holds λ = 0 when any trial used it.
    """
    lrs = [t.config["lr"] for t in trials]
    positive = [t.config["l2"] for t in trials if t.config["l2"] > 0]
    has_zero = any(t.config["l2"] == 0 for t in trials)
    lr_edges = _log_edges(lrs, bins)
    l2_edges = _log_edges(positive or [1.0], bins if positive else 1)
    cells = np.full((len(l2_edges) - 1 + int(has_zero), bins), np.nan)
    for t in trials:
        if not math.isfinite(t.best):
            continue
        col = min(int(np.searchsorted(lr_edges, math.log10(t.config["lr"]), "right")) - 1, bins - 1)
        if t.config["l2"] == 0:
            row = 0
        else:
            found = int(np.searchsorted(l2_edges, math.log10(t.config["l2"]), "right")) - 1
            row = min(found, len(l2_edges) - 2) + int(has_zero)
        old = cells[row, col]
        better = math.isnan(old) or (t.best < old if mode == "min" else t.best > old)
        cells[row, col] = t.best if better else old
    return cells, lr_edges, l2_edges, has_zero


def heatmap_bins(num_scored: int) -> int:
    """Bins per axis for `num_scored` trials: about √n, so most cells hold a trial."""
    return max(2, min(8, round(math.sqrt(num_scored or 1)) + 1))


def plot_heatmap(trials: list[TrialSummary], metric: str, mode: str, path: Path) -> Path:
    """The metric over (lr, λ): binned cells, trial dots, the best trial starred."""
    scored = [t for t in trials if math.isfinite(t.best)]
    bins = heatmap_bins(len(scored))
    fig, ax = plt.subplots(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    if scored:
        cells, lr_edges, l2_edges, has_zero = heatmap_grid(scored, mode, bins)
        step = l2_edges[1] - l2_edges[0]
        # λ = 0 has no logarithm: draw it as one extra row below the smallest positive λ.
        y_edges = np.concatenate([[l2_edges[0] - step], l2_edges]) if has_zero else l2_edges
        cmap = "viridis_r" if mode == "min" else "viridis"
        mesh = ax.pcolormesh(lr_edges, y_edges, np.ma.masked_invalid(cells), cmap=cmap)
        fig.colorbar(mesh, ax=ax, label=f"best {metric} in cell")
        xs = [math.log10(t.config["lr"]) for t in scored]
        ys = [_l2_position(t.config["l2"], y_edges[0], step) for t in scored]
        ax.scatter(xs, ys, c="white", edgecolors="black", s=18, label="trials")
        best = min(scored, key=lambda t: t.best if mode == "min" else -t.best)
        ax.scatter(
            [math.log10(best.config["lr"])],
            [_l2_position(best.config["l2"], y_edges[0], step)],
            marker="*",
            s=220,
            c="red",
            edgecolors="black",
            label=f"best {best.best:.4g}",
        )
        ax.legend(loc="upper right", fontsize=8)
        if has_zero:
            ax.axhline(l2_edges[0], color="white", linewidth=1)
            ax.text(lr_edges[0], y_edges[0] + step / 2, " λ=0", color="white", va="center")
    ax.set_xlabel("log10 learning rate")
    ax.set_ylabel("log10 λ")
    ax.set_title(f"{metric} over (lr, λ), {len(scored)} trials")
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path


def _l2_position(l2: float, zero_row_bottom: float, step: float) -> float:
    return math.log10(l2) if l2 > 0 else zero_row_bottom + step / 2


def plot_curves(trials: list[TrialSummary], metric: str, mode: str, path: Path) -> Path:
    """The metric per epoch for every trial; the best trial drawn thick."""
    fig, ax = plt.subplots(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    scored = [t for t in trials if math.isfinite(t.best)]
    best = min(scored, key=lambda t: t.best if mode == "min" else -t.best) if scored else None
    for t in trials:
        points = [
            (h.get("training_iteration", i + 1), h.get(metric)) for i, h in enumerate(t.history)
        ]
        points = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        thick = best is not None and t.trial_id == best.trial_id
        ax.plot(
            xs,
            ys,
            linewidth=2.5 if thick else 0.9,
            alpha=1.0 if thick else 0.6,
            color="red" if thick else None,
            label=f"best: {_short_config(t.config)}" if thick else None,
        )
    if mode == "min" and scored and min(t.best for t in scored) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"learning curves, {len(trials)} trials (stopped trials end early)")
    if best is not None:
        ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path


def _short_config(config: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items()
    )


def write_reports(
    trials: list[TrialSummary], metric: str, mode: str, folder: Path
) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "csv": str(write_csv(trials, metric, folder / "trials.csv")),
        "heatmap": str(plot_heatmap(trials, metric, mode, folder / "heatmap.png")),
        "curves": str(plot_curves(trials, metric, mode, folder / "curves.png")),
    }


def write_path_reports(trials: list[TrialSummary], metric: str, folder: Path) -> dict[str, str]:
    """A λ path's reports: the CSV of every λ, the metric over λ as a curve and as a strip.

    λ is on the x-axis (log scale); λ = 0, which has no logarithm, sits one step left of the
    smallest positive λ. The best λ is starred.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows = sorted(trials, key=lambda t: t.config["l2"])
    scored = [t for t in rows if math.isfinite(t.best)]
    csv_path = folder / "trials.csv"
    keys = sorted({k for t in rows for k in t.metrics})
    with csv_path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["trial_id", "l2", f"best_{metric}", *keys])
        for t in rows:
            writer.writerow(
                [t.trial_id, t.config["l2"], t.best, *[t.metrics.get(k, "") for k in keys]]
            )
    xs = _path_positions([t.config["l2"] for t in scored])
    ys = [t.best for t in scored]
    best = min(range(len(scored)), key=lambda i: ys[i]) if scored else None
    curves = folder / "curves.png"
    fig, ax = plt.subplots(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    ax.plot(xs, ys, marker="o", markersize=3)
    if best is not None:
        label = f"best λ={scored[best].config['l2']:.4g}: {ys[best]:.4g}"
        ax.scatter([xs[best]], [ys[best]], marker="*", s=220, c="red", zorder=3, label=label)
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("log10 λ (λ = 0 at the far left)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} over the λ path, {len(scored)} values")
    fig.savefig(curves, dpi=FIGURE_DPI)
    plt.close(fig)
    heatmap = folder / "heatmap.png"
    fig, ax = plt.subplots(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    if scored:
        edges = _strip_edges(xs)
        mesh = ax.pcolormesh(edges, [0.0, 1.0], np.asarray([ys]), cmap="viridis_r")
        fig.colorbar(mesh, ax=ax, label=metric)
        if best is not None:
            ax.scatter([xs[best]], [0.5], marker="*", s=220, c="red", edgecolors="black")
    ax.set_yticks([])
    ax.set_xlabel("log10 λ (λ = 0 at the far left)")
    ax.set_title(f"{metric} over λ (no learning rate: the solver has none)")
    fig.savefig(heatmap, dpi=FIGURE_DPI)
    plt.close(fig)
    return {"csv": str(csv_path), "heatmap": str(heatmap), "curves": str(curves)}


def _path_positions(l2s: list[float]) -> list[float]:
    """log10 λ, with λ = 0 placed one step left of the smallest positive λ."""
    logs = [math.log10(v) for v in l2s if v > 0]
    low = min(logs) if logs else 0.0
    step = (max(logs) - low) / max(len(logs) - 1, 1) if len(logs) > 1 else 1.0
    return [math.log10(v) if v > 0 else low - step for v in l2s]


def _strip_edges(xs: list[float]) -> np.ndarray:
    centres = np.asarray(xs, dtype=float)
    if len(centres) == 1:
        return np.asarray([centres[0] - 0.5, centres[0] + 0.5])
    middles = (centres[1:] + centres[:-1]) / 2
    return np.concatenate(
        [
            [centres[0] - (middles[0] - centres[0])],
            middles,
            [centres[-1] + centres[-1] - middles[-1]],
        ]
    )


def sweep_summary(
    trials: list[TrialSummary], metric: str, mode: str, *, path: bool
) -> dict[str, Any]:
    """The sweep as JSON-safe data: its trials (with learning curves) and either the binned
    (lr, λ) heatmap of a minibatch sweep or the metric along a λ path. NaN and ±inf become
    None, since JSON has no NaN; the heatmap is None when no trial reported the metric."""
    return {
        "metric": metric,
        "mode": mode,
        "trials": [_trial_entry(t) for t in sorted(trials, key=lambda t: t.trial_id)],
        "heatmap": None if path else heatmap_cells(trials, mode),
        "path": path_points(trials) if path else None,
    }


def heatmap_cells(trials: list[TrialSummary], mode: str) -> dict[str, Any] | None:
    """heatmap_grid's cells with the PNG's bins, each axis labelled by its bins' lr/λ ranges."""
    scored = [t for t in trials if math.isfinite(t.best)]
    if not scored:
        return None
    cells, lr_edges, l2_edges, has_zero = heatmap_grid(scored, mode, heatmap_bins(len(scored)))
    return {
        "x": "lr",
        "y": "l2",
        "x_labels": _bin_labels(lr_edges),
        "y_labels": (["0"] if has_zero else []) + _bin_labels(l2_edges),
        "cells": [[_finite(v) for v in row] for row in cells.tolist()],
    }


def path_points(trials: list[TrialSummary]) -> list[dict[str, float | None]]:
    """The metric at every λ of a path, by increasing λ."""
    rows = sorted(trials, key=lambda t: t.config["l2"])
    return [{"l2": _finite(t.config["l2"]), "value": _finite(t.best)} for t in rows]


def json_safe(value: Any) -> Any:
    """`value` with NaN/±inf as None, numpy scalars as Python numbers, tuples as lists and
    anything else JSON cannot hold as its str."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _finite(float(value))
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return str(value)


def _trial_entry(t: TrialSummary) -> dict[str, Any]:
    history = t.history
    if len(history) > MAX_HISTORY_ENTRIES:
        # Evenly spaced epochs, the first and the last kept, so the curve keeps its shape.
        picks = np.linspace(0, len(history) - 1, MAX_HISTORY_ENTRIES).round().astype(int)
        history = [history[i] for i in picks]
    return {
        "trial_id": t.trial_id,
        "status": t.status,
        "epochs": int(t.epochs),
        "config": json_safe(t.config),
        "best": _finite(t.best),
        "metrics": _metric_values(t.metrics, keep_flags=True),
        "history": [_metric_values(h, keep_flags=False) for h in history],
    }


def _metric_values(metrics: dict[str, Any], *, keep_flags: bool) -> dict[str, Any]:
    """The numeric metrics (and, with keep_flags, the true/false ones such as `converged`),
    without Ray's bookkeeping or its flattened copy of the config."""
    kept: dict[str, Any] = {}
    for key, value in metrics.items():
        if key in RAY_BOOKKEEPING or key.startswith("config/"):
            continue
        if isinstance(value, (bool, np.bool_)):
            if keep_flags:
                kept[key] = bool(value)
        elif isinstance(value, numbers.Real):
            kept[key] = json_safe(value)
    return kept


def _bin_labels(log_edges: np.ndarray) -> list[str]:
    values = [10.0**e for e in log_edges.tolist()]
    return [f"{low:.2g}–{high:.2g}" for low, high in zip(values[:-1], values[1:], strict=True)]


def _finite(value: float) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None
