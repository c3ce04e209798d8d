"""`kiln retrain NAME`: the served version trained further on labelled feedback, then a canary
(cluster/retrain.py)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from kiln.cli.common import (
    AddressOpt,
    EpochProgress,
    HomeOpt,
    JsonOpt,
    KeyOpt,
    StorageOpt,
    app,
    connected,
    load_settings,
    output,
    preload,
)


@app.command()
def retrain(
    name: Annotated[str, typer.Argument(help="The served model's name.")],
    since: Annotated[str, typer.Option(help="Feedback from this far back: 30m, 24h, 7d.")] = "24h",
    feedback_weight: Annotated[
        float, typer.Option(help="How many times each feedback row counts against a training row.")
    ] = 1.0,
    canary_weight: Annotated[
        int, typer.Option(help="Percent of NAME's traffic the new version takes as a canary.")
    ] = 10,
    deploy: Annotated[
        bool, typer.Option(help="Deploy the new version as a canary (when NAME is served).")
    ] = True,
    epochs: Annotated[int, typer.Option(help="Epochs from the served weights.")] = 5,
    holdout: Annotated[
        float, typer.Option(help="Share of the feedback (whole requests) held out to evaluate.")
    ] = 0.3,
    min_feedback: Annotated[
        int, typer.Option(help="Refuse with fewer labelled predictions than this.")
    ] = 20,
    workers: Annotated[int, typer.Option(help="Ray Train workers.")] = 1,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Train the served version further on its labelled feedback and deploy it as a canary."""
    from kiln.retrain import RetrainRequest

    request = RetrainRequest(
        name=name,
        since=since,
        feedback_weight=feedback_weight,
        canary_weight=canary_weight,
        deploy=deploy,
        epochs=epochs,
        holdout=holdout,
        min_feedback=min_feedback,
        workers=workers,
        key=key,
    )
    settings = load_settings(address=address, home=home, storage=storage)
    preload("kiln.retrain", "kiln.training.loop")
    bar = EpochProgress(request.epochs, quiet=as_json)
    with bar.progress, connected(settings):
        from kiln.retrain import retrain_and_register
        from kiln.runtime import registry_for

        done = retrain_and_register(settings, request, registry_for(settings), bar.epoch, bar.step)
        bar.step("shutting down")
    output(done, as_json, render_result)


def render_result(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"kiln retrain: {result['model']}@{result['version']} from {result['parent']} "
        f"({result['feedback_train_rows']} feedback rows trained on, "
        f"{result['feedback_heldout_rows']} held out)",
        title_justify="left",
    )
    for column in ("", result["parent"], f"{result['model']}@{result['version']}"):
        table.add_column(column)
    for key in ("accuracy", "macro_f1", "r2", "mse"):
        if key in result["heldout_after"]:
            table.add_row(
                f"held-out feedback {key}",
                f"{result['heldout_before'][key]:.4f}",
                f"{result['heldout_after'][key]:.4f}",
            )
        if key in result["test_metrics"]:
            table.add_row(
                f"original test {key}",
                f"{result['parent_test_metrics'].get(key, float('nan')):.4f}",
                f"{result['test_metrics'][key]:.4f}",
            )
    canary = result["canary"]
    table.caption = (
        f"canary: {canary['ref']} takes {canary['weight']}% of traffic (kiln promote / rollback)"
        if canary
        else "not deployed (NAME is not served, or --no-deploy)"
    )
    return table
