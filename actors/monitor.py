"""What a served model did over a window, per version: traffic, latency, quality, drift, cost.

Built from the prediction log (actors/feedback.py `read_window`), the versions' specs and drift
references, and the replicas' usage rows. The same report answers
`GET /v1/models/{name}/metrics`, `kiln monitor`, the Prometheus quality and drift gauges and
`kiln autopilot`; it lives here, below serving/ and cluster/, because all of them use it.

Quality comes from labelled feedback only, with the number of labelled rows behind it:
accuracy = (TP + TN) / all; per class, precision = TP / (TP + FP), recall = TP / (TP + FN),
F1 = 2·P·R / (P + R), macro-averaged over the classes present in the labels
(training/metrics.py); a regressor gets MSE = Σ(ŷ − y)² / n and R² = 1 − SSE / Σ(y − ȳ)².

Cost per 1,000 predictions: each replica's alive time over the window (idle time included) ×
(CPUs × KILN_PRICE_CPU_HOUR + GPUs × KILN_PRICE_GPU_HOUR) / 3600, split between the models
it served by their predictions in the window (evenly when none had any), and within a model
between its versions by predictions; divided by the predictions, × 1,000. A replica scaled
to zero reports no time and costs nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from kiln.actors.catalog import VersionRecord
from kiln.actors.feedback import read_usage, read_window
from kiln.actors.registry import artifact_path
from kiln.actors.storage import ArtifactStore
from kiln.training.drift import REFERENCE_FILE, DriftReference, drift_summary
from kiln.training.metrics import confusion_matrix, metrics_from_confusion, regression_metrics

logger = logging.getLogger(__name__)

# AWS EC2 on-demand list prices, us-east-1, as published in 2025: m7i.large ($0.1008/h for
# 2 vCPUs) per vCPU, and g5.xlarge ($1.006/h, one A10G) per GPU.
DEFAULT_PRICE_CPU_HOUR = 0.0504
DEFAULT_PRICE_GPU_HOUR = 1.006
PRICES_DATE = "2025"
MAX_DRIFT_ROWS = 20_000
"""Drift looks at the most recent rows of a window, at most this many."""


WINDOW_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 31 * 86400


def parse_window(text: str) -> float:
    """`30m`, `1h`, `7d` as seconds; ValueError (with the form to use) for anything else."""
    text = text.strip()
    number, unit = text[:-1], text[-1:]
    try:
        seconds = float(number) * WINDOW_UNITS_S[unit]
    except (ValueError, KeyError):
        seconds = 0.0
    if not 0 < seconds <= MAX_WINDOW_S or not number.replace(".", "", 1).isdigit():
        raise ValueError(f"{text[:20]!r} is not a duration like 30m, 1h or 7d (at most 31d)")
    return seconds


def prices() -> dict[str, float]:
    """USD per CPU-hour and GPU-hour: KILN_PRICE_CPU_HOUR, KILN_PRICE_GPU_HOUR or the defaults."""
    return {
        "cpu_hour": float(os.environ.get("KILN_PRICE_CPU_HOUR", DEFAULT_PRICE_CPU_HOUR)),
        "gpu_hour": float(os.environ.get("KILN_PRICE_GPU_HOUR", DEFAULT_PRICE_GPU_HOUR)),
    }


def percentiles(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def quality(spec: dict[str, Any], predictions: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Quality of predictions against labels (JSON text), with the labelled row count."""
    if spec["task"] == "classification":
        index = {json.dumps(c): i for i, c in enumerate(spec["classes"])}
        pairs = [(index[t], int(p)) for t, p in zip(labels, predictions, strict=True) if t in index]
        out: dict[str, Any] = {"labelled_rows": len(pairs)}
        if not pairs:
            return out
        y_true, y_pred = (np.array(v) for v in zip(*pairs, strict=True))
        confusion = confusion_matrix(y_true, y_pred, len(spec["classes"]))
        return {**out, **metrics_from_confusion(confusion), "confusion": confusion.tolist()}
    y = np.array([float(json.loads(t)) for t in labels])
    out = {"labelled_rows": len(y)}
    if not len(y):
        return out
    return {**out, **regression_metrics(y, predictions.astype(np.float64))}


def load_reference(storage_uri: str, record: VersionRecord) -> DriftReference | None:
    """The version's drift reference (checked against its sha256), or None if it has none."""
    if REFERENCE_FILE not in record.artifacts:
        return None
    from kiln.training.artifacts import verify_files

    data = ArtifactStore(storage_uri).read(
        artifact_path(record.name, record.version, REFERENCE_FILE)
    )
    verify_files({REFERENCE_FILE: data}, {REFERENCE_FILE: record.artifacts[REFERENCE_FILE]})
    return DriftReference.from_bytes(data)


