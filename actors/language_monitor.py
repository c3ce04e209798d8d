"""What a served language model did over a window, per version, from its prediction log.

The rows are `TEXT_PREDICTION_SCHEMA`'s (actors/feedback.py): one per choice of a logged
generation, the request's figures on choice 0. Per version: requests and requests/s, prompt
and completion tokens, output tokens/s over the window, time to first token p50/p99,
inter-token latency p50/p99 (over every logged gap between tokens), request latency,
queue depth and KV-cache use as requests finished (mean and max), labelled feedback (rows,
and the mean of the numeric scores among the labels), and cost per 1,000 output tokens
(actors/monitor.py `costs`, with completion tokens as the unit). Like the tabular report it
counts what was logged: with `--log-sample` below 1, a share of the traffic.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa

from kiln.actors.catalog import VersionRecord
from kiln.actors.feedback import TEXT_PREDICTION_SCHEMA, read_usage, read_window


def is_language_model(records: dict[int, VersionRecord]) -> bool:
    return any(r.spec.get("kind") == "lm" for r in records.values())


def p50_p99(values: np.ndarray) -> dict[str, float | None]:
    values = values[np.isfinite(values)] if len(values) else values
    if not len(values):
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": float(p50), "p99": float(p99)}


def mean_max(values: np.ndarray) -> dict[str, float | None]:
    values = values[np.isfinite(values)] if len(values) else values
    if not len(values):
        return {"mean": None, "max": None}
    return {"mean": float(values.mean()), "max": float(values.max())}


def score_of(label: str) -> float | None:
    """A label's numeric score: a number, true/false as 1/0, or an object's `score`."""
    try:
        value = json.loads(label)
    except ValueError:
        return None
    if isinstance(value, dict):
        value = value.get("score")
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and np.isfinite(value):
        return float(value)
    return None


def column(rows: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64, nulls as NaN."""
    return np.asarray(rows.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)


def generation_traffic(rows: pa.Table, window_s: float) -> dict[str, Any]:
    """The serving figures of one version's rows (see the module docstring)."""
    first = rows.filter(pa.array(rows.column("choice").to_numpy() == 0))
    status = first.column("status").to_numpy()
    ok = status == 200
    completion_tokens = int(np.nansum(column(rows, "completion_tokens")))
    gaps = first.column("inter_token_ms").combine_chunks().flatten()
    return {
        "requests": int(first.num_rows),
        "requests_per_s": first.num_rows / window_s,
        "error_rate": float((~ok).mean()) if len(ok) else 0.0,
        "prompt_tokens": int(np.nansum(column(first, "prompt_tokens"))),
        "completion_tokens": completion_tokens,
        "output_tokens_per_s": completion_tokens / window_s,
        "time_to_first_token_ms": p50_p99(column(first, "ttft_ms")),
        "inter_token_latency_ms": p50_p99(
            np.asarray(gaps.to_numpy(zero_copy_only=False), dtype=np.float64)
        ),
        "latency_ms": p50_p99(column(first, "latency_ms")),
        "queue_depth": mean_max(column(first, "queue_depth")),
        "kv_cache_usage": mean_max(column(first, "kv_cache_usage")),
    }


def generation_feedback(rows: pa.Table) -> dict[str, Any]:
    labels = [label for label in rows.column("label").to_pylist() if label is not None]
    scores = [s for s in (score_of(label) for label in labels) if s is not None]
    return {
        "labelled_rows": len(labels),
        "scored_rows": len(scores),
        "mean_score": float(np.mean(scores)) if scores else None,
    }


def language_report(
    storage_uri: str,
    name: str,
    records: dict[int, VersionRecord],
    window_s: float,
    now: float | None = None,
) -> dict[str, Any]:
    """A language model's report over the last `window_s` seconds, per logged version."""
    from kiln.actors.monitor import PRICES_DATE, costs, prices

    until = now if now is not None else time.time()
    since = until - window_s
    table = read_window(storage_uri, name, since, until, False, TEXT_PREDICTION_SCHEMA)
    versions = sorted(set(table.column("version").to_pylist()))
    by_version = {
        v: table.filter(pa.array(table.column("version").to_numpy() == v)) for v in versions
    }
    entries = {v: generation_traffic(rows, window_s) for v, rows in by_version.items()}
    tokens = {name: {v: e["completion_tokens"] for v, e in entries.items()}}
    spend = costs(read_usage(storage_uri, since), since, until, tokens).get(name, {})
    out = []
    for version, rows in by_version.items():
        cost = spend.get(version, {"usd": 0.0, "per_1000_predictions": None})
        out.append(
            {
                "version": version,
                "kind": "lm",
                **entries[version],
                "feedback": generation_feedback(rows),
                "cost": {
                    "usd": cost["usd"],
                    "per_1000_output_tokens": cost["per_1000_predictions"],
                },
            }
        )
    return {
        "model": name,
        "kind": "lm",
        "window_s": window_s,
        "since": since,
        "until": until,
        "prices_usd": {**prices(), "as_of": PRICES_DATE},
        "versions": out,
    }


def language_time_series(
    storage_uri: str, name: str, window_s: float, buckets: int = 30, now: float | None = None
) -> dict[int, dict[str, list[float | None]]]:
    """Per version, per time bucket: requests/s, request p99 latency, time to first token p99,
    output tokens/s and the mean score from feedback."""
    until = now if now is not None else time.time()
    since = until - window_s
    table = read_window(storage_uri, name, since, until, False, TEXT_PREDICTION_SCHEMA)
    edges = np.linspace(since, until, buckets + 1)
    ts = table.column("ts").to_numpy()
    out: dict[int, dict[str, list[float | None]]] = {}
    for version in sorted(set(table.column("version").to_pylist())):
        mask = table.column("version").to_numpy() == version
        keys = ("t", "requests_per_s", "p99_ms", "ttft_p99_ms", "output_tokens_per_s", "quality")
        series: dict[str, list[float | None]] = {k: [] for k in keys}
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            rows = table.filter(pa.array(mask & (ts >= lo) & (ts < hi)))
            stats = generation_traffic(rows, hi - lo)
            series["t"].append(float(hi))
            series["requests_per_s"].append(stats["requests_per_s"])
            series["p99_ms"].append(stats["latency_ms"]["p99"])
            series["ttft_p99_ms"].append(stats["time_to_first_token_ms"]["p99"])
            series["output_tokens_per_s"].append(stats["output_tokens_per_s"])
            series["quality"].append(generation_feedback(rows)["mean_score"])
        out[version] = series
    return out
