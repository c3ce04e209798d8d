"""`kiln serve`, `kiln deploy`, `kiln promote`, `kiln rollback`: models over HTTP."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from cluster.cli.common import (
    AddressOpt,
    HomeOpt,
    HostOpt,
    KeyOpt,
    PortOpt,
    StorageOpt,
    app,
    connected,
    console,
    first_pydantic_error,
    load_settings,
    require_cluster,
)
from training.errors import KilnError


@app.command()
def serve(
    models: Annotated[
        list[str] | None, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS, one or more.")
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="Dynamic batching: requests per batch.")] = 64,
    batch_wait_timeout_s: Annotated[
        float, typer.Option(help="Dynamic batching: wait for a batch.")
    ] = 0.0,
    num_replicas: Annotated[int, typer.Option(help="Replicas without autoscaling.")] = 1,
    min_replicas: Annotated[
        int | None, typer.Option(help="Autoscaling floor (0 scales to zero).")
    ] = None,
    max_replicas: Annotated[int | None, typer.Option(help="Autoscaling ceiling.")] = None,
    target_ongoing_requests: Annotated[
        float, typer.Option(help="Autoscaling target per replica.")
    ] = 8.0,
    num_cpus: Annotated[float, typer.Option(help="CPUs per replica.")] = 1.0,
    num_gpus: Annotated[
        float | None, typer.Option(help="GPU share per replica (default 0.25 with GPUs).")
    ] = None,
    rate_limit: Annotated[
        float, typer.Option(help="Requests/s per key and replica; 0: no limit.")
    ] = 0.0,
    rate_burst: Annotated[float, typer.Option(help="Token bucket size of the rate limit.")] = 20.0,
    auth: Annotated[
        bool, typer.Option(help="Require an API key (Authorization: Bearer) on every call.")
    ] = True,
    access_log: Annotated[
        bool, typer.Option(help="Log every request in the replica logs (about 0.1 ms each).")
    ] = False,
    emit_config: Annotated[
        str | None,
        typer.Option(help="Write a Serve config YAML (serve deploy / KubeRay) and exit."),
    ] = None,
    host: HostOpt = None,
    port: PortOpt = None,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Serve registered models over HTTP (blocks until Ctrl-C on the embedded Ray)."""
    from serving.schemas import AUTH_OFF_WARNING

    if not models:
        raise KilnError("Give one or more models to serve, e.g. kiln serve digits-mlp@production.")
    serve_args = validated_serve_args(
        models=models,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s,
        num_replicas=num_replicas,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        target_ongoing_requests=target_ongoing_requests,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        rate_limit_per_s=rate_limit,
        rate_limit_burst=rate_burst,
        auth=auth,
        access_log=access_log,
    )
    settings = load_settings(address=address, home=home, storage=storage, host=host, port=port)
    if emit_config:
        from cluster.serving_control import write_serve_config

        write_serve_config(emit_config, serve_args, settings)
        console.print(
            f"wrote {emit_config}: serve deploy {emit_config}, or a RayService's serveConfigV2"
        )
        return
    if settings.embedded:
        check_refs(settings, models)  # from the SQLite catalog, before Ray or Serve starts
    with connected(settings):
        from cluster.serving_control import deploy_models

        serve_args.pop("models")
        url = deploy_models(settings, models, key=key, **serve_args)
        console.print(
            f"serving {', '.join(models)} at {url}  (POST {url}/v1/models/<name>:predict)"
        )
        if auth:
            names = ", ".join(sorted({m.partition("@")[0] for m in models}))
            console.print(
                f"callers need a key with predict:<name> for {names}: "
                "kiln keys create --scope predict:<name>"
            )
        else:
            console.print(f"[yellow]{AUTH_OFF_WARNING}[/]")
        if not settings.embedded:
            return
        console.print("Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            console.print("stopping")


def check_refs(settings: Any, refs: list[str]) -> None:
    """Every reference resolves in this KILN_HOME's catalog (read directly: the embedded Ray
    is not started for a model that does not exist). On a cluster, `deploy_models` asks the
    Registry actor the same before it deploys."""
    from cluster.client import Kiln

    with Kiln(settings=settings, use_ray=False) as kiln:
        for ref in refs:
            kiln.resolve(ref)


def validated_serve_args(**values: Any) -> dict[str, Any]:
    """The serve arguments, checked before Ray starts (one line per mistake)."""
    from serving.schemas import ServeArgs

    try:
        parsed = ServeArgs(**values)
        parsed.autoscaling()
    except ValueError as exc:
        raise KilnError(f"invalid serve option: {first_pydantic_error(exc)}") from exc
    return parsed.model_dump()


@app.command()
def deploy(
    name: Annotated[str, typer.Argument(help="A served model's name.")],
    version: Annotated[int, typer.Option(help="The version to send a share of traffic to.")],
    canary_weight: Annotated[
        int, typer.Option(help="Percent of the bare name's traffic it takes, 0-100.")
    ] = 10,
    address: AddressOpt = None,
    key: KeyOpt = None,
) -> None:
    """Canary: send --canary-weight% of NAME's traffic to NAME@--version, live."""
    from cluster.serving_control import check_canary_weight, deploy_canary

    check_canary_weight(canary_weight)
    settings = require_cluster(load_settings(address=address), "kiln deploy")
    with connected(settings):
        deploy_canary(settings, name, version, canary_weight, key)
    console.print(f"{name}@{version} takes {canary_weight}% of {name}'s traffic (alias canary)")


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="A served model's name.")],
    address: AddressOpt = None,
    key: KeyOpt = None,
) -> None:
    """The canary becomes production and takes all traffic (no failed request)."""
    switch_traffic("promote", name, address, key)


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="A served model's name.")],
    address: AddressOpt = None,
    key: KeyOpt = None,
) -> None:
    """Drop a live canary; without one, serve the previous production version again."""
    switch_traffic("rollback", name, address, key)


def switch_traffic(action: str, name: str, address: str | None, key: str | None) -> None:
    from cluster import serving_control

    settings = require_cluster(load_settings(address=address), f"kiln {action}")
    with connected(settings):
        args = getattr(serving_control, action)(settings, name, key)
    console.print(f"{name} now serves {[m for m in args['models'] if m.startswith(name + '@')]}")
