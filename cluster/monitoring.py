"""`kiln monitor`: a served model's window report as a table, JSON or a PNG over time.

The report itself is actors/monitor.py (the metrics endpoint answers the same); this module
reads it from the storage the prediction log is written to, with the versions' records from
the registry, and draws it: requests/s, p99 latency and live quality from feedback, one line
per version, and each version's most drifted inputs. A language model's PNG shows
requests/s, time to first token p99, output tokens/s and the mean score from feedback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kiln.actors.monitor import build_report, parse_window, time_series
from kiln.training.errors import KilnError

logger = logging.getLogger(__name__)

FIGURE_SIZE_IN = (11, 7.5)
FIGURE_DPI = 110


def window_s(window: str) -> float:
    try:
        return parse_window(window)
    except ValueError as exc:
        raise KilnError(f"Got {exc} for --window. Use a duration like 30m, 1h or 7d.") from None


def records_of(kiln: Any, name: str) -> dict[int, Any]:
    records = kiln._call("list_versions", name)  # a missing model is one line from the registry
    return {r.version: r for r in records}


def model_report(kiln: Any, name: str, window: str) -> dict[str, Any]:
    seconds = window_s(window)
    records = records_of(kiln, name)
    return build_report(kiln._call("get_storage_uri"), name, records, seconds)


def write_plot(kiln: Any, name: str, window: str, report: dict[str, Any], path: str) -> Path:
    """The PNG: three panels over time and one of drift, one colour per version."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    seconds = window_s(window)
    series = time_series(
        kiln._call("get_storage_uri"), name, records_of(kiln, name), seconds, now=report["until"]
    )
    if not series:
        raise KilnError(f"no plot for {name}: nothing was logged in the last {window}")
    figure, axes = plt.subplots(2, 2, figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    language = report.get("kind") == "lm"
    panels = [
        (axes[0, 0], "requests_per_s", "requests/s"),
        (axes[0, 1], "p99_ms", "p99 latency (ms)"),
        (axes[1, 0], "quality", "live accuracy (R² for a regressor), from feedback"),
    ]
    if language:
        panels = [
            (axes[0, 0], "requests_per_s", "requests/s"),
            (axes[0, 1], "ttft_p99_ms", "time to first token p99 (ms)"),
            (axes[1, 0], "output_tokens_per_s", "output tokens/s"),
            (axes[1, 1], "quality", "mean score from feedback"),
        ]
    for version, data in series.items():
        minutes = [(t - report["until"]) / 60 for t in data["t"]]
        for axis, key, _title in panels:
            points = [(m, v) for m, v in zip(minutes, data[key], strict=True) if v is not None]
            if points:
                axis.plot(*zip(*points, strict=True), marker=".", label=f"v{version}")
    for axis, _key, title in panels:
        axis.set_xlim(-seconds / 60, 0)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("minutes before now")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    if not language:
        drift_panel(axes[1, 1], report)
    figure.suptitle(f"{name}: last {window}")
    figure.tight_layout()
    out = Path(path)
    figure.savefig(out)
    plt.close(figure)
    return out


def drift_panel(axis: Any, report: dict[str, Any], most: int = 8) -> None:
    """Each version's most drifted inputs by PSI, with the 0.2 threshold."""
    bars: list[tuple[str, float]] = []
    for entry in report["versions"]:
        features = (entry.get("drift") or {}).get("features") or []
        top = sorted(features, key=lambda f: -f["psi"])[: max(1, most // len(report["versions"]))]
        bars += [(f"v{entry['version']} {f['feature']}", f["psi"]) for f in top]
    if bars:
        labels, values = zip(*bars, strict=True)
        axis.barh(range(len(values)), values, color="tab:orange")
        axis.set_yticks(range(len(values)), labels, fontsize=8)
        axis.axvline(0.2, color="red", linestyle="--", linewidth=1, label="drift (PSI 0.2)")
        axis.legend(fontsize=8)
        axis.invert_yaxis()
    axis.set_title("input drift (PSI), most drifted inputs", fontsize=10)
