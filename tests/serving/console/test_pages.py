"""What the console's pages show, from hand-made records (serving/console/pages.py) and the
templates rendered from them: no Ray, no browser."""

from __future__ import annotations

import json
import math

import pytest

from kiln.actors.catalog import VersionRecord
from kiln.serving.console import pages
from kiln.serving.console.routes import templates


def record(version: int, name: str = "m", **fields) -> VersionRecord:
    base = {
        "name": name,
        "version": version,
        "created_at": 1_800_000_000.0 + version,
        "creator": "ann",
        "spec": {"kind": "mlp", "task": "classification", "classes": [0, 1]},
        "metrics": {"accuracy": 0.9},
        "lineage": {},
        "artifacts": {"model.safetensors": "ab" * 32},
    }
    return VersionRecord(**{**base, **fields})


def test_the_headline_is_the_first_finite_metric_of_the_list():
    assert pages.headline({"r2": 0.5, "macro_f1": 0.7}) == ("r2", 0.5)
    assert pages.headline({"accuracy": math.nan, "r2": 0.4}) == ("r2", 0.4)
    assert pages.headline({"accuracy": True, "loss": 1.0}) is None


def test_models_show_their_latest_versions_headline():
    models = [
        {"name": "a", "num_versions": 2, "num_archived": 0, "latest_version": 2, "aliases": {}},
        {"name": "b", "num_versions": 1, "num_archived": 1, "latest_version": None, "aliases": {}},
    ]
    rows = pages.model_rows(models, {"a": record(2, "a", metrics={"r2": 0.25})})
    assert (rows[0]["metric"], rows[0]["value"]) == ("r2", 0.25)
    assert rows[1]["metric"] is None and rows[1]["kind"] is None


def test_a_version_links_its_parent_its_variants_and_its_sweep():
    parent = record(1)
    child = record(2, lineage={"parent": "m@1", "compression": [{"method": "prune"}]})
    other = record(1, "n", lineage={"parent": "m@1"})
    swept = record(3, lineage={"sweep_id": "s-1", "parent": "m@2"})
    view = pages.version_view(parent, {"prod": 1}, [parent, child, other, swept], [])
    assert [c["ref"] for c in view["children"]] == ["m@2", "n@1"]
    assert view["aliases"] == ["prod"]
    child_view = pages.version_view(child, {}, [parent, child], [])
    (link,) = [item["link"] for item in child_view["lineage"] if item["key"] == "parent"]
    assert link == {"ref": "m@1", "name": "m", "version": 1}
    (sweep,) = [i for i in pages.version_view(swept, {}, [], [])["lineage"] if i.get("sweep")]
    assert sweep["sweep"] == "s-1"


def test_a_value_that_only_looks_like_a_ref_is_not_a_link():
    assert pages.ref_link("m@prod") is None and pages.ref_link("M@1") is None
    assert pages.ref_link(3) is None


def test_training_curves_put_losses_left_and_scores_right_and_drop_nan():
    history = [
        {"epoch": 0, "train_loss": 1.0, "val_accuracy": 0.5},
        {"epoch": 1, "train_loss": math.nan, "val_accuracy": 0.7},
    ]
    chart = pages.curves_chart(history)
    axes = {d["label"]: d["yAxisID"] for d in chart["datasets"]}
    assert axes == {"train_loss": "loss", "val_accuracy": "score"}
    (loss,) = [d for d in chart["datasets"] if d["label"] == "train_loss"]
    assert loss["data"] == [1.0, None] and chart["labels"] == [0, 1]
    json.dumps(chart, allow_nan=False)
    assert pages.curves_chart([]) is None and pages.curves_chart(None) is None


def test_the_variants_chart_draws_the_front_in_latency_order():
    rows = [
        {"ref": "m@1", "metric": "accuracy", "score": 0.95, "b1_p50_ms": 2.0, "pareto": True},
        {"ref": "m@2", "metric": "accuracy", "score": 0.90, "b1_p50_ms": 0.5, "pareto": True},
        {"ref": "m@3", "metric": "accuracy", "score": 0.80, "b1_p50_ms": 3.0, "pareto": False},
        {"ref": "m@4", "metric": "accuracy", "score": None, "b1_p50_ms": None, "pareto": None},
    ]
    chart = pages.variants_chart(rows)
    assert [p["ref"] for p in chart["points"]] == ["m@1", "m@2", "m@3"]
    assert [f["x"] for f in chart["front"]] == [0.5, 2.0]
    assert chart["log_x"] is True  # 3.0 ms is more than 4x 0.5 ms
    assert pages.variants_chart(rows[3:]) is None


def test_drift_rows_put_the_drifted_and_largest_psi_first():
    versions = [
        {
            "version": 1,
            "drift": {
                "features": [
                    {"feature": "a", "psi": 0.1, "drifted": False},
                    {"feature": "b", "psi": 0.3, "drifted": True},
                    {"feature": "c", "psi": 0.5, "drifted": False},
                ]
            },
        },
        {"version": 2, "drift": {"reference": False}},
    ]
    assert [r["feature"] for r in pages.drift_rows(versions)] == ["b", "c", "a"]


def test_a_chart_over_time_is_left_out_while_no_bucket_has_a_value():
    series = {1: {"t": [1.0, 2.0], "requests_per_s": [0.0, 2.0], "quality": [None, None]}}
    assert pages.series_chart(series, "quality", "q") is None
    chart = pages.series_chart(series, "requests_per_s", "r")
    assert chart["datasets"][0]["label"] == "v1" and chart["datasets"][0]["data"] == [0.0, 2.0]


