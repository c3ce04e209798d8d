"""`kiln serve`, `kiln deploy`, `kiln promote`, `kiln rollback`: models over HTTP."""

from __future__ import annotations

import json
import signal
import time
from typing import TYPE_CHECKING, Annotated, Any, get_args

import typer
from rich.console import Console
from rich.table import Table

from kiln.cli.common import (
    AddressOpt,
    HomeOpt,
    HostOpt,
    JsonOpt,
    KeyOpt,
    PortOpt,
    StorageOpt,
    TlsCaOpt,
    TlsCertOpt,
    TlsKeyOpt,
    TlsSelfSignedOpt,
    app,
    check_port,
    connected,
    console,
    first_pydantic_error,
    load_settings,
    output,
    require_cluster,
    tls_files,
)
from kiln.settings import Ingress
from kiln.training.errors import KilnError

INGRESSES = get_args(Ingress)

if TYPE_CHECKING:
    from kiln.serving.slo import SLO, Choice, Verdict
    from kiln.settings import Settings


@app.command()
def serve(
    models: Annotated[
        list[str] | None, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS, one or more.")
    ] = None,
    max_batch_size: Annotated[
        int | None,
        typer.Option(
            help="Dynamic batching: requests per batch (default: chosen per model from its "
            "latency profile)."
        ),
    ] = None,
    batch_wait_timeout_s: Annotated[
        float | None,
        typer.Option(
            help="Dynamic batching: wait for a batch (default: per model, 0 for a fast one)."
        ),
    ] = None,
    lm_max_batch: Annotated[
        int, typer.Option(help="Language models: sequences decoding together (continuous batch).")
    ] = 32,
    kv_cache_tokens: Annotated[
        int | None,
        typer.Option(help="Language models: KV-cache budget in tokens (default: full contexts)."),
    ] = None,
    max_waiting: Annotated[
        int, typer.Option(help="Language models: requests queued for KV memory; past it, 429.")
    ] = 64,
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
    backend: Annotated[
        str,
        typer.Option(
            help="torch, onnxruntime (the version's model.onnx: kiln export), or auto: "
            "onnxruntime where a version has model.onnx."
        ),
    ] = "auto",
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
    log_sample: Annotated[
        float,
        typer.Option(
            help="Share of requests in the prediction log (monitoring, feedback); 0: off."
        ),
    ] = 1.0,
    log_retention_days: Annotated[
        int, typer.Option(help="Days the prediction log and feedback are kept.")
    ] = 30,
    log_mask: Annotated[
        list[str] | None,
        typer.Option(
            help="Inputs the prediction log keeps only as a keyed hash (FIELD[,FIELD]; "
            "equal values stay equal)."
        ),
    ] = None,
    log_drop: Annotated[
        list[str] | None,
        typer.Option(help="Inputs the prediction log does not keep (FIELD[,FIELD])."),
    ] = None,
    log_mask_text: Annotated[
        bool,
        typer.Option(
            help="Language models: mask e-mail addresses, phone and card numbers in the log."
        ),
    ] = False,
    emit_config: Annotated[
        str | None,
        typer.Option(help="Write a Serve config YAML (serve deploy / KubeRay) and exit."),
    ] = None,
    slo_p99_ms: Annotated[
        float | None,
        typer.Option(help="SLO: pick the cheapest version of NAME whose predicted p99 fits (ms)."),
    ] = None,
    min_accuracy: Annotated[
        float | None,
        typer.Option(help="SLO: the least test accuracy (R² for a regressor) it may have."),
    ] = None,
    target_rps: Annotated[
        float | None,
        typer.Option(help="SLO: requests/s to carry (sets the replicas); default: light load."),
    ] = None,
    http_overhead_ms: Annotated[
        float | None,
        typer.Option(help="SLO: p99 ms Kiln's HTTP path adds (default: measured, see docs)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="SLO: print the candidates and the choice, deploy nothing.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON object: the --dry-run choice, the --emit-config path, or "
            "where the models are served once they are.",
        ),
    ] = False,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_self_signed: TlsSelfSignedOpt = False,
    host: HostOpt = None,
    port: PortOpt = None,
    grpc_port: Annotated[
        int | None,
        typer.Option(
            help="Open Inference Protocol V2 over gRPC on this port (KILN_GRPC_PORT; default "
            "9000); 0: no gRPC."
        ),
    ] = None,
    ingress: Annotated[
        str | None,
        typer.Option(
            help="Who answers --port: direct (every replica itself, the fastest), serve (Ray "
            "Serve's HAProxy ingress, which autoscaling needs), or auto (KILN_INGRESS; "
            "default): direct on the embedded Ray with a fixed replica count, else serve."
        ),
    ] = None,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Serve registered models over HTTP and gRPC (blocks until Ctrl-C on the embedded Ray)."""
    from kiln.serving.logmask import parse_fields
    from kiln.serving.schemas import AUTH_OFF_WARNING

    if not models:
        raise KilnError("Give one or more models to serve, e.g. kiln serve digits-mlp@production.")
    if ingress is not None and ingress not in INGRESSES:
        raise KilnError(f'Got "{ingress}" for --ingress. Use {", ".join(INGRESSES)}.')
    serve_args = validated_serve_args(
        models=models,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s,
        lm_max_batch=lm_max_batch,
        kv_cache_tokens=kv_cache_tokens,
        lm_max_waiting=max_waiting,
        num_replicas=num_replicas,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        target_ongoing_requests=target_ongoing_requests,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        backend=backend,
        rate_limit_per_s=rate_limit,
        rate_limit_burst=rate_burst,
        auth=auth,
        access_log=access_log,
        log_sample=log_sample,
        log_retention_days=log_retention_days,
        log_mask=parse_fields(log_mask),
        log_drop=parse_fields(log_drop),
        log_mask_text=log_mask_text,
    )
    settings = load_settings(
        address=address,
        home=home,
        storage=storage,
        host=host,
        port=port,
        grpc_port=grpc_port,
        ingress=ingress,
    )
    # Serve arguments set only by the environment (no option of their own): validated_serve_args
    # filled in every default, so deploy_models's own defaults from the settings never applied
    # here (KILN_FEEDBACK_SHARDS was ignored by `kiln serve`).
    serve_args.update(
        feedback_shards=settings.kiln_feedback_shards,
        feedback_index_ids=settings.kiln_feedback_index_ids,
        grpc_front=settings.kiln_grpc_front,
    )
    slo = slo_request(
        models,
        serve_args,
        slo_p99_ms=slo_p99_ms,
        min_accuracy=min_accuracy,
        target_rps=target_rps,
        http_overhead_ms=http_overhead_ms,
        dry_run=dry_run,
    )
    if slo is not None:
        chosen = choose_for_slo(settings, models[0], slo, key, dry_run, backend, as_json)
        if dry_run:
            return
        models = serve_args["models"] = [chosen.candidate.ref]
        serve_args["num_replicas"] = chosen.prediction.replicas
        backend = serve_args["backend"] = chosen.candidate.backend  # the one its profile timed
    if emit_config:
        from kiln.serving_control import write_serve_config

        write_serve_config(emit_config, serve_args, settings)
        output(
            {"config": emit_config},
            as_json,
            lambda r: (
                f"wrote {r['config']}: serve deploy {r['config']}, or a RayService's serveConfigV2"
            ),
        )
        return
    tls = tls_files(settings, tls_cert, tls_key, tls_ca, tls_self_signed)
    if serve_args["log_mask"] or serve_args["log_drop"] or log_mask_text:
        both = set(serve_args["log_mask"]) & set(serve_args["log_drop"])
        if both:
            raise KilnError(f"{', '.join(sorted(both))}: give a field to --log-mask or --log-drop")
        serve_args["log_mask_key"] = mask_key(settings)
    from kiln.serving_control import direct_ingress

    direct = direct_ingress(settings, serve_args, tls is not None)  # refusals before Ray starts
    if direct and settings.embedded and settings.kiln_grpc_port:
        check_native_front(settings.kiln_grpc_front)
    if settings.embedded:
        # The SQLite catalog, before Ray or Serve start.
        check_refs(settings, models, backend, serve_args["log_mask"], serve_args["log_drop"])
        # A busy port is one line now, not Serve's HAProxy failing after Ray has started.
        check_port(settings.kiln_http_host, settings.kiln_http_port)
        if settings.kiln_grpc_port == settings.kiln_http_port:
            raise KilnError(
                f'Got "{settings.kiln_grpc_port}" for --grpc-port, the HTTP port too. Give '
                "another port, or 0 for no gRPC."
            )
        if settings.kiln_grpc_port:
            check_port(settings.kiln_http_host, settings.kiln_grpc_port, "--grpc-port")
    with connected(settings):
        from kiln.runtime import registry_for
        from kiln.serving_control import deploy_models, public_host

        # Held for the command's life as well as detached (cluster/runtime.py::registry_for):
        # the replicas and FeedbackStores find the registry by name while this command serves.
        registry = registry_for(settings)
        if not settings.embedded:  # the Registry actor's catalog (embedded: check_refs did)
            from kiln.serving_control import resolve_all

            records = resolve_all(registry, models, backend)
            check_log_fields(records, serve_args["log_mask"], serve_args["log_drop"])
        serve_args.pop("models")
        url = deploy_models(settings, models, key=key, tls=tls, **serve_args)
        ingress = "direct" if direct else "serve"
        if as_json:
            print(json.dumps({"models": models, "url": url, "ingress": ingress}), flush=True)
        console.print(
            f"serving {', '.join(models)} at {url}  (POST {url}/v1/models/<name>:predict)"
        )
        console.print(
            "HTTP ingress: direct, every replica answers the port itself (--ingress serve: "
            "Serve's HAProxy)"
            if direct
            else "HTTP ingress: Ray Serve's HAProxy"
        )
        if settings.kiln_grpc_port:
            grpc_host = public_host(settings.kiln_http_host)
            console.print(
                f"gRPC (Open Inference Protocol V2{', TLS' if tls else ''}) at "
                f"{grpc_host}:{settings.kiln_grpc_port}"
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
        # SIGTERM (a service manager, `kill`, a container stop) stops it as Ctrl-C does: an
        # orderly Serve and Ray shutdown, not a zombie raylet (RAY_NOTES). Background jobs of
        # a non-interactive shell start with SIGINT ignored, which Python keeps: Ctrl-C (or
        # `kill -INT`) would then wait until the benchmark or test that sent it gives up and
        # kills the group (seen: 60 s, then SIGKILL). Both signals stop it, as uvicorn does.
        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            console.print("stopping")
        del registry


def mask_key(settings: Settings) -> str:
    """The deployment's log-masking secret: KILN_LOG_MASK_KEY, else $KILN_HOME/log-mask.key."""
    import os
    from pathlib import Path

    from kiln.serving.logmask import load_mask_key

    given = os.environ.get("KILN_LOG_MASK_KEY")
    if given:
        try:
            bytes.fromhex(given)
        except ValueError as exc:
            raise KilnError("KILN_LOG_MASK_KEY must be hex (e.g. openssl rand -hex 32)") from exc
        return given
    return load_mask_key(Path(settings.kiln_home).expanduser().resolve() / "log-mask.key")


def interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def slo_request(models: list[str], serve_args: dict[str, Any], **options: Any) -> SLO | None:
    """The SLO of `kiln serve NAME --slo-p99-ms X --min-accuracy Y ...`, checked; None without
    one. One bare NAME; the SLO sets the replicas, so autoscaling options do not combine."""
    from kiln.serving.slo import SLO

    given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v not in (None, False)]
    if not given:
        return None
    if options["slo_p99_ms"] is None or options["min_accuracy"] is None:
        raise KilnError(
            f"{', '.join(given)} {'works' if len(given) == 1 else 'work'} only with both "
            f"--slo-p99-ms and --min-accuracy, e.g. kiln serve {models[0].partition('@')[0]} "
            "--slo-p99-ms 20 --min-accuracy 0.95"
        )
    if len(models) != 1 or "@" in models[0]:
        name = models[0].partition("@")[0]
        raise KilnError(
            f'Got "{" ".join(models)}" with --slo-p99-ms. Give one model NAME without @ '
            f"(e.g. kiln serve {name} --slo-p99-ms ...): the SLO choice picks its version."
        )
    if serve_args["min_replicas"] is not None or serve_args["max_replicas"] is not None:
        raise KilnError(
            "--slo-p99-ms chooses a fixed replica count; leave --min-replicas and --max-replicas "
            "unset"
        )
    if serve_args["num_replicas"] != 1:
        raise KilnError("--slo-p99-ms chooses --num-replicas itself; leave --num-replicas unset")
    extra = {"http_overhead_ms": options["http_overhead_ms"]}
    try:
        return SLO(
            p99_ms=options["slo_p99_ms"],
            min_accuracy=options["min_accuracy"],
            target_rps=options["target_rps"],
            num_cpus=serve_args["num_cpus"] or 1.0,
            **{k: v for k, v in extra.items() if v is not None},
        )
    except ValueError as exc:
        raise KilnError(str(exc)) from exc


