"""What each console page shows, built from catalog records, profiles, monitoring reports and
sweep summaries: plain data in, plain data out (dicts the templates render and the JSON the
charts draw). No Ray, no HTTP: tested on hand-made records.
"""

from __future__ import annotations

import math
import re
from typing import Any

from kiln.actors.catalog import VersionRecord
from kiln.actors.registry import ROBUSTNESS_BACKEND
from kiln.serving.variants import robustness_summary

HEADLINE_METRICS = ("accuracy", "r2", "macro_f1", "mse")
"""The first of these a version's metrics hold is its headline on the models page."""
SHOWN_LINEAGE = (
    "parent",
    "dataset_uri",
    "dataset_name",
    "dataset_sha256",
    "solver",
    "converged",
    "best_epoch",
    "train_rows",
    "test_rows",
    "split_seed",
    "sweep_id",
    "trial_id",
    "run_name",
    "code_version",
    "compression",
    "federated",
    "retrain",
)
"""Lineage keys listed first on a version page; the rest follow under "more"."""
REF_PATTERN = re.compile(r"^([a-z0-9][a-z0-9-]*)@(\d+)$")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")


def finite(value: Any) -> float | None:
    """A number the charts can draw, or None (JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def headline(metrics: dict[str, Any]) -> tuple[str, float] | None:
    for name in HEADLINE_METRICS:
        value = finite(metrics.get(name))
        if value is not None:
            return name, value
    return None


def scalar_metrics(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """The metrics a table shows: numbers and short texts, not histories or matrices."""
    return [
        (k, v)
        for k, v in sorted(metrics.items())
        if isinstance(v, int | float | str | bool) or v is None
    ]


def aliases_of(aliases: dict[str, int], version: int) -> list[str]:
    return sorted(a for a, v in aliases.items() if v == version)


# ----------------------------------------------------------------------------- models


def model_rows(models: list[dict[str, Any]], latest: dict[str, VersionRecord]) -> list[dict]:
    """One row per model (`Registry.list_models`), with its latest active version's headline."""
    rows = []
    for model in models:
        record = latest.get(model["name"])
        found = headline(record.metrics) if record else None
        rows.append(
            {
                "name": model["name"],
                "num_versions": model["num_versions"],
                "num_archived": model["num_archived"],
                "latest_version": model["latest_version"],
                "aliases": model["aliases"],
                "metric": found[0] if found else None,
                "value": found[1] if found else None,
                "kind": record.spec.get("kind") if record else None,
                "task": record.spec.get("task") if record else None,
            }
        )
    return rows


def version_rows(records: list[VersionRecord], aliases: dict[str, int]) -> list[dict]:
    """A model's versions, newest first, with status, aliases, headline and origin."""
    rows = []
    for record in sorted(records, key=lambda r: -r.version):
        found = headline(record.metrics)
        rows.append(
            {
                "version": record.version,
                "status": record.status,
                "aliases": aliases_of(aliases, record.version),
                "created_at": record.created_at,
                "creator": record.creator,
                "kind": record.spec.get("kind"),
                "metric": found[0] if found else None,
                "value": found[1] if found else None,
                "parent": record.lineage.get("parent"),
                "origin": origin_of(record.lineage),
            }
        )
    return rows


def origin_of(lineage: dict[str, Any]) -> str:
    """How a version came to be, in a word or two."""
    if lineage.get("compression"):
        return "compressed"
    if lineage.get("federated"):
        return "federated"
    if lineage.get("retrain"):
        return "retrained"
    if lineage.get("sweep_id"):
        return "sweep"
    if lineage.get("export"):
        return "export"
    return "trained"


# ----------------------------------------------------------------------------- a version


def ref_link(value: Any) -> dict[str, Any] | None:
    """`name@N` as a link to that version's page; None for anything else."""
    if not isinstance(value, str):
        return None
    match = REF_PATTERN.match(value)
    if match is None:
        return None
    return {"ref": value, "name": match.group(1), "version": int(match.group(2))}


