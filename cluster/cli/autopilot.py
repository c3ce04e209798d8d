"""`kiln autopilot NAME ...` starts a model's autopilot on the cluster; `kiln autopilot status
NAME` and `kiln autopilot stop NAME` look at it and stop it (cluster/autopilot.py)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from kiln.cli.common import (
    AddressOpt,
    HomeOpt,
    JsonOpt,
    KeyOpt,
    StorageOpt,
    app,
    connected,
    console,
    load_settings,
    output,
)
from kiln.training.errors import KilnError

ACTIONS = ("status", "stop")


@app.command()
def autopilot(
    target: Annotated[str, typer.Argument(help="NAME to start it, or status|stop.")],
    name: Annotated[str | None, typer.Argument(help="NAME after status or stop.")] = None,
    min_feedback: Annotated[
        int, typer.Option(help="Labelled predictions that trigger a retrain.")
    ] = 500,
    min_gain: Annotated[
        float,
        typer.Option(help="Promote when the canary is better by this much (95% confidence)."),
    ] = 0.01,
    max_canary_s: Annotated[
        float, typer.Option(help="Roll the canary back after this long without a verdict.")
    ] = 900.0,
    on_drift: Annotated[
        bool, typer.Option(help="Also retrain when an input drifts (with half the feedback).")
    ] = False,
    canary_weight: Annotated[int, typer.Option(help="Percent of traffic the canary takes.")] = 10,
    check_every_s: Annotated[float, typer.Option(help="Seconds between checks.")] = 30.0,
    epochs: Annotated[int, typer.Option(help="Epochs of each retrain.")] = 5,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Feedback -> retrain -> canary -> promote or roll back, as a detached actor."""
    import ray

    from kiln.autopilot import AutopilotConfig, find_autopilot, start_autopilot

    if target in ACTIONS and name is None:
        raise KilnError(f"Give the model: kiln autopilot {target} NAME.")
    if target not in ACTIONS and name is not None:
        raise KilnError(
            f'Got "{target}" as an action. Use kiln autopilot NAME, or status|stop NAME.'
        )
    model = name if target in ACTIONS else target
    assert model is not None
    config = None
    if target not in ACTIONS:
        config = AutopilotConfig(
            name=model,
            min_feedback=min_feedback,
            min_gain=min_gain,
            max_canary_s=max_canary_s,
            on_drift=on_drift,
            canary_weight=canary_weight,
            check_every_s=check_every_s,
            epochs=epochs,
            key=key,
        )
    settings = load_settings(address=address, home=home, storage=storage)
    if settings.embedded and config is not None:
        console.print(
            "[yellow]the autopilot lives as long as this Ray instance: on the embedded Ray, "
            "keep this command running (Ctrl-C stops it) or run it on a cluster[/]"
        )
    with connected(settings):
        if config is not None:
            handle = start_autopilot(config, settings)
            result = ray.get(handle.get_status.remote())
        elif target == "status":
            result = ray.get(find_autopilot(model).get_status.remote())
        else:
            handle = find_autopilot(model)
            result = ray.get(handle.stop.remote())
            ray.kill(handle, no_restart=True)
        output(result, as_json, render_status)
        if config is not None and settings.embedded:
            wait_embedded()


def wait_embedded() -> None:
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping")


def render_status(status: dict[str, Any]) -> Table:
    state = status["state"]
    table = Table(title=f"autopilot {status['model']}: {state['phase']}", title_justify="left")
    for column in ("at", "action", "target", "figures"):
        table.add_column(column)
    import datetime as dt

    for decision in state["decisions"][-10:]:
        when = dt.datetime.fromtimestamp(decision["at"], tz=dt.timezone.utc).strftime("%H:%M:%S")
        figures = decision.get("comparison") or decision.get("heldout_after") or {}
        shown = ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if isinstance(v, float))
        table.add_row(when, decision["action"], decision["target"], shown)
    if state.get("canary_ref"):
        table.caption = f"canary {state['canary_ref']} against {state['production_ref']}"
    if status.get("last_error"):
        table.caption = f"last error: {status['last_error']}"
    return table
