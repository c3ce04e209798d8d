"""`kiln models compare NAME`: every active version side by side, and its accuracy/latency plot.

The rows are serving/variants.py's (the console's variants page shows the same); this module
adds the PNG and the SLO choice's candidates.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kiln.serving.slo import Candidate
from kiln.serving.variants import compare_rows
from kiln.training.errors import KilnError

__all__ = ["compare_rows", "slo_candidates", "write_plot"]

FIGURE_SIZE_IN = (7.0, 5.0)
FIGURE_DPI = 100
"""So the PNG is 700 x 500 pixels, like the sweep reports' (tuning/report.py)."""

logger = logging.getLogger(__name__)


def slo_candidates(rows: list[dict[str, Any]], full: list[dict[str, Any]]) -> list[Candidate]:
    """The SLO choice's candidates: one per profiled version and backend. `full` holds the
    whole profiles (`Registry.profiles`), the rows only their summaries."""
    whole = {(int(p["version"]), p["backend"]): p["profile"] for p in full}
    return [
        Candidate(
            row["ref"], backend, row["score"], row["metric"], whole[(row["version"], backend)]
        )
        for row in rows
        for backend in row["profiles"]
    ]


# ----------------------------------------------------------------------------- the plot


def write_plot(rows: list[dict[str, Any]], path: str | Path, name: str) -> Path:
    """Score against batch-1 p50 latency (log scale when it spans more than 4x), each version
    labelled `@N`, the Pareto front as a step line. Rows without a score or a profile are left
    out."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a cluster node or in CI
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    shown = [r for r in rows if r["pareto"] is not None]
    if not shown:
        raise KilnError(
            f"no plot for {name}: no active version has both a test score and a latency "
            "profile; measure one with kiln models profile NAME@N"
        )
    metric = shown[0]["metric"]
    figure, axes = plt.subplots(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    try:
        for row in shown:
            color = "tab:red" if row["pareto"] else "tab:gray"
            axes.scatter(row["b1_p50_ms"], row["score"], color=color, zorder=3)
            axes.annotate(
                f"@{row['version']}",
                (row["b1_p50_ms"], row["score"]),
                textcoords="offset points",
                xytext=(5, 5),
            )
        front = sorted((r for r in shown if r["pareto"]), key=lambda r: r["b1_p50_ms"])
        axes.step(
            [r["b1_p50_ms"] for r in front],
            [r["score"] for r in front],
            where="post",
            color="tab:red",
            label="Pareto front",
        )
        latencies = [r["b1_p50_ms"] for r in shown]
        if max(latencies) > 4 * min(latencies):  # log scale only when it spreads points out
            axes.set_xscale("log")
            axes.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axes.xaxis.set_minor_formatter(ticker.NullFormatter())
        axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axes.margins(x=0.1, y=0.1)  # room for the labels of the corner points
        axes.set_xlabel("batch-1 latency, p50 (ms, fastest backend)")
        axes.set_ylabel("test R²" if metric == "r2" else "test accuracy")
        axes.set_title(f"{name}: {'R²' if metric == 'r2' else 'accuracy'} against latency")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(loc="best")
        figure.savefig(str(path))
    finally:
        plt.close(figure)
    return Path(path)