def choose_for_slo(
    settings: Settings,
    name: str,
    slo: SLO,
    key: str | None,
    dry_run: bool,
    backend: str = "auto",
    as_json: bool = False,
) -> Verdict:
    """Judge every profiled version of `name` against `slo` (each backend it was profiled on,
    or only `backend` unless auto), print the candidates, audit the decision and return the
    chosen verdict (KilnError, exit 2, when none qualifies).

    On an embedded home it reads the SQLite catalog directly: no Ray is started for it."""
    from kiln.client import Kiln
    from kiln.compare import slo_candidates
    from kiln.serving.slo import choose

    with Kiln(settings=settings, key=key, use_ray=not settings.embedded) as kiln:
        rows = kiln.compare(name)
        candidates = slo_candidates(rows, kiln.profiles(name))
        candidates = [c for c in candidates if backend in ("auto", c.backend)]
        choice = choose(name, candidates, slo)
        chosen = choice.chosen
        kiln.record_event(
            "slo-choice",
            name,
            {
                "slo": {
                    "p99_ms": slo.p99_ms,
                    "min_accuracy": slo.min_accuracy,
                    "target_rps": slo.target_rps,
                    "http_overhead_ms": slo.http_overhead_ms,
                    "num_cpus": slo.num_cpus,
                },
                "candidates": [v.to_dict() for v in choice.verdicts],
                "chosen": chosen.candidate.ref if chosen else None,
                "backend": chosen.candidate.backend if chosen else None,
                "replicas": chosen.prediction.replicas if chosen else None,
                "dry_run": dry_run,
            },
        )
    unprofiled = [r["ref"] for r in rows if not r["profiles"]]
    if as_json and chosen is not None and dry_run:
        summary = {
            "dry_run": True,
            "chosen": chosen.candidate.ref,
            "backend": chosen.candidate.backend,
            "replicas": chosen.prediction.replicas,
            "message": choice.message,
            "candidates": [v.to_dict() for v in choice.verdicts],
            "unprofiled": unprofiled,
        }
        print(json.dumps(summary, default=str), flush=True)
        return chosen
    if (choice.verdicts or unprofiled) and not as_json:
        Console().print(slo_table(choice, slo, unprofiled))
    if chosen is None:
        raise KilnError(choice.message)
    console.print(f"chose {choice.message}{' (dry run: nothing deployed)' if dry_run else ''}")
    return chosen