def traffic(rows: pa.Table, window_s: float) -> dict[str, Any]:
    """Requests/s, error rate, latency percentiles and mean batch size of one version's rows."""
    request_ids = rows.column("request_id").to_numpy(zero_copy_only=False)
    _, first = np.unique(request_ids, return_index=True)
    status = rows.column("status").to_numpy()[first]
    latency = rows.column("latency_ms").to_numpy()[first]
    batch = rows.column("batch_rows").to_numpy()[first]
    ok = status == 200
    return {
        "requests": int(len(first)),
        "requests_per_s": len(first) / window_s,
        "predictions": int((rows.column("status").to_numpy() == 200).sum()),
        "error_rate": float((~ok).mean()) if len(first) else 0.0,
        "latency_ms": percentiles(latency[ok]),
        "mean_batch_rows": float(batch[ok].mean()) if ok.any() else None,
    }


def version_drift(
    reference: DriftReference | None, rows: pa.Table, spec: dict[str, Any]
) -> dict[str, Any]:
    if reference is None:
        return {"reference": False}
    ok = rows.filter(pa.array(rows.column("status").to_numpy() == 200))
    ok = ok.slice(max(0, ok.num_rows - MAX_DRIFT_ROWS))
    if ok.num_rows == 0:
        return {"reference": True, "rows": 0, "drifted_features": [], "features": []}
    width = len(reference.names)
    inputs = ok.column("inputs").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    window = inputs.reshape(ok.num_rows, width)
    predictions = ok.column("prediction").to_numpy()
    return {"reference": True, **drift_summary(reference, window, predictions)}


def costs(
    usage: pa.Table, since: float, until: float, predictions: dict[str, dict[int, int]]
) -> dict[str, dict[int, dict[str, float | None]]]:
    """Cost per 1,000 predictions per model and version (see the module docstring)."""
    price = prices()
    spend: dict[str, float] = {}
    for row in usage.to_pylist():
        alive_s = max(0.0, min(row["end_ts"], until) - max(row["start_ts"], since))
        dollars = (
            alive_s
            / 3600
            * (row["num_cpus"] * price["cpu_hour"] + row["num_gpus"] * price["gpu_hour"])
        )
        models = row["models"] or []
        counts = [sum(predictions.get(m, {}).values()) for m in models]
        total = sum(counts)
        for model, count in zip(models, counts, strict=True):
            share = count / total if total else 1 / len(models)
            spend[model] = spend.get(model, 0.0) + dollars * share
    out: dict[str, dict[int, dict[str, float | None]]] = {}
    for model, versions in predictions.items():
        total = sum(versions.values())
        out[model] = {}
        for version, count in versions.items():
            dollars = spend.get(model, 0.0) * (count / total if total else 0.0)
            out[model][version] = {
                "usd": dollars,
                "per_1000_predictions": dollars / count * 1000 if count else None,
            }
    return out


def build_report(
    storage_uri: str,
    name: str,
    records: dict[int, VersionRecord],
    window_s: float,
    now: float | None = None,
) -> dict[str, Any]:
    """Everything about model `name` over the last `window_s` seconds, per logged version
    (a language model's figures: actors/language_monitor.py)."""
    from kiln.actors.language_monitor import is_language_model, language_report

    if is_language_model(records):
        return language_report(storage_uri, name, records, window_s, now)
    until = now if now is not None else time.time()
    since = until - window_s
    table = read_window(storage_uri, name, since, until)
    versions = sorted(set(table.column("version").to_pylist()))
    by_version = {
        v: table.filter(pa.array(table.column("version").to_numpy() == v)) for v in versions
    }
    counts = {
        name: {v: int((t.column("status").to_numpy() == 200).sum()) for v, t in by_version.items()}
    }
    cost = costs(read_usage(storage_uri, since), since, until, counts).get(name, {})
    out = []
    for version, rows in by_version.items():
        entry: dict[str, Any] = {"version": version, **traffic(rows, window_s)}
        record = records.get(version)
        labelled = rows.filter(rows.column("label").is_valid())
        if record is not None:
            entry["quality"] = quality(
                record.spec,
                labelled.column("prediction").to_numpy(),
                labelled.column("label").to_pylist(),
            )
            entry["drift"] = version_drift(load_reference(storage_uri, record), rows, record.spec)
        entry["cost"] = cost.get(version, {"usd": 0.0, "per_1000_predictions": None})
        out.append(entry)
    return {
        "model": name,
        "window_s": window_s,
        "since": since,
        "until": until,
        "prices_usd": {**prices(), "as_of": PRICES_DATE},
        "versions": out,
    }