@pytest.mark.parametrize("mode", ["max", "min"])
def test_the_heatmap_shades_the_better_cell_darker(mode):
    heatmap = {
        "x": "lr",
        "y": "l2",
        "x_labels": ["lo", "hi"],
        "y_labels": ["0", "1"],
        "cells": [[0.2, None], [0.8, 0.5]],
    }
    found = pages.heatmap_cells(heatmap, mode)
    low, high = found["rows"][0]["cells"][0], found["rows"][1]["cells"][0]
    best, worst = (high, low) if mode == "max" else (low, high)
    lightness = [int(c["color"].split(",")[2].strip(" %)")) for c in (best, worst)]
    assert lightness[0] < lightness[1]
    assert found["rows"][0]["cells"][1]["value"] is None


def test_the_templates_escape_what_they_show():
    view = pages.version_view(
        record(1, metrics={"note": "<script>alert(1)</script>", "accuracy": 0.5}), {}, [], []
    )
    html = templates.get_template("version.html").render(name="m", **view)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html


def test_a_chart_in_an_attribute_cannot_close_it():
    chart = {"kind": "curves", "labels": ["'><script>"], "datasets": []}
    view = {**pages.version_view(record(1), {}, [], []), "curves": chart}
    html = templates.get_template("version.html").render(name="m", **view)
    assert "'><script>" not in html
    start = html.index("data-chart='") + len("data-chart='")
    assert json.loads(html[start : html.index("'", start)]) == chart


def test_a_language_models_curves_are_by_step_with_perplexity_on_the_right():
    """An LM's history is by step, beside tokens seen and the learning rate: the chart draws
    its losses and perplexity over steps, not positions or settings on the score axis."""
    history = [
        {"step": 10, "tokens_seen": 5120, "train_loss": 5.0, "val_loss": 5.2,
         "val_perplexity": 181.0, "lr": 0.003},
        {"step": 20, "tokens_seen": 10240, "train_loss": 4.1, "val_loss": 4.4,
         "val_perplexity": 81.0, "lr": 0.002},
    ]  # fmt: skip
    chart = pages.curves_chart(history)
    axes = {d["label"]: d["yAxisID"] for d in chart["datasets"]}
    assert axes == {"train_loss": "loss", "val_loss": "loss", "val_perplexity": "score"}
    assert chart["labels"] == [10, 20] and chart["x_title"] == "step"
    assert chart["score_title"] == "perplexity"
    html = templates.get_template("version.html").render(
        name="m", **{**pages.version_view(record(1), {}, [], []), "curves": chart}
    )
    start = html.index("data-chart='") + len("data-chart='")
    assert json.loads(html[start : html.index("'", start)])["x_title"] == "step"


def lm_report() -> dict:
    entry = {
        "version": 3,
        "kind": "lm",
        "requests": 7,
        "requests_per_s": 0.1,
        "error_rate": 0.0,
        "prompt_tokens": 70,
        "completion_tokens": 140,
        "output_tokens_per_s": 2.3,
        "time_to_first_token_ms": {"p50": 12.5, "p99": 40.0},
        "inter_token_latency_ms": {"p50": 3.25, "p99": 9.5},
        "latency_ms": {"p50": 50.0, "p99": 90.0},
        "queue_depth": {"mean": 0.5, "max": 2.0},
        "kv_cache_usage": {"mean": 0.125, "max": 0.5},
        "feedback": {"labelled_rows": 2, "scored_rows": 2, "mean_score": 4.5},
        "cost": {"usd": 0.01, "per_1000_output_tokens": 0.0714},
    }
    return {
        "model": "m",
        "kind": "lm",
        "window_s": 3600.0,
        "prices_usd": {"cpu_hour": 0.05, "gpu_hour": 1.0, "as_of": "2025"},
        "versions": [entry],
    }


def test_the_monitor_fragment_of_a_language_model_shows_its_serving_numbers():
    series = {
        3: {
            "t": [1.0, 2.0],
            "requests_per_s": [0.1, 0.2],
            "p99_ms": [80.0, 90.0],
            "ttft_p99_ms": [30.0, 40.0],
            "output_tokens_per_s": [2.0, 2.5],
            "quality": [None, 4.5],
        }
    }
    view = pages.monitor_view(lm_report(), series)
    assert view["language"] and view["total_requests"] == 7 and view["drift"] == []
    assert set(view["charts"]) == {"requests", "ttft", "tokens", "quality"}
    assert view["charts"]["ttft"]["datasets"][0]["data"] == [30.0, 40.0]
    html = templates.get_template("monitor.html").render(
        name="m", window="1h", refresh_s=10, rendered_at=0, **view
    )
    for shown in (
        'class="card lm"',
        "12.5 / 40",  # time to first token p50 / p99
        "3.25 / 9.5",  # inter-token latency
        "70 / 140",  # prompt / completion tokens
        "0.5 / 2",  # queue depth
        "0.125 / 0.5",  # KV-cache use
        "$0.0714",  # per 1,000 output tokens
        "mean score 4.5",
        'id="tokens-chart"',
    ):
        assert shown in html, shown
    assert "mean batch rows" not in html and "cost per 1,000 predictions" not in html
