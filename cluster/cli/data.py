"""`kiln data load|ls|show|drop`: datasets resident in ShardStore (tables) and TextShardStore
(`text:` corpora for language models) actors."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from kiln.cli.common import (
    AddressOpt,
    CategoricalOpt,
    FeaturesOpt,
    JsonOpt,
    LabelOpt,
    MissingOpt,
    connected,
    data_app,
    key_values,
    load_settings,
    output,
    print_column_notes,
    require_cluster,
)
from kiln.training.errors import KilnError


@data_app.command("load")
def data_load(
    uri: Annotated[
        str,
        typer.Argument(help="Dataset URI: file/folder, sklearn:NAME, synthetic:..., text:PATH"),
    ],
    name: Annotated[str, typer.Option(help="Name to train from later: kiln train --data NAME.")],
    shards: Annotated[int, typer.Option(help="ShardStore actors (spread over the nodes).")] = 2,
    label: LabelOpt = None,
    features: FeaturesOpt = None,
    categorical: CategoricalOpt = None,
    missing: MissingOpt = "impute",
    test_fraction: Annotated[float, typer.Option(help="Held-out test share.")] = 0.2,
    val_fraction: Annotated[
        float | None,
        typer.Option(
            help="Validation share: of the non-test rows (default 0.1), of a text: corpus's "
            "documents (default 0.05)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    text_field: Annotated[
        str | None, typer.Option(help="text: JSONL key or table column of the text [text].")
    ] = None,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
) -> None:
    """Load a dataset into named, detached ShardStore actors on a cluster."""
    from kiln.actors.catalog import NAME_PATTERN
    from kiln.actors.shards import load_dataset
    from kiln.actors.sources import check_source
    from kiln.requests import source_from_options

    if not NAME_PATTERN.match(name):
        raise KilnError(
            f'Got "{name}" for --name. Use lowercase letters, digits and "-" (at most 64).'
        )
    if shards < 1:
        raise KilnError(f'Got "{shards}" for --shards. --shards must be at least 1.')
    if uri.startswith("text:"):
        load_text(uri, name, shards, text_field, val_fraction, seed, as_json, address)
        return
    if text_field is not None:
        raise KilnError(f'Got "{uri}" with --text-field, which is for text: sources only.')
    val_fraction = 0.1 if val_fraction is None else val_fraction
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


def load_text(
    uri: str,
    name: str,
    shards: int,
    text_field: str | None,
    val_fraction: float | None,
    seed: int,
    as_json: bool,
    address: str | None,
) -> None:
    """`kiln data load text:...`: a corpus into named, detached TextShardStore actors."""
    from kiln.actors.text import TextSourceSpec, list_text_files, load_text_dataset

    spec = TextSourceSpec(
        uri=uri,
        text_field=text_field,
        val_fraction=0.05 if val_fraction is None else val_fraction,
        seed=seed,
    )
    if "://" not in spec.location:  # a local typo fails before Ray starts
        list_text_files(uri)
    settings = require_cluster(load_settings(address=address), "kiln data load")
    with connected(settings):
        dataset = load_text_dataset(spec, shards, name=name, detached=True)
        summary = dataset.summary()
    splits = ("train", "val")
    result = {
        "name": name,
        "uri": uri,
        "shards": len(dataset.handles),
        "documents": {split: summary[split]["documents"] for split in splits},
        "bytes": {split: summary[split]["bytes"] for split in splits},
        "replaced_chars": sum(summary[split]["replaced_chars"] for split in splits),
        **{k: summary[k] for k in ("files", "binary_files", "empty_documents", "skipped_lines")},
    }
    output(result, as_json, key_values(f"kiln data load: {name}"))


@data_app.command("ls")
def data_ls(as_json: JsonOpt = False, address: AddressOpt = None) -> None:
    """Datasets resident on the cluster."""
    from kiln.actors.shards import list_datasets

    settings = require_cluster(load_settings(address=address), "kiln data ls")
    with connected(settings):
        datasets = list_datasets()
    output(datasets, as_json, datasets_table)


def datasets_table(datasets: list[dict[str, Any]]) -> Table:
    table = Table("name", "uri", "shards", "rows", "MiB")
    for d in datasets:
        if d.get("kind") == "text":
            rows = per_split(d["documents"], "documents")
            rows += f"; tokens {per_split(d['tokens'], '')}" if d["tokens"] else ""
        else:
            rows = ", ".join(f"{k} {v}" for k, v in d["rows"].items())
        table.add_row(d["name"], str(d["uri"]), str(d["shards"]), rows, f"{d['bytes'] / 2**20:.1f}")
    return table


def per_split(counts: dict[str, int] | None, unit: str) -> str:
    """`train 120, val 6 documents`; `-` for None."""
    if counts is None:
        return "-"
    return ", ".join(f"{k} {v}" for k, v in counts.items()) + (f" {unit}" if unit else "")


@data_app.command("show")
def data_show(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    as_json: JsonOpt = False,
    address: AddressOpt = None,
) -> None:
    """A dataset's shards: rows (text: documents and tokens) and bytes of each."""
    from kiln.actors.shards import describe_dataset

    settings = require_cluster(load_settings(address=address), "kiln data show")
    with connected(settings):
        described = describe_dataset(name)
    if not described:
        raise KilnError(f'Got "{name}": no dataset of that name is loaded. See `kiln data ls`.')
    shards = [d for split in described.values() for d in split]
    output({"name": name, "shards": shards}, as_json, shards_table)


def shards_table(shown: dict[str, Any]) -> Table:
    """One row per shard actor: a table's rows, or a text store's documents and tokens."""
    table = Table("split", "shard", "rows / documents", "tokens", "MiB", title=shown["name"])
    for d in shown["shards"]:
        if isinstance(d.get("documents"), dict):
            rows, tokens = per_split(d["documents"], ""), per_split(d["tokens"], "")
            size = sum(d["bytes"].values())
        else:
            rows, tokens, size = str(d["rows"]), "-", d["bytes"]
        table.add_row(d["split"], str(d["index"]), rows, tokens, f"{size / 2**20:.2f}")
    return table


@data_app.command("drop")
def data_drop(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    as_json: JsonOpt = False,
    address: AddressOpt = None,
) -> None:
    """Release a dataset's ShardStore actors."""
    from kiln.actors.shards import drop_dataset

    settings = require_cluster(load_settings(address=address), "kiln data drop")
    with connected(settings):
        dropped = drop_dataset(name)
    if dropped == 0:
        raise KilnError(f'Got "{name}": no dataset of that name is loaded. See `kiln data ls`.')
    output(
        {"dataset": name, "dropped_actors": dropped},
        as_json,
        lambda r: f"dropped {r['dataset']} ({r['dropped_actors']} shard actors)",
    )
