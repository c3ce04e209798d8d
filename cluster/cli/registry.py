"""`kiln models ...`, `kiln keys ...` and `kiln audit`: the registry and its access control."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.json import JSON
from rich.table import Table

from cluster.cli.common import (
    AddressOpt,
    HomeOpt,
    JsonOpt,
    KeyOpt,
    StorageOpt,
    app,
    console,
    keys_app,
    models_app,
    open_client,
    output,
    short_metrics,
    short_time,
)
from training.errors import KilnError


@models_app.command("list")
def models_list(
    name: Annotated[
        str | None, typer.Argument(help="A model name: list its versions instead.")
    ] = None,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Registered models with their latest version and aliases (or one model's versions)."""
    with open_client(address, home, storage) as client:
        rows = client.models() if name is None else client.versions(name)
    output(rows, as_json, models_table if name is None else versions_table)


def models_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("name", "versions", "archived", "latest", "aliases")
    for m in rows:
        aliases = ", ".join(f"{a}->{v}" for a, v in m["aliases"].items())
        table.add_row(
            m["name"],
            str(m["num_versions"]),
            str(m["num_archived"]),
            str(m["latest_version"]),
            aliases,
        )
    return table


def versions_table(rows: list[dict[str, Any]]) -> Table:
    from cluster.client import iso_time

    table = Table("version", "status", "aliases", "created", "creator", "metrics")
    for v in rows:
        table.add_row(
            str(v["version"]),
            v["status"],
            ", ".join(v["aliases"]),
            short_time(iso_time(v["created_at"])),
            f"{v['creator']} ({v['creator_key']})",
            short_metrics(v["metrics"]),
        )
    return table


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS")],
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """One model version: status, aliases, metrics, lineage and artifact checksums."""
    with open_client(address, home, storage) as client:
        try:
            result = client.show(ref)
        except LookupError as exc:
            raise KilnError(f'Got "{ref}": {exc}. See `kiln models list`.') from exc
    output(
        result,
        as_json,
        lambda shown: JSON.from_data({k: v for k, v in shown.items() if k != "spec"}, default=str),
    )


@models_app.command("alias")
def models_alias(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version number the alias will point at.")],
    alias: Annotated[str, typer.Argument(help="production, staging, canary or any name.")],
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Point NAME@ALIAS at VERSION, atomically (creating or moving the alias)."""
    with open_client(address, home, storage, key) as client:
        result = client.alias(name, version, alias)
    was = f" (was {result['previous']})" if result["previous"] is not None else ""
    output(result, as_json, lambda _: f"{name}@{alias} -> {version}{was}")


@models_app.command("unalias")
def models_unalias(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="The alias to remove.")],
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Remove an alias (the version stays)."""
    with open_client(address, home, storage, key) as client:
        result = client.unalias(name, alias)
    output(result, as_json, lambda done: f"removed {name}@{alias} (pointed at {done['version']})")


@models_app.command("delete")
def models_delete(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION, by number.")],
    force: Annotated[bool, typer.Option(help="Also drop the aliases pointing at it.")] = False,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Delete a version and its artifacts; its number is never reused."""
    with open_client(address, home, storage, key) as client:
        result = client.delete(ref, force=force)
    dropped = f" (aliases removed: {', '.join(result['aliases_removed'])})"
    output(
        result,
        as_json,
        lambda done: f"deleted {done['ref']}{dropped if done['aliases_removed'] else ''}",
    )


@models_app.command("archive")
def models_archive(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION, by number.")],
    force: Annotated[bool, typer.Option(help="Also drop the aliases pointing at it.")] = False,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Archive a version: a bare NAME no longer resolves to it; NAME@VERSION still does."""
    with open_client(address, home, storage, key) as client:
        result = client.archive(ref, force=force)
    output(result, as_json, lambda done: f"archived {done['ref']}")


@models_app.command("unarchive")
def models_unarchive(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION, by number.")],
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Make an archived version active again."""
    with open_client(address, home, storage, key) as client:
        result = client.unarchive(ref)
    output(result, as_json, lambda done: f"unarchived {done['ref']}")


@keys_app.command("create")
def keys_create(
    scope: Annotated[
        list[str],
        typer.Option(help="predict:<model|*>, feedback:<model|*> or admin; repeat for more."),
    ],
    expires: Annotated[
        str | None, typer.Option(help="Lifetime: 30d, 12h or 90m (default: never).")
    ] = None,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Create an API key. Its secret is printed once; only a salted hash is stored."""
    with open_client(address, home, storage, key) as client:
        made = client.create_key(scope, expires=expires)
    output(made, as_json, new_key_lines)


def new_key_lines(made: dict[str, Any]) -> str:
    """Plain lines, never a table: a wrapped secret could not be copied whole."""
    console.print("[yellow]Store this secret now: Kiln keeps only a hash and cannot show it again.")
    return "\n".join(
        (
            f"id       {made['id']}",
            f"scopes   {', '.join(made['scopes'])}",
            f"expires  {made['expires'] or 'never'}",
            f"secret   {made['secret']}",
        )
    )


@keys_app.command("list")
def keys_list(
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Every API key with its scopes and status (never a secret)."""
    with open_client(address, home, storage, key) as client:
        rows = client.keys()
    output(rows, as_json, keys_table)


def keys_table(rows: list[dict[str, Any]]) -> Table:
    table = Table()
    table.add_column("id", no_wrap=True)  # whole, so it can be pasted into `keys revoke`
    for column in ("status", "scopes", "created", "by", "expires (UTC)", "revoked"):
        table.add_column(column)
    for k in rows:
        table.add_row(
            k["id"],
            k["status"],
            ", ".join(k["scopes"]),
            short_time(k["created"]),
            k["created_by"],
            short_time(k["expires"]) or "never",
            short_time(k["revoked"]),
        )
    return table


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id (kiln keys list).")],
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Revoke a key; serving replicas refuse it within their cache TTL (5 s)."""
    with open_client(address, home, storage, key) as client:
        try:
            row = client.revoke_key(key_id)
        except LookupError as exc:
            raise KilnError(f'Got "{key_id}" for ID: {exc}. See `kiln keys list`.') from exc
    output(row, as_json, lambda done: f"revoked {done['id']} at {done['revoked']}")


@app.command("audit")
def audit_log(
    limit: Annotated[int, typer.Option(help="Show the newest N entries.")] = 100,
    action: Annotated[
        str | None,
        typer.Option(help="Only this action: register, alias, delete, archive, key.create ..."),
    ] = None,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Admin actions: who (key id or "local"), what, on which target, when."""
    with open_client(address, home, storage, key) as client:
        entries = client.audit(limit=limit, action=action)
    output(entries, as_json, audit_table)


def audit_table(entries: list[dict[str, Any]]) -> Table:
    table = Table("at (UTC)", "key", "action", "target", "detail")
    for e in entries:
        detail = json.dumps(e["detail"]) if e["detail"] else ""
        table.add_row(short_time(e["at"]), e["key_id"], e["action"], e["target"], detail)
    return table
