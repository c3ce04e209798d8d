"""`kiln models ...`, `kiln keys ...` and `kiln audit`: the registry and its access control."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.json import JSON
from rich.table import Table

from kiln.actors.keys import UNUSED_WARNING_DAYS
from kiln.cli.common import (
    AddressOpt,
    HomeOpt,
    JsonOpt,
    KeyOpt,
    StorageOpt,
    app,
    connected,
    console,
    keys_app,
    load_settings,
    models_app,
    open_client,
    output,
    short_metrics,
    short_time,
)
from kiln.training.errors import KilnError


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
    from kiln.client import iso_time

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


@models_app.command("log-policy")
def models_log_policy(
    name: Annotated[str, typer.Argument(help="Model name.")],
    mask: Annotated[
        list[str] | None,
        typer.Option(help="Inputs the prediction log keeps only as a keyed hash (F[,F])."),
    ] = None,
    drop: Annotated[
        list[str] | None,
        typer.Option(help="Inputs the prediction log does not keep (F[,F])."),
    ] = None,
    mask_text: Annotated[
        bool | None,
        typer.Option(
            "--mask-text/--no-mask-text",
            help="Language models: mask e-mail addresses, phone and card numbers.",
        ),
    ] = None,
    clear: Annotated[bool, typer.Option(help="Remove the policy.")] = False,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Show, set (replacing it whole) or --clear what NAME's prediction log masks and drops.

    kiln serve joins it with its own --log-mask/--log-drop/--log-mask-text (the union; a field
    masked by one and dropped by the other is dropped). Replicas read it when they start and
    on every reconfigure (kiln serve, kiln deploy).
    """
    from kiln.serving.logmask import parse_fields

    setting = bool(mask or drop) or mask_text is not None
    if clear and setting:
        raise KilnError("--clear removes the policy; give it alone, without --mask/--drop")
    with open_client(address, home, storage, key) as client:
        if not setting and not clear:
            result = {"name": name, "log_policy": client.log_policy(name)}
        else:
            result = client.set_log_policy(
                name, parse_fields(mask), parse_fields(drop), bool(mask_text)
            )
    output(result, as_json, log_policy_line)


def log_policy_line(result: dict[str, Any]) -> str:
    policy = result["log_policy"]
    if not policy:
        return f"{result['name']}: no log policy (serve's --log-mask/--log-drop only)"
    parts = [
        f"mask {', '.join(policy['mask'])}" if policy["mask"] else "",
        f"drop {', '.join(policy['drop'])}" if policy["drop"] else "",
        "mask text" if policy["mask_text"] else "",
    ]
    return f"{result['name']}: {'; '.join(p for p in parts if p)}"