def slo_table(choice: Choice, slo: SLO, unprofiled: list[str]) -> Table:
    """Every candidate with its prediction and verdict; versions without a profile last."""
    metric = choice.verdicts[0].candidate.metric if choice.verdicts else "accuracy"
    table = Table(
        "version",
        "backend",
        metric,
        f"p99 ms at {slo.load}",
        "CPU-s / 1k",
        "replicas",
        "verdict",
        caption=f"SLO: p99 <= {slo.p99_ms:g} ms, {metric} >= {slo.min_accuracy:g}; "
        f"HTTP overhead {slo.http_overhead_ms:g} ms (p99)",
    )
    for verdict in choice.verdicts:  # by version, then backend
        p, c = verdict.prediction, verdict.candidate
        picked = choice.chosen is verdict
        table.add_row(
            c.ref,
            c.backend,
            "" if c.score is None else f"{c.score:.4f}",
            f"{p.p99_ms:.1f}",
            f"{p.cost:.4g}",
            str(p.replicas),
            "chosen" if picked else ("fits" if verdict.ok else "; ".join(verdict.reasons)),
        )
    for ref in unprofiled:
        table.add_row(ref, "", "", "", "", "", f"not profiled: kiln models profile {ref}")
    return table


def check_refs(
    settings: Any,
    refs: list[str],
    backend: str = "auto",
    log_mask: list[str] | None = None,
    log_drop: list[str] | None = None,
) -> None:
    """Every reference resolves in this KILN_HOME's catalog and can run on `backend` (read
    directly: the embedded Ray is not started for a model that does not exist), and every
    --log-mask/--log-drop field is an input of a served model. On a cluster, `deploy_models`
    asks the Registry actor the same before it deploys."""
    from kiln.client import Kiln
    from kiln.training.export import serving_backend

    with Kiln(settings=settings, use_ray=False) as kiln:
        records = [kiln.resolve(ref) for ref in refs]
    for ref, record in zip(refs, records, strict=True):
        serving_backend(record.spec, record.artifacts, backend, ref)
    check_log_fields(records, log_mask or [], log_drop or [])


