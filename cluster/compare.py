"""`kiln models compare NAME`: every active version side by side, and its accuracy/latency plot.

A row holds what deciding between versions takes: the test score (accuracy, or R² for a
regressor), the parameters, the bytes stored, each backend's latency profile, where the version
came from (lineage parent and compression steps) and whether it is on the Pareto front of score
against batch-1 p50 latency (its fastest backend). Parameters are counted from the weights
file's safetensors header, without torch and without reading the tensors: the network body's
tensors, where an int8 layer's weight counts as its int8 tensor and its scales and zero
points are not parameters. The SLO choice of `kiln serve` reads its candidates from the
same rows. Catalog and storage reads only: no Ray.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from actors.registry import version_dir
from serving.slo import Candidate, pareto_front
from training.errors import KilnError

WEIGHTS_FILE = "model.safetensors"
"""As training/artifacts.py names it (imported from there, this module would import torch)."""
BODY_PREFIX = "body."
NOT_PARAMETERS = ("_scale", "_zero_point")
"""Suffixes of an int8 layer's quantisation tensors (training/compress.py)."""
FIGURE_SIZE_IN = (7.0, 5.0)
FIGURE_DPI = 100
"""So the PNG is 700 x 500 pixels, like the sweep reports' (tuning/report.py)."""

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- rows


def compare_rows(
    versions: list[dict[str, Any]], profiles: list[dict[str, Any]], storage_uri: str
) -> list[dict[str, Any]]:
    """One row per active version (`versions` as `Kiln.versions` gives them; `profiles` as
    `Registry.profiles`), its files read from `storage_uri`."""
    fs, root = filesystem(storage_uri)
    by_version: dict[int, dict[str, dict[str, Any]]] = {}
    for row in profiles:
        by_version.setdefault(int(row["version"]), {})[row["backend"]] = row["profile"]
    rows = [
        version_row(v, by_version.get(int(v["version"]), {}), fs, root)
        for v in versions
        if v.get("status", "active") == "active"
    ]
    mark_pareto(rows)
    return rows


def version_row(
    version: dict[str, Any],
    profiles: dict[str, dict[str, Any]],
    fs: pafs.FileSystem,
    root: str,
) -> dict[str, Any]:
    name, number = version["name"], int(version["version"])
    folder = f"{root}/{version_dir(name, number)}"
    metric = score_metric(version["spec"])
    fastest = min(profiles, key=lambda b: profiles[b]["b1_p50_ms"], default=None)
    return {
        "ref": f"{name}@{number}",
        "version": number,
        "aliases": version.get("aliases", []),
        "metric": metric,
        "score": version["metrics"].get(metric),
        "parameters": count_parameters(fs, f"{folder}/{WEIGHTS_FILE}"),
        "artifact_bytes": artifact_bytes(fs, folder, list(version["artifacts"])),
        "profiles": {b: latency_summary(p) for b, p in sorted(profiles.items())},
        "b1_p50_ms": profiles[fastest]["b1_p50_ms"] if fastest else None,
        "fastest_backend": fastest,
        "parent": version["lineage"].get("parent"),
        "compression": compression_label(version["lineage"].get("compression")),
        "pareto": None,
    }


def score_metric(spec: dict[str, Any]) -> str:
    return "accuracy" if spec.get("task") == "classification" else "r2"


def latency_summary(profile: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "b1_p50_ms",
        "b1_p99_ms",
        "b64_p50_ms",
        "b64_p99_ms",
        "rows_per_s_b64",
        "threads",
        "cpu_model",
        "measured_at",
    )
    return {k: profile.get(k) for k in keep}


def compression_label(steps: Any) -> str | None:
    """`lineage.compression` (a list of steps, each with its method) as `distill+prune`."""
    if not steps:
        return None
    if isinstance(steps, dict):
        steps = [steps]
    if isinstance(steps, list):
        return "+".join(str(s.get("method", "?")) if isinstance(s, dict) else str(s) for s in steps)
    return str(steps)


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """`pareto` True/False for the rows with a score and a profile; None for the others."""
    measured = [r for r in rows if r["score"] is not None and r["b1_p50_ms"] is not None]
    front = pareto_front([(float(r["score"]), float(r["b1_p50_ms"])) for r in measured])
    for row, on_front in zip(measured, front, strict=True):
        row["pareto"] = on_front


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


# ----------------------------------------------------------------------------- storage reads


def filesystem(storage_uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and root path of the artifact storage (as ArtifactStore opens it)."""
    if "://" in storage_uri:
        fs, root = pafs.FileSystem.from_uri(storage_uri)
    else:
        fs, root = pafs.LocalFileSystem(), storage_uri
    return fs, root.rstrip("/")


def artifact_bytes(fs: pafs.FileSystem, folder: str, filenames: list[str]) -> int | None:
    """Sum of the stored files' sizes; None when one is missing."""
    infos = fs.get_file_info([f"{folder}/{f}" for f in filenames])
    if any(info.type != pafs.FileType.File for info in infos):
        return None
    return int(sum(info.size for info in infos))


def count_parameters(fs: pafs.FileSystem, path: str) -> int | None:
    """Parameters of the network body, from the safetensors header alone; None if unreadable."""
    try:
        header = safetensors_header(fs, path)
    except (OSError, ValueError) as exc:
        logger.warning("could not read the header of %s: %s", path, exc)
        return None
    return parameters_in(header)


def safetensors_header(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """The JSON header of a safetensors file: an 8-byte little-endian length, then the JSON."""
    with fs.open_input_file(path) as source:
        (length,) = struct.unpack("<Q", source.read(8))
        if length > 100_000_000:
            raise ValueError(f"a header of {length} bytes is not a safetensors header")
        return dict(json.loads(source.read(length)))


def parameters_in(header: dict[str, Any]) -> int:
    """Elements of the body's tensors, quantisation scales and zero points left out."""
    return sum(
        math.prod(entry["shape"])
        for name, entry in header.items()
        if name.startswith(BODY_PREFIX) and not name.endswith(NOT_PARAMETERS)
    )


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
