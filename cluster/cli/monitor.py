"""`kiln monitor NAME`: a served model over a window, per version (cluster/monitoring.py)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from kiln.cli.common import (
    AddressOpt,
    HomeOpt,
    JsonOpt,
    KeyOpt,
    StorageOpt,
    app,
    console,
    open_client,
    output,
)

WATCH_INTERVAL_S = 5.0


def figure(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def pair(values: dict[str, Any], first: str, second: str, digits: int = 1) -> str:
    a, b = values.get(first), values.get(second)
    if a is None and b is None:
        return ""
    return f"{figure(a, digits)} / {figure(b, digits)}"


def language_table(report: dict[str, Any]) -> Group:
    """A language model: one row per figure, one column per version (a dozen figures fit a
    terminal this way; actors/language_monitor.py)."""
    table = Table(title=f"{report['model']}: last {report['window_s'] / 60:g} min")
    versions = report["versions"]
    table.add_column("")
    for entry in versions:
        table.add_column(f"@{entry['version']}", justify="right")

    def cost(entry: dict[str, Any]) -> str:
        value = entry["cost"]["per_1000_output_tokens"]
        return "" if value is None else f"${value:.5f}"

    rows = (
        ("requests", lambda e: str(e["requests"])),
        ("requests/s", lambda e: f"{e['requests_per_s']:.2f}"),
        ("prompt / output tokens", lambda e: f"{e['prompt_tokens']} / {e['completion_tokens']}"),
        ("output tokens/s", lambda e: f"{e['output_tokens_per_s']:.2f}"),
        ("TTFT p50 / p99 ms", lambda e: pair(e["time_to_first_token_ms"], "p50", "p99")),
        ("inter-token p50 / p99 ms", lambda e: pair(e["inter_token_latency_ms"], "p50", "p99")),
        ("queue depth mean / max", lambda e: pair(e["queue_depth"], "mean", "max")),
        ("KV-cache use mean / max", lambda e: pair(e["kv_cache_usage"], "mean", "max", 2)),
        ("labelled (mean score)", labelled),
        ("$ per 1k output tokens", cost),
    )
    for label, shown in rows:
        table.add_row(label, *(shown(entry) for entry in versions))
    notes = []
    if not versions:
        notes.append("nothing logged in this window (is the model served, with --log-sample > 0?)")
    prices = report["prices_usd"]
    notes.append(
        f"prices: ${prices['cpu_hour']}/CPU-h, ${prices['gpu_hour']}/GPU-h "
        "(KILN_PRICE_CPU_HOUR, KILN_PRICE_GPU_HOUR)"
    )
    return Group(table, *notes)


def labelled(entry: dict[str, Any]) -> str:
    feedback = entry["feedback"]
    score = feedback.get("mean_score")
    return f"{feedback['labelled_rows']}" + ("" if score is None else f" ({score:.3g})")


def report_table(report: dict[str, Any]) -> Group:
    """One row per version, then the drifted inputs and confusion matrices below it."""
    if report.get("kind") == "lm":
        return language_table(report)
    table = Table(title=f"{report['model']}: last {report['window_s'] / 60:g} min")
    for column in (
        "version",
        "req/s",
        "errors",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "batch",
        "labelled",
        "quality",
        "drifted inputs",
        "$/1k pred",
    ):
        table.add_column(
            column, justify="left" if column in ("quality", "drifted inputs") else "right"
        )
    notes: list[str] = []
    for entry in report["versions"]:
        latency = entry["latency_ms"]
        quality = entry.get("quality") or {}
        if "accuracy" in quality:
            shown = (
                f"acc {quality['accuracy']:.3f} P {quality['precision']:.3f} "
                f"R {quality['recall']:.3f} F1 {quality['macro_f1']:.3f}"
            )
        elif "r2" in quality:
            shown = f"R² {quality['r2']:.3f} MSE {quality['mse']:.4g}"
        else:
            shown = "no feedback"
        drift = entry.get("drift") or {}
        if not drift.get("reference"):
            drifted = "no reference"
        else:
            names = drift.get("drifted_features") or []
            drifted = (
                f"{len(names)}: {', '.join(names[:4])}{'…' if len(names) > 4 else ''}"
                if names
                else "none"
            )
            predictions = drift.get("predictions") or {}
            if predictions.get("drifted"):
                notes.append(
                    f"v{entry['version']}: the predictions drifted (PSI {predictions['psi']:.2f})"
                )
        cost = entry["cost"]["per_1000_predictions"]
        table.add_row(
            str(entry["version"]),
            f"{entry['requests_per_s']:.2f}",
            f"{entry['error_rate']:.1%}",
            figure(latency["p50"], 1),
            figure(latency["p95"], 1),
            figure(latency["p99"], 1),
            figure(entry["mean_batch_rows"], 1),
            str(quality.get("labelled_rows", 0)),
            shown,
            drifted,
            "" if cost is None else f"{cost:.5f}",
        )
    if not report["versions"]:
        notes.append("nothing logged in this window (is the model served, with --log-sample > 0?)")
    prices = report["prices_usd"]
    notes.append(
        f"prices: ${prices['cpu_hour']}/CPU-h, ${prices['gpu_hour']}/GPU-h "
        "(KILN_PRICE_CPU_HOUR, KILN_PRICE_GPU_HOUR)"
    )
    return Group(table, *notes)


@app.command()
def monitor(
    name: Annotated[str, typer.Argument(help="The served model's name.")],
    window: Annotated[str, typer.Option(help="How far back: 30m, 1h, 7d ...")] = "1h",
    watch: Annotated[
        bool, typer.Option(help=f"Refresh every {WATCH_INTERVAL_S:g} s until Ctrl-C.")
    ] = False,
    plot: Annotated[
        str | None, typer.Option(help="Write a PNG over time, one line per version.")
    ] = None,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Traffic, latency, live quality from feedback, drift and cost of a served model (for a
    language model: tokens, time to first token, inter-token latency, tokens/s, queue, KV
    cache and cost per 1,000 output tokens)."""
    from kiln.monitoring import window_s, write_plot

    window_s(window)  # a bad --window is one line before anything is read
    with open_client(address, home, storage, key) as kiln:
        report = kiln.monitor(name, window)
        if plot:
            written = write_plot(kiln, name, window, report, plot)
            console.print(f"wrote {written}")
        if not watch:
            output(report, as_json, report_table)
            return
        with Live(report_table(report), console=console, refresh_per_second=1) as live:
            try:
                while True:
                    time.sleep(WATCH_INTERVAL_S)
                    live.update(report_table(kiln.monitor(name, window)))
            except KeyboardInterrupt:
                pass