def check_log_fields(records: list[Any], log_mask: list[str], log_drop: list[str]) -> None:
    """One line naming a --log-mask/--log-drop field that no served model has as an input,
    with the inputs they do have (positional models: x0..x{n-1})."""
    from kiln.serving.logmask import check_fields, input_fields

    known = {r.ref: input_fields(r.spec) for r in records}
    check_fields(log_mask, known, "--log-mask")
    check_fields(log_drop, known, "--log-drop")


def check_native_front(choice: str) -> None:
    """KILN_GRPC_FRONT=native without the binary: one line before Ray starts (on a cluster each
    replica checks its own node, serving/direct.py)."""
    from kiln.serving import direct

    if choice == "native" and not direct.NATIVE_FRONT.is_file():
        raise KilnError(
            f'Got "native" for KILN_GRPC_FRONT, but {direct.NATIVE_FRONT} is not built. '
            "Run `make native`, or set KILN_GRPC_FRONT=auto to answer gRPC with grpc.aio."
        )


def validated_serve_args(**values: Any) -> dict[str, Any]:
    """The serve arguments, checked before Ray starts (one line per mistake)."""
    from kiln.serving.schemas import ServeArgs

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
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    key: KeyOpt = None,
) -> None:
    """Canary: send --canary-weight% of NAME's traffic to NAME@--version, live."""
    from kiln.serving_control import check_canary_weight, deploy_canary

    check_canary_weight(canary_weight)
    settings = require_cluster(load_settings(address=address), "kiln deploy")
    with connected(settings):
        deploy_canary(settings, name, version, canary_weight, key)
    output(
        {"model": name, "version": version, "canary_weight": canary_weight},
        as_json,
        lambda r: f"{name}@{version} takes {canary_weight}% of {name}'s traffic (alias canary)",
    )


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="A served model's name.")],
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    key: KeyOpt = None,
) -> None:
    """The canary becomes production and takes all traffic (no failed request)."""
    switch_traffic("promote", name, address, key, as_json)


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="A served model's name.")],
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    key: KeyOpt = None,
) -> None:
    """Drop a live canary; without one, serve the previous production version again."""
    switch_traffic("rollback", name, address, key, as_json)


def switch_traffic(
    action: str, name: str, address: str | None, key: str | None, as_json: bool = False
) -> None:
    from kiln import serving_control

    settings = require_cluster(load_settings(address=address), f"kiln {action}")
    with connected(settings):
        args = getattr(serving_control, action)(settings, name, key)
    serves = [m for m in args["models"] if m.startswith(name + "@")]
    output({"model": name, "serves": serves}, as_json, lambda r: f"{name} now serves {serves}")
