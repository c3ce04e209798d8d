"""Finished sweeps' summaries in shared storage, for readers that cannot see the driver's files.

`kiln tune` writes its CSV and PNG reports under the driver's KILN_HOME, which a Ray Serve
replica on another node never sees. Each finished sweep therefore also publishes one JSON
summary to `<storage>/sweeps/<sweep_id>/summary.json` (atomically: a reader sees it whole or
not at all), and the web console lists and reads sweeps from there. This module owns that
layout, so the writer (cluster/tune_pipeline.py) and the readers (serving/) agree on it. Ray
Tune's own files live beside it in `<storage>/sweeps/<sweep_id>-train/`, which has no summary
and is skipped.

A summary (values are JSON: NaN and ±inf are written as null):
    sweep_id, name, registered ("name@N"), best_trial_id: str; created_at, elapsed_s: float
    (epoch seconds, seconds); solver, scheduler, search, selection: str; searched, notes:
    [str]; test_metrics: {str: number}; metric: str; mode: "min" | "max";
    trials: [{trial_id, status: str, epochs: int, config: {lr, l2, ...}, best: float | null,
              metrics: {str: number | bool} (last report), history: [{str: number | null}]}]
              (history: at most 500 epochs; list_sweeps leaves it out);
    heatmap (minibatch sweeps, else null): {x: "lr", y: "l2", x_labels: [str],
              y_labels: [str] ("0" first when a trial had λ = 0), cells: [[float | null]]
              (a row per y label, a column per x label: the best metric in the cell)};
    path (λ paths, else null): [{l2: float, value: float | null}] by increasing λ.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from kiln.actors.storage import ArtifactStore
from kiln.training.errors import KilnError, NotFoundError

logger = logging.getLogger(__name__)

SWEEPS_FOLDER = "sweeps"
SUMMARY_FILE = "summary.json"


def summary_path(sweep_id: str) -> str:
    """`sweeps/<sweep_id>/summary.json`, refusing an id that is not one plain folder name."""
    if (
        not sweep_id
        or sweep_id.startswith(".")  # ".", "..", hidden folders
        or ".." in sweep_id
        or any(sep in sweep_id for sep in "/\\")
    ):
        raise KilnError(
            f'Got "{sweep_id}" for a sweep id. A sweep id is one folder name, '
            f'without "/", "\\" or "..": pick one from the list of sweeps.'
        )
    return f"{SWEEPS_FOLDER}/{sweep_id}/{SUMMARY_FILE}"


def publish_sweep(storage_uri: str, summary: dict[str, Any]) -> str:
    """Write a sweep's summary (it must be JSON-safe: no NaN) under its `sweep_id`; returns
    the path below the storage root."""
    relpath = summary_path(str(summary["sweep_id"]))
    data = json.dumps(summary, allow_nan=False, separators=(",", ":")).encode()
    ArtifactStore(storage_uri).publish(relpath, data)
    return relpath


def read_sweep(storage_uri: str, sweep_id: str) -> dict[str, Any]:
    """The whole summary of one sweep, trials' learning curves included."""
    relpath = summary_path(sweep_id)
    store = ArtifactStore(storage_uri)
    if SUMMARY_FILE not in store.list_files(f"{SWEEPS_FOLDER}/{sweep_id}"):
        raise NotFoundError(f"unknown sweep {sweep_id}")
    return _parse(store.read(relpath), sweep_id)


def list_sweeps(storage_uri: str) -> list[dict[str, Any]]:
    """Every finished sweep's summary without the trials' histories, newest first.

    A summary that is not valid JSON is skipped with a warning, so one bad file does not hide
    every other sweep from the console.
    """
    store = ArtifactStore(storage_uri)
    found = []
    for name in store.list_dirs(SWEEPS_FOLDER):
        if SUMMARY_FILE not in store.list_files(f"{SWEEPS_FOLDER}/{name}"):
            continue  # Ray Tune's `<id>-train` folder, or a sweep still running
        try:
            summary = _parse(store.read(f"{SWEEPS_FOLDER}/{name}/{SUMMARY_FILE}"), name)
        except KilnError as exc:
            logger.warning("skipping sweep %s: %s", name, exc)
            continue
        summary["trials"] = [
            {k: v for k, v in trial.items() if k != "history"} for trial in summary["trials"]
        ]
        found.append(summary)
    return sorted(found, key=lambda s: (s["created_at"], s["sweep_id"]), reverse=True)


def _parse(data: bytes, sweep_id: str) -> dict[str, Any]:
    try:
        summary = json.loads(data)
    except ValueError as exc:
        raise KilnError(f"the summary of sweep {sweep_id} is not valid JSON: {exc}") from exc
    if not isinstance(summary, dict) or not isinstance(summary.get("trials"), list):
        raise KilnError(f"the summary of sweep {sweep_id} has no trials list")
    summary.setdefault("sweep_id", sweep_id)
    summary.setdefault("created_at", 0.0)
    return summary