@models_app.command("compare")
def models_compare(
    name: Annotated[str, typer.Argument(help="Model name: compare its active versions.")],
    plot: Annotated[
        str | None,
        typer.Option(help="Also write a PNG of accuracy against batch-1 latency to this file."),
    ] = None,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Versions side by side: accuracy, parameters, bytes, latency, lineage, Pareto front."""
    if plot is not None and not plot.lower().endswith(".png"):
        raise KilnError(f'Got "{plot}" for --plot. Give a file name ending in .png.')
    with open_client(address, home, storage) as client:
        rows = client.compare(name)
    if plot:
        from kiln.compare import write_plot

        try:
            write_plot(rows, plot, name)
        except OSError as exc:
            raise KilnError(f'Got "{plot}" for --plot, which cannot be written: {exc}') from exc
        console.print(f"wrote {plot}")
    output(rows, as_json, compare_table)
    if not as_json:
        for row in rows:
            if not row["profiles"]:
                console.print(
                    f"{row['ref']} is not profiled: kiln models profile {row['ref']}",
                    markup=False,
                )


def language_models(rows: list[dict[str, Any]]) -> bool:
    """Whether the compared versions are language models (perplexity, generation tokens/s)."""
    return bool(rows) and rows[0]["metric"] == "perplexity"


def compare_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        "version",
        "aliases",
        rows[0]["metric"] if rows else "accuracy",
        *(["tokens/s"] if language_models(rows) else []),
        "params",
        "bytes",
        "backend",
        "b1 p50/p99 ms",
        "b64 p50/p99 ms",
        "parent",
        "compression",
        "pareto",
        "under attack",
        caption="latency: one replica's CPUs, as measured at registration (kiln models profile)",
    )
    for row in rows:
        profiles = row["profiles"]
        table.add_row(
            f"@{row['version']}",
            ", ".join(row["aliases"]),
            "" if row["score"] is None else f"{row['score']:.4f}",
            *([f"{row['tokens_per_s'] or 0:.1f}"] if language_models(rows) else []),
            "" if row["parameters"] is None else f"{row['parameters']:,}",
            "" if row["artifact_bytes"] is None else f"{row['artifact_bytes']:,}",
            "\n".join(profiles) or "not profiled",
            "\n".join(f"{p['b1_p50_ms']:.3f}/{p['b1_p99_ms']:.3f}" for p in profiles.values()),
            "\n".join(f"{p['b64_p50_ms']:.3f}/{p['b64_p99_ms']:.3f}" for p in profiles.values()),
            row["parent"] or "",
            row["compression"] or "",
            {True: "yes", False: "", None: "-"}[row["pareto"]],
            attack_cell(row.get("robustness") or []),
        )
    return table


def attack_cell(reports: list[dict[str, Any]]) -> str:
    """`kiln evaluate --attack` results: one line per attack and epsilon."""
    return "\n".join(
        f"{r['attack']} ε={r['epsilon']:g}: {r['attacked_accuracy']:.4f}" for r in reports
    )


@models_app.command("profile")
def models_profile(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS")],
    backend: Annotated[
        str,
        typer.Option(
            help="Serving backend to measure: torch, onnxruntime (needs model.onnx: kiln "
            "export), or auto (onnxruntime where the version has model.onnx)."
        ),
    ] = "torch",
    num_cpus: Annotated[
        float, typer.Option(help="CPUs (and threads) of the replica measured.")
    ] = 1.0,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Measure a version's latency profile in a Ray task and record it (replacing the last)."""
    from kiln.client import Kiln

    if num_cpus <= 0:
        raise KilnError(f'Got "{num_cpus}" for --num-cpus. Use a positive number.')
    settings = load_settings(address=address, home=home, storage=storage)
    if settings.embedded:  # a missing version is one line from the catalog, before Ray starts
        from kiln.training.export import serving_backend

        with Kiln(settings=settings, use_ray=False) as local:
            record = local.resolve(ref)
        serving_backend(record.spec, record.artifacts, backend, record.ref)
    with connected(settings):
        with Kiln(settings=settings, key=key, use_ray=True) as client:
            found = client.profile(ref, backend=backend, num_cpus=num_cpus)
    output(found, as_json, profile_lines)


def profile_lines(found: dict[str, Any]) -> str:
    p = found["profile"]
    return (
        f"{found['ref']} ({found['backend']}, {p['threads']} thread(s), {p['cpu_model']}): "
        f"batch 1 p50 {p['b1_p50_ms']:.3f} ms, p99 {p['b1_p99_ms']:.3f} ms; batch 64 p50 "
        f"{p['b64_p50_ms']:.3f} ms, p99 {p['b64_p99_ms']:.3f} ms; "
        f"{p['rows_per_s_b64']:,.0f} rows/s"
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
    """Every API key with its scopes, status and last use (never a secret). Last use is as
    the serving replicas report it, in batches (up to a minute late); a live key unused for
    90 days is flagged: revoke it if nobody needs it."""
    with open_client(address, home, storage, key) as client:
        rows = client.keys()
    stale = [k["id"] for k in rows if k.get("unused_warning")]
    if stale:
        console.print(
            f"[yellow]unused for {UNUSED_WARNING_DAYS}+ days: {', '.join(stale)} "
            "(kiln keys revoke ID if nobody needs them)[/]"
        )
    output(rows, as_json, keys_table)


def keys_table(rows: list[dict[str, Any]]) -> Table:
    table = Table()
    table.add_column("id", no_wrap=True)  # whole, so it can be pasted into `keys revoke`
    columns = ("status", "scopes", "created", "by", "expires (UTC)", "revoked", "last used")
    for column in columns:
        table.add_column(column)
    for k in rows:
        last_used = short_time(k.get("last_used")) or "never"
        table.add_row(
            k["id"],
            k["status"],
            ", ".join(k["scopes"]),
            short_time(k["created"]),
            k["created_by"],
            short_time(k["expires"]) or "never",
            short_time(k["revoked"]),
            f"[yellow]{last_used} (90d+)[/]" if k.get("unused_warning") else last_used,
        )
    return table


@keys_app.command("rotate")
def keys_rotate(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id (kiln keys list).")],
    grace: Annotated[
        str,
        typer.Option(help="How long the old secret stays valid: 1h, 30m, 7d, or 0 (ends now)."),
    ] = "1h",
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """A new secret with the same scopes and expiry; the old one works for --grace more."""
    with open_client(address, home, storage, key) as client:
        try:
            made = client.rotate_key(key_id, grace=grace)
        except LookupError as exc:
            raise KilnError(f'Got "{key_id}" for ID: {exc}. See `kiln keys list`.') from exc
    output(made, as_json, rotated_key_lines)


def rotated_key_lines(made: dict[str, Any]) -> str:
    old = f"old key {made['replaces']} valid until {made['old_expires']}"
    return new_key_lines(made) + "\n" + old


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
