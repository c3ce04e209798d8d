"""`kiln data load|ls|drop`: datasets resident in ShardStore actors."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from cluster.cli.common import (
    AddressOpt,
    CategoricalOpt,
    FeaturesOpt,
    JsonOpt,
    LabelOpt,
    MissingOpt,
    connected,
    console,
    data_app,
    key_values,
    load_settings,
    output,
    print_column_notes,
    require_cluster,
)
from training.errors import KilnError


@data_app.command("load")
def data_load(
    uri: Annotated[
        str, typer.Argument(help="Dataset URI: file/folder, sklearn:NAME, synthetic:...")
    ],
    name: Annotated[str, typer.Option(help="Name to train from later: kiln train --data NAME.")],
    shards: Annotated[int, typer.Option(help="ShardStore actors (spread over the nodes).")] = 2,
    label: LabelOpt = None,
    features: FeaturesOpt = None,
    categorical: CategoricalOpt = None,
    missing: MissingOpt = "impute",
    test_fraction: Annotated[float, typer.Option(help="Held-out test share.")] = 0.2,
    val_fraction: Annotated[float, typer.Option(help="Validation share of the rest.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
) -> None:
    """Load a dataset into named, detached ShardStore actors on a cluster."""
    from actors.catalog import NAME_PATTERN
    from actors.shards import load_dataset
    from actors.sources import check_source
    from cluster.requests import source_from_options

    if not NAME_PATTERN.match(name):
        raise KilnError(
            f'Got "{name}" for --name. Use lowercase letters, digits and "-" (at most 64).'
        )
    if shards < 1:
        raise KilnError(f'Got "{shards}" for --shards. --shards must be at least 1.')
    source = source_from_options(
        uri, label, features, None, test_fraction, val_fraction, seed, categorical, missing
    )
    check_source(source)
    settings = require_cluster(load_settings(address=address), "kiln data load")
    with connected(settings):
        dataset = load_dataset(source, shards, name=name, detached=True)
        result = {
            "name": name,
            "uri": uri,
            "shards": shards,
            "rows": {s.split: s.num_rows for s in dataset.splits},
            **dataset.train.stats.column_summary(),
        }
    if not as_json:
        print_column_notes(result)
    output(result, as_json, key_values(f"kiln data load: {name}"))


@data_app.command("ls")
def data_ls(as_json: JsonOpt = False, address: AddressOpt = None) -> None:
    """Datasets resident on the cluster."""
    from actors.shards import list_datasets

    settings = require_cluster(load_settings(address=address), "kiln data ls")
    with connected(settings):
        datasets = list_datasets()
    output(datasets, as_json, datasets_table)


def datasets_table(datasets: list[dict[str, Any]]) -> Table:
    table = Table("name", "uri", "shards", "rows", "MiB")
    for d in datasets:
        rows = ", ".join(f"{k} {v}" for k, v in d["rows"].items())
        table.add_row(d["name"], str(d["uri"]), str(d["shards"]), rows, f"{d['bytes'] / 2**20:.1f}")
    return table


@data_app.command("drop")
def data_drop(
    name: Annotated[str, typer.Argument(help="Dataset name.")], address: AddressOpt = None
) -> None:
    """Release a dataset's ShardStore actors."""
    from actors.shards import drop_dataset

    settings = require_cluster(load_settings(address=address), "kiln data drop")
    with connected(settings):
        dropped = drop_dataset(name)
    if dropped == 0:
        raise KilnError(f'Got "{name}": no dataset of that name is loaded. See `kiln data ls`.')
    console.print(f"dropped {name} ({dropped} shard actors)")