def lineage_items(lineage: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(first, more): each item {key, value, link?}; long values stay under "more"."""
    first, more = [], []
    for key in SHOWN_LINEAGE:
        if key in lineage and lineage[key] is not None:
            first.append(lineage_item(key, lineage[key]))
    for key in sorted(lineage):
        if key not in SHOWN_LINEAGE and lineage[key] not in (None, [], {}):
            more.append(lineage_item(key, lineage[key]))
    return first, more


def lineage_item(key: str, value: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"key": key, "value": value, "link": ref_link(value)}
    if key == "sweep_id" and isinstance(value, str):
        item["sweep"] = value
    return item


def children_of(record: VersionRecord, everything: list[VersionRecord]) -> list[dict]:
    """The versions (of any model) whose lineage parent is this version: its variants."""
    return [
        {"ref": r.ref, "name": r.name, "version": r.version, "origin": origin_of(r.lineage)}
        for r in everything
        if r.lineage.get("parent") == record.ref
    ]


def robustness_of(profiles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The version's `kiln evaluate --attack` reports (kept as the robustness profile row)."""
    found: dict[str, Any] = next(
        (p["profile"] for p in profiles if p["backend"] == ROBUSTNESS_BACKEND), {}
    )
    return robustness_summary(found.get("reports", {}))


def profile_rows(profiles: list[dict[str, Any]]) -> list[dict]:
    """The version's latency profiles, one per backend (`Registry.profiles`)."""
    keep = ("b1_p50_ms", "b1_p99_ms", "b64_p50_ms", "b64_p99_ms", "rows_per_s_b64", "threads")
    return [
        {"backend": p["backend"], **{k: p["profile"].get(k) for k in keep}}
        for p in sorted(profiles, key=lambda p: p["backend"])
    ]


NOT_CURVES = ("epoch", "step", "tokens_seen", "lr", "tokens_per_s", "num_workers", "grad_sync")
"""History keys that are positions or settings, not curves (a language model's history is by
`step`, with its tokens seen and learning rate beside the losses)."""


def curves_chart(history: Any) -> dict[str, Any] | None:
    """Training curves: losses on the left axis, accuracy/R² (a language model: perplexity)
    on the right; by epoch, or by step for a history without epochs (a language model's)."""
    if not isinstance(history, list) or not history:
        return None
    entries = [h if isinstance(h, dict) else {} for h in history]
    keys = sorted({k for h in entries for k in h if k not in NOT_CURVES})
    datasets = []
    for i, key in enumerate(keys):
        values = [finite(h.get(key)) for h in entries]
        if all(v is None for v in values):
            continue
        datasets.append(
            {
                "label": key,
                "data": values,
                "yAxisID": "loss" if "loss" in key or "mse" in key else "score",
                "borderColor": COLORS[i % len(COLORS)],
            }
        )
    if not datasets:
        return None
    by_step = not any("epoch" in h for h in entries) and any("step" in h for h in entries)
    position = "step" if by_step else "epoch"
    labels = [h.get(position, i) for i, h in enumerate(entries)]
    scores = {d["label"] for d in datasets if d["yAxisID"] == "score"}
    score_title = "perplexity" if scores and all("perplexity" in k for k in scores) else None
    return {
        "kind": "curves",
        "labels": labels,
        "datasets": datasets,
        "x_title": position,
        "score_title": score_title or "accuracy / R²",
    }


def version_view(
    record: VersionRecord,
    aliases: dict[str, int],
    everything: list[VersionRecord],
    profiles: list[dict[str, Any]],
) -> dict[str, Any]:
    first, more = lineage_items(record.lineage)
    return {
        "record": record,
        "aliases": aliases_of(aliases, record.version),
        "metrics": scalar_metrics(record.metrics),
        "confusion": record.metrics.get("confusion"),
        "lineage": first,
        "lineage_more": more,
        "children": children_of(record, everything),
        "artifacts": sorted(record.artifacts.items()),
        "profiles": profile_rows([p for p in profiles if p["backend"] != ROBUSTNESS_BACKEND]),
        "robustness": robustness_of(profiles),
        "curves": curves_chart(record.metrics.get("history")),
        "spec": {k: v for k, v in record.spec.items() if k not in ("feature_stats", "encoding")},
    }


# ----------------------------------------------------------------------------- variants


def variants_chart(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Score against batch-1 p50 latency (serving/variants.py rows), the front as a line."""
    shown = [r for r in rows if r["pareto"] is not None]
    if not shown:
        return None
    front = sorted((r for r in shown if r["pareto"]), key=lambda r: r["b1_p50_ms"])
    return {
        "kind": "variants",
        "metric": shown[0]["metric"],
        "points": [
            {"x": r["b1_p50_ms"], "y": r["score"], "ref": r["ref"], "pareto": bool(r["pareto"])}
            for r in shown
        ],
        "front": [{"x": r["b1_p50_ms"], "y": r["score"]} for r in front],
        "log_x": max(r["b1_p50_ms"] for r in shown) > 4 * min(r["b1_p50_ms"] for r in shown),
    }


# ----------------------------------------------------------------------------- monitoring


def monitor_view(report: dict[str, Any], series: dict[int, dict[str, list]]) -> dict[str, Any]:
    """Cards per version (`kiln.actors.monitor.build_report`) and the charts over time
    (`kiln.actors.monitor.time_series`); a language model's cards and charts are its own
    (tokens, time to first token, inter-token latency, queue, KV cache, cost per token)."""
    versions = report["versions"]
    language = report.get("kind") == "lm"
    if language:
        charts = {
            "requests": series_chart(series, "requests_per_s", "requests/s"),
            "ttft": series_chart(series, "ttft_p99_ms", "time to first token p99 (ms)"),
            "tokens": series_chart(series, "output_tokens_per_s", "output tokens/s"),
            "quality": series_chart(series, "quality", "mean score from feedback"),
        }
    else:
        charts = {
            "requests": series_chart(series, "requests_per_s", "requests/s"),
            "latency": series_chart(series, "p99_ms", "p99 latency (ms)"),
            "quality": series_chart(series, "quality", "accuracy / R² from feedback"),
        }
    return {
        "report": report,
        "language": language,
        "versions": versions,
        "total_requests": sum(v["requests"] for v in versions),
        "drift": [] if language else drift_rows(versions),
        "charts": charts,
    }


def series_chart(series: dict[int, dict[str, list]], key: str, title: str) -> dict | None:
    """One line per version over the window's buckets; None when no bucket has a value (no
    traffic yet, or no feedback for the quality chart)."""
    if not any(finite(v) is not None for values in series.values() for v in values[key]):
        return None
    first = next(iter(series.values()))
    return {
        "kind": "series",
        "title": title,
        "t": [finite(t) for t in first["t"]],
        "datasets": [
            {
                "label": f"v{version}",
                "data": [finite(v) for v in values[key]],
                "borderColor": COLORS[i % len(COLORS)],
            }
            for i, (version, values) in enumerate(sorted(series.items()))
        ],
    }


def drift_rows(versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per version and feature: PSI, KS p-value, drifted; the most drifted first."""
    rows = []
    for entry in versions:
        drift = entry.get("drift") or {}
        for feature in drift.get("features", []):
            rows.append({"version": entry["version"], **feature})
    return sorted(rows, key=lambda r: (not r.get("drifted"), -(finite(r.get("psi")) or 0.0)))


# ----------------------------------------------------------------------------- sweeps


def sweep_charts(summary: dict[str, Any]) -> dict[str, Any]:
    """The curves of every trial (sweep metric per epoch) or the λ path, for Chart.js."""
    metric = summary.get("metric", "")
    path = summary.get("path")
    if path:
        return {
            "path": {
                "kind": "path",
                "metric": metric,
                "points": [{"x": p["l2"], "y": finite(p["value"])} for p in path],
            }
        }
    datasets = []
    for i, trial in enumerate(summary.get("trials", [])):
        history = trial.get("history") or []
        values = [finite(h.get(metric)) for h in history]
        if any(v is not None for v in values):
            datasets.append(
                {
                    "label": trial["trial_id"],
                    "data": [
                        {"x": h.get("epoch", j), "y": v}
                        for j, (h, v) in enumerate(zip(history, values, strict=True))
                    ],
                    "borderColor": COLORS[i % len(COLORS)],
                }
            )
    if not datasets:
        return {"curves": None}
    return {"curves": {"kind": "trials", "metric": metric, "datasets": datasets}}


def heatmap_cells(heatmap: dict[str, Any] | None, mode: str) -> dict[str, Any] | None:
    """The heatmap grid with a colour per cell: better values darker."""
    if not heatmap:
        return None
    values = [finite(v) for row in heatmap["cells"] for v in row]
    present = [v for v in values if v is not None]
    if not present:
        return None
    low, high = min(present), max(present)
    span = (high - low) or 1.0

    def shade(value: Any) -> dict[str, Any]:
        v = finite(value)
        if v is None:
            return {"value": None, "color": "#f4f4f4"}
        goodness = (v - low) / span if mode == "max" else (high - v) / span
        light = round(92 - 55 * goodness)
        return {"value": v, "color": f"hsl(210, 70%, {light}%)", "dark": light < 60}

    return {
        **heatmap,
        "rows": [
            {"label": label, "cells": [shade(v) for v in row]}
            for label, row in zip(heatmap["y_labels"], heatmap["cells"], strict=True)
        ],
    }