def time_series(
    storage_uri: str,
    name: str,
    records: dict[int, VersionRecord],
    window_s: float,
    buckets: int = 30,
    now: float | None = None,
) -> dict[int, dict[str, list[float | None]]]:
    """Per version, per time bucket: requests/s, p99 latency, and accuracy (R² for a
    regressor) from the feedback on the bucket's predictions (a language model's series:
    actors/language_monitor.py)."""
    from kiln.actors.language_monitor import is_language_model, language_time_series

    if is_language_model(records):
        return language_time_series(storage_uri, name, window_s, buckets, now)
    until = now if now is not None else time.time()
    since = until - window_s
    table = read_window(storage_uri, name, since, until, with_inputs=False)
    edges = np.linspace(since, until, buckets + 1)
    out: dict[int, dict[str, list[float | None]]] = {}
    ts = table.column("ts").to_numpy()
    for version in sorted(set(table.column("version").to_pylist())):
        record = records.get(version)
        mask = table.column("version").to_numpy() == version
        series: dict[str, list[float | None]] = {
            "t": [],
            "requests_per_s": [],
            "p99_ms": [],
            "quality": [],
        }
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            rows = table.filter(pa.array(mask & (ts >= lo) & (ts < hi)))
            stats = traffic(rows, hi - lo)
            series["t"].append(float(hi))
            series["requests_per_s"].append(stats["requests_per_s"])
            series["p99_ms"].append(stats["latency_ms"]["p99"])
            labelled = rows.filter(rows.column("label").is_valid())
            figure = None
            if record is not None and labelled.num_rows:
                found = quality(
                    record.spec,
                    labelled.column("prediction").to_numpy(),
                    labelled.column("label").to_pylist(),
                )
                figure = found.get("accuracy", found.get("r2"))
            series["quality"].append(figure)
        out[version] = series
    return out


# -- Prometheus gauges: windowed quality, drift and cost ----------------------------------------

GAUGE_INTERVAL_S = 60.0
GAUGE_WINDOW_S = 3600.0


class QualityGauges:
    """Sets the windowed gauges from each recently served model's report (see serving/metrics.py).

    Run by the FeedbackStore's first shard on a thread of its own, once a minute, over the last
    hour: one place computes them, however many replicas serve.
    """

    def __init__(self, storage_uri: str) -> None:
        from ray.util import metrics

        tags: Any = ("model", "version", "metric")
        self.storage_uri = storage_uri
        self.quality = metrics.Gauge(
            "kiln_model_quality",
            description="Quality from labelled feedback over the last hour "
            "(accuracy, precision, recall, macro_f1, mse, r2, labelled_rows).",
            tag_keys=tags,
        )
        self.drift = metrics.Gauge(
            "kiln_feature_drift_psi",
            description="PSI of each input over the last hour against the training bins.",
            tag_keys=("model", "version", "feature"),  # type: ignore[arg-type]
        )
        self.drifted = metrics.Gauge(
            "kiln_drifted_features",
            description="Inputs flagged as drifted over the last hour.",
            tag_keys=("model", "version"),  # type: ignore[arg-type]
        )
        self.cost = metrics.Gauge(
            "kiln_cost_per_1000_predictions_usd",
            description="Replica cost per 1,000 predictions over the last hour (USD).",
            tag_keys=("model", "version"),  # type: ignore[arg-type]
        )
        self.lm_cost = metrics.Gauge(
            "kiln_lm_cost_per_1000_output_tokens_usd",
            description="A language model's replica cost per 1,000 output tokens over the "
            "last hour (USD).",
            tag_keys=("model", "version"),  # type: ignore[arg-type]
        )

    def update(self, registry: Any) -> int:
        """One pass over the models logged in the last hour; returns how many it reported."""
        import ray

        from kiln.actors.feedback import MONITORING_DIR, USAGE_MODEL

        store = ArtifactStore(self.storage_uri)
        reported = 0
        for model in store.list_dirs(MONITORING_DIR):
            if model == USAGE_MODEL:
                continue
            try:
                records = {r.version: r for r in ray.get(registry.list_versions.remote(model))}
                report = build_report(self.storage_uri, model, records, GAUGE_WINDOW_S)
            except Exception as exc:  # a model deleted from the registry, say
                logger.warning("no gauges for %s: %s", model, exc)
                continue
            for entry in report["versions"]:
                self.set_version(model, entry)
            reported += bool(report["versions"])
        return reported

    def set_version(self, model: str, entry: dict[str, Any]) -> None:
        tags = {"model": model, "version": str(entry["version"])}
        for metric, value in (entry.get("quality") or {}).items():
            if isinstance(value, int | float):
                self.quality.set(float(value), {**tags, "metric": metric})
        drift = entry.get("drift") or {}
        for feature in drift.get("features") or []:
            self.drift.set(feature["psi"], {**tags, "feature": feature["feature"]})
        if drift.get("reference"):
            self.drifted.set(len(drift.get("drifted_features") or []), tags)
        cost = entry["cost"].get("per_1000_predictions")
        if cost is not None:
            self.cost.set(cost, tags)
        lm_cost = entry["cost"].get("per_1000_output_tokens")
        if lm_cost is not None:
            self.lm_cost.set(lm_cost, tags)


def run_gauges(storage_uri: str, stop: Any) -> None:
    """The gauge loop (a daemon thread of the FeedbackStore's shard 0) until `stop` is set."""
    import ray

    from kiln.actors.registry import NAMESPACE, REGISTRY_NAME

    gauges = QualityGauges(storage_uri)
    while not stop.wait(GAUGE_INTERVAL_S):
        try:
            gauges.update(ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE))
        except Exception as exc:  # never let the thread die: the next minute tries again
            logger.warning("gauge update failed: %s", exc)
