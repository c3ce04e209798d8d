"""`kiln federate`: federated training over client actors that keep their data (FedAvg,
FedProx, FedAdam; optional secure aggregation and differential privacy), registered like any
other model. See docs/federated.md."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kiln.cli.common import (
    AddressOpt,
    HomeOpt,
    JsonOpt,
    LabelOpt,
    StorageOpt,
    app,
    connected,
    console,
    load_settings,
    output,
    preload,
)
from kiln.requests import parse_hidden


@app.command()
def federate(
    data: Annotated[
        str | None,
        typer.Option(
            help="Source URI each client reads its partition from (sklearn:digits, "
            "a parquet/csv path, synthetic:...)."
        ),
    ] = None,
    clients: Annotated[int, typer.Option(help="Client actors, each holding one partition.")] = 10,
    partition: Annotated[
        str, typer.Option(help="iid, dirichlet:ALPHA (label skew) or shards:S (S label shards).")
    ] = "iid",
    min_partition_size: Annotated[
        int, typer.Option(help="Fewest rows a client may hold (dirichlet redraws until so).")
    ] = 1,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 10,
    fraction: Annotated[float, typer.Option(help="Share of clients sampled each round.")] = 1.0,
    min_clients: Annotated[
        int, typer.Option(help="Fewest clients a round samples, and needs answers from.")
    ] = 1,
    local_epochs: Annotated[int, typer.Option(help="Epochs each client trains per round.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Rows per local step.")] = 32,
    lr: Annotated[float, typer.Option(help="Local learning rate.")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="Local optimiser: sgd, adam or adamw.")] = "adam",
    model: Annotated[
        str, typer.Option(help="logistic, mlp or cnn (linear/ridge: regression).")
    ] = "mlp",
    hidden: Annotated[str, typer.Option(help="MLP hidden widths, e.g. 128,64.")] = "128,64",
    strategy: Annotated[
        str, typer.Option(help="fedavg, fedprox:MU (e.g. fedprox:0.01) or fedadam[:ETA].")
    ] = "fedavg",
    secure_agg: Annotated[
        bool, typer.Option(help="Pairwise-masked secure aggregation (X25519 + ChaCha20 masks).")
    ] = False,
    dp_clip: Annotated[
        float | None, typer.Option(help="DP: clip each client's update to this L2 norm.")
    ] = None,
    dp_noise: Annotated[
        float | None, typer.Option(help="DP: Gaussian noise std as a multiple of --dp-clip.")
    ] = None,
    dp_delta: Annotated[float, typer.Option(help="DP: the δ of the (ε, δ) reported.")] = 1e-5,
    round_timeout_s: Annotated[
        float, typer.Option(help="Seconds a round waits for its clients; late ones are dropped.")
    ] = 300.0,
    test_fraction: Annotated[
        float, typer.Option(help="Held-out test share: the server's evaluation set.")
    ] = 0.2,
    label: LabelOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the split, partition, sampling, init.")] = 0,
    register: Annotated[
        str, typer.Option(help="Register the global model under this name.")
    ] = "federated",
    name: Annotated[str | None, typer.Option(hidden=True)] = None,
    resume: Annotated[
        str | None, typer.Option(help="Continue federated run RUN from its last checkpoint.")
    ] = None,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Train one model over client actors that never hand over a row, then register it."""
    from kiln.actors.sources import SourceSpec, check_source
    from kiln.cli.aliases import renamed
    from kiln.federation import FederateRequest, load_request
    from kiln.training.errors import KilnError

    started = time.perf_counter()
    settings = load_settings(address=address, home=home, storage=storage)
    if resume is not None:
        request = load_request(settings, resume)
    elif data is None:
        raise KilnError("Give --data URI (or --resume RUN). See `kiln federate --help`.")
    else:
        request = FederateRequest(
            data=data,
            source=SourceSpec(uri=data, label=label, test_fraction=test_fraction, seed=seed),
            clients=clients,
            partition=partition,
            min_partition_size=min_partition_size,
            rounds=rounds,
            fraction=fraction,
            min_clients=min_clients,
            local_epochs=local_epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            model=model,
            hidden=parse_hidden(hidden),
            strategy=strategy,
            secure_agg=secure_agg,
            dp_clip=dp_clip,
            dp_noise=dp_noise,
            dp_delta=dp_delta,
            round_timeout_s=round_timeout_s,
            seed=seed,
            name=renamed(register, name, "--register", "--name", default="federated"),
        )
        check_source(request.source)  # a typo in --data fails before Ray starts
    preload("kiln.federation")
    progress = RoundProgress(request.rounds, quiet=as_json)
    with progress.progress, connected(settings):
        from kiln.federation import federate_and_register
        from kiln.runtime import registry_for

        done = federate_and_register(settings, request, registry_for(settings), progress.round)
    output(
        {
            "model": done.record.name,
            "version": done.record.version,
            "run_name": done.run_name,
            "metrics": done.test_metrics,
            "rounds": [summary(h) for h in done.history],
            "client_rows": done.client_rows,
            "parameters": done.parameters,
            "privacy": done.privacy,
            "elapsed_s": time.perf_counter() - started,
        },
        as_json,
        render_result,
    )


class RoundProgress:
    """A rich progress bar over rounds: accuracy (or R²), clients answered, ε under DP."""

    def __init__(self, rounds: int, quiet: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]federate"),
            BarColumn(),
            TextColumn("round {task.completed}/{task.total}"),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            console=console,
            disable=quiet,
        )
        self.task = self.progress.add_task("federate", total=rounds, metrics="")

    def round(self, facts: dict[str, Any]) -> None:
        shown = f"clients {len(facts['answered'])}/{len(facts['sampled'])}"
        for key, label in (("test_accuracy", "acc"), ("test_r2", "r2"), ("epsilon", "ε")):
            if key in facts:
                shown += f"  {label} {facts[key]:.3f}"
        self.progress.update(self.task, completed=facts["round"] + 1, metrics=shown)


def summary(facts: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "round",
        "answered",
        "dropped",
        "attempts",
        "skipped",
        "test_accuracy",
        "test_r2",
        "train_loss",
        "epsilon",
        "round_s",
        "bytes_down",
        "bytes_up",
    )
    return {k: facts[k] for k in keep if k in facts}


def render_result(result: dict[str, Any]) -> Table:
    headline = "accuracy" if "accuracy" in result["metrics"] else "r2"
    table = Table(
        title=f"kiln federate: {result['model']}@{result['version']} ({result['run_name']})",
        title_justify="left",
    )
    for column in ("round", "clients", headline, "seconds"):
        table.add_column(column)
    for facts in result["rounds"]:
        value = facts.get(f"test_{headline}")
        table.add_row(
            str(facts["round"]),
            str(len(facts["answered"])),
            f"{value:.4f}" if isinstance(value, float) else "",
            f"{facts.get('round_s', 0.0):.2f}",
        )
    if result["privacy"]:
        privacy = result["privacy"]
        table.caption = f"(ε, δ) = ({privacy['epsilon']:.3g}, {privacy['delta']:g}), client-level"
    return table
