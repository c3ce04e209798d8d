"""What every `kiln` command group shares: the typer apps, option types, settings, the Ray
session, progress and output helpers."""

from __future__ import annotations

import importlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kiln.settings import Settings
from kiln.training.errors import KilnError

if TYPE_CHECKING:
    from kiln.tls import TlsFiles

app = typer.Typer(
    name="kiln",
    help="Train, tune, register and serve models on one Ray cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(
    help="The model registry: versions, aliases, lineage.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
data_app = typer.Typer(
    help="Datasets resident in ShardStore actors on a cluster.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
keys_app = typer.Typer(help="API keys for HTTP callers and admins.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
jobs_app = typer.Typer(help="Kiln commands running as Ray Jobs on a cluster.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

console = Console(stderr=True)
logger = logging.getLogger("kiln")
DEBUG = {"on": False}

# Options shared by every command that talks to Ray; each mirrors a setting of the same name.
AddressOpt = Annotated[
    str | None, typer.Option("--address", help="Ray address (RAY_ADDRESS); unset: embedded Ray.")
]
HomeOpt = Annotated[str | None, typer.Option("--home", help="Local state folder (KILN_HOME).")]
StorageOpt = Annotated[
    str | None, typer.Option("--storage", help="Artifact root URI (KILN_STORAGE).")
]
HostOpt = Annotated[str | None, typer.Option("--host", help="HTTP host (KILN_HTTP_HOST).")]
PortOpt = Annotated[int | None, typer.Option("--port", help="HTTP port (KILN_HTTP_PORT).")]
TlsCertOpt = Annotated[
    str | None,
    typer.Option("--tls-cert", help="Serve HTTPS with this certificate (PEM; KILN_TLS_CERT)."),
]
TlsKeyOpt = Annotated[
    str | None, typer.Option("--tls-key", help="The certificate's private key (KILN_TLS_KEY).")
]
TlsCaOpt = Annotated[
    str | None,
    typer.Option("--tls-ca", help="Require client certificates from this CA (KILN_TLS_CA)."),
]
TlsSelfSignedOpt = Annotated[
    bool,
    typer.Option(
        "--tls-self-signed",
        help="HTTPS with a throwaway certificate (in $KILN_HOME/tls); prints its fingerprint.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]
LabelOpt = Annotated[
    str | None, typer.Option(help="Label column (default: label, target or the last).")
]
FeaturesOpt = Annotated[
    str | None,
    typer.Option(help="Feature columns, comma-separated (default: every usable column)."),
]
CategoricalOpt = Annotated[
    str | None,
    typer.Option(help="Columns to read as categories, e.g. integer codes; comma-separated."),
]
MissingOpt = Annotated[
    str,
    typer.Option(
        help="impute: missing feature values get the training mean (numeric, plus an "
        "indicator) or their own category, rows without a label are dropped; error: refuse."
    ),
]
MinCategoryCountOpt = Annotated[
    int, typer.Option(help="Categories with fewer training rows share the 'other' slot.")
]
JobsAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="The cluster's Jobs API (dashboard) URL; default: RAY_ADDRESS when it is an "
        "http(s) URL, else http://127.0.0.1:8265.",
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="The cluster's auth token; default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, "
        "~/.ray/auth_token.",
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar="KILN_API_KEY",
        show_envvar=False,
        help="Act as this admin API key (KILN_API_KEY); default: the local user.",
    ),
]


def load_settings(**overrides: Any) -> Settings:
    keys = {
        "address": "ray_address",
        "home": "kiln_home",
        "storage": "kiln_storage",
        "host": "kiln_http_host",
        "port": "kiln_http_port",
        "grpc_port": "kiln_grpc_port",
        "ingress": "kiln_ingress",
    }
    try:
        return Settings().with_overrides(**{keys[k]: v for k, v in overrides.items()})
    except ValueError as exc:
        raise KilnError(f"invalid setting: {first_pydantic_error(exc)}") from exc


def tls_files(
    settings: Settings,
    cert: str | None,
    key: str | None,
    client_ca: str | None,
    self_signed: bool = False,
) -> TlsFiles | None:
    """The TLS files of the --tls-* options (each over its KILN_TLS_* setting), checked; None
    for plain HTTP. A self-signed certificate's path and SHA-256 fingerprint are printed."""
    from kiln.tls import fingerprint, tls_from_options

    files = tls_from_options(
        None if self_signed else (cert or settings.kiln_tls_cert),
        None if self_signed else (key or settings.kiln_tls_key),
        client_ca or settings.kiln_tls_ca,
        self_signed,
        settings.kiln_home.expanduser().resolve(),
    )
    if files is not None and self_signed:
        # Plain text: rich would turn ":CD:" inside a fingerprint into an emoji.
        for line in (
            f"self-signed certificate {files.cert} (trust it with --cacert)",
            f"SHA-256 fingerprint {fingerprint(files.cert)}",
        ):
            console.print(line, soft_wrap=True, emoji=False, markup=False, highlight=False)
    return files


def first_pydantic_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors) and errors():
        first = errors()[0]
        return f'Got "{first.get("input")}" for {".".join(map(str, first["loc"]))}: {first["msg"]}'
    return str(exc)


def preload(*modules: str) -> None:
    """Import `modules`, in order, on a thread while the main one starts Ray (mostly waiting on
    processes).

    `kiln train` imports torch (about 3 s) and, for a minibatch fit, Ray Train (1.5 s more)
    beside Ray's start this way. A later `import` of a module in the main thread waits for
    this one to finish.
    """

    def load() -> None:
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception:  # the main thread's own import raises it again, with its traceback
                logger.debug("preloading %s failed", module, exc_info=True)

    threading.Thread(target=load, name=f"preload-{modules[0]}", daemon=True).start()


@contextmanager
def connected(settings: Settings) -> Iterator[None]:
    from kiln.runtime import ray_session

    where = settings.ray_address or "an embedded local Ray"
    with console.status(f"starting {where}"):
        session = ray_session(settings, debug=DEBUG["on"])
        session.__enter__()
    try:
        yield
    finally:
        with console.status("shutting down"):
            session.__exit__(None, None, None)


class EpochProgress:
    """A rich progress bar fed by the training loop's per-epoch metrics; it also times the
    pipeline's steps (`timings_s` in `kiln train --json`)."""

    def __init__(self, epochs: int | None, quiet: bool) -> None:
        self.marks: list[tuple[str, float]] = [("starting ray", time.perf_counter())]
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            console=console,
            disable=quiet,
        )
        self.task = self.progress.add_task("train", total=epochs, metrics="")

    def step(self, name: str) -> None:
        self.marks.append((name.split(" (")[0], time.perf_counter()))
        self.progress.update(self.task, description=name)

    def timings(self) -> dict[str, float]:
        """Seconds spent in each step, Ray's start included, up to now."""
        ends = [t for _, t in self.marks[1:]] + [time.perf_counter()]
        pairs = zip(self.marks, ends, strict=True)
        return {name: round(end - start, 3) for (name, start), end in pairs}

    def epoch(self, metrics: dict[str, Any]) -> None:
        if "max_epochs" in metrics:
            self.progress.update(self.task, total=metrics["max_epochs"])
        shown = f"loss {metrics['train_loss']:.4f}"
        if "train_accuracy" in metrics:
            shown += f"  acc {metrics['train_accuracy']:.3f}"
        self.progress.update(self.task, completed=metrics["epoch"] + 1, metrics=shown)


def output(value: Any, as_json: bool, render: Callable[[Any], Any]) -> None:
    """Print a command's result: one JSON line with --json, else `render(value)`.

    `render` returns a rich renderable (a table), a str printed as plain lines (never wrapped,
    so an id or a secret can be copied whole), or None when the text form is a status line the
    command prints to stderr anyway. With --json nothing else reaches stdout.
    """
    if as_json:
        print(json.dumps(value, default=str), flush=True)
        return
    shown = render(value)
    if shown is None:
        return
    if isinstance(shown, str):
        print(shown, flush=True)
    else:
        Console().print(shown)


def print_column_notes(summary: dict[str, Any]) -> None:
    """The lines a user must not miss: columns left out, rows dropped."""
    from kiln.actors.sources import ignored_line

    line = ignored_line(list((summary.get("ignored") or {}).items()))
    if line:
        console.print(line, markup=False)
    if summary.get("dropped_rows"):
        console.print(
            f"dropped {summary['dropped_rows']} rows with no {summary['label']} (missing label)",
            markup=False,
        )


def key_values(title: str) -> Callable[[dict[str, Any]], Table]:
    """A two-column table of a result's keys and values (floats to 4 places)."""

    def table(result: dict[str, Any]) -> Table:
        shown = Table(title=title, show_header=False)
        for key, value in result.items():
            shown.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        return shown

    return table


def command_request(
    command: str,
    settings: Settings,
    values: dict[str, Any],
    build: Callable[..., Any],
    load_saved: Callable[[Settings, str], Any],
) -> Any:
    """`kiln train`/`tune`'s request: the saved one for --resume, else built from its options.

    `values` are the command's parameters (its `locals()`); `build` (a request's
    `from_options`) takes the ones it names. The sources are checked here, so a typo in --data
    fails before Ray starts.
    """
    from kiln.requests import option_names

    if values["resume"]:
        request = load_saved(settings, values["resume"])
    elif values["data"] is None:
        resumed = "RUN" if command == "train" else "SWEEP"
        raise KilnError(
            f"Give --data URI|NAME (or --resume {resumed}). See `kiln {command} --help`."
        )
    else:
        request = build(**{name: values[name] for name in option_names(build)})
    check_sources(request)
    return request


def check_in_catalog(settings: Settings, request: Any) -> None:
    """A request on one version (`kiln compress`, `kiln export`): its `ref` resolves in this
    KILN_HOME's SQLite catalog and `request.check_against(record)` accepts the version, before
    the embedded Ray starts."""
    from kiln.client import Kiln

    with Kiln(settings=settings, use_ray=False) as kiln:
        request.check_against(kiln.resolve(request.ref))


def check_sources(request: Any) -> None:
    """A typo in --data or --eval-data fails here, before Ray starts."""
    from kiln.actors.shards import looks_like_dataset_name
    from kiln.actors.sources import SourceSpec, check_source

    if not looks_like_dataset_name(request.data):
        check_source(request.source)
    if request.eval_data:
        check_source(SourceSpec(uri=request.eval_data, label=request.source.label))


def require_cluster(settings: Settings, command: str) -> Settings:
    if settings.embedded:
        raise KilnError(
            f"{command} needs a running Ray cluster: set RAY_ADDRESS or pass --address "
            "(on the embedded Ray, shards live for one command)."
        )
    return settings


@contextmanager
def open_client(
    address: str | None = None,
    home: str | None = None,
    storage: str | None = None,
    key: str | None = None,
) -> Iterator[Any]:
    """The Python client the registry commands run on (in-process unless --address)."""
    from kiln.client import Kiln

    settings = load_settings(address=address, storage=storage)
    where = settings.ray_address
    with console.status(f"connecting to {where}") if where else nullcontext():
        client = Kiln(home=home, key=key, settings=settings, use_ray=not settings.embedded)
    try:
        yield client
    finally:
        client.close()


def short_time(iso: str | None) -> str:
    """`2025-01-31T12:00:00+00:00` -> `2025-01-31 12:00` for tables (JSON keeps the full form)."""
    return iso[:16].replace("T", " ") if iso else ""


def short_metrics(metrics: dict[str, Any]) -> str:
    shown = [
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in metrics.items()
        if isinstance(v, int | float)
    ]
    return ", ".join(shown[:3])


def require_gpu() -> None:
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        raise KilnError("Got --gpu on, but this Ray cluster has no GPU. Use --gpu auto or off.")


def check_port(host: str, port: int, option: str = "--port") -> None:
    """One line now rather than uvicorn's log after Ray has started."""
    if not 1 <= port <= 65535:
        raise KilnError(f'Got "{port}" for {option}. Use a port between 1 and 65535.')
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise KilnError(
                f"cannot listen on {host}:{port} ({exc.strerror}); choose another with {option}"
            ) from exc
