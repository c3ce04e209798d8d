"""The `kiln` command line.

Errors a user can act on print as one line on stderr with a non-zero exit; `--debug` anywhere
on the command line shows the traceback instead and streams the Ray workers' logs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer._click import exceptions as click_errors  # typer vendors click since 0.20

from cluster.settings import Settings
from training.errors import KilnError

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
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]
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
    }
    try:
        return Settings().with_overrides(**{keys[k]: v for k, v in overrides.items()})
    except ValueError as exc:
        raise KilnError(f"invalid setting: {_first_pydantic_error(exc)}") from exc


def _first_pydantic_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors) and errors():
        first = errors()[0]
        return f'Got "{first.get("input")}" for {".".join(map(str, first["loc"]))}: {first["msg"]}'
    return str(exc)


@contextmanager
def connected(settings: Settings) -> Iterator[None]:
    from cluster.runtime import ray_session

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


def emit(result: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(result, default=str), flush=True)
        return
    table = Table(title=title, show_header=False)
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def parse_hidden(hidden: str) -> list[int]:
    try:
        return [int(w) for w in hidden.split(",") if w.strip()]
    except ValueError as exc:
        raise KilnError(
            f'Got "{hidden}" for --hidden. Give widths separated by commas, e.g. 128,64.'
        ) from exc


# ----------------------------------------------------------------------------- commands


@app.command()
def demo(
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 40,
    workers: Annotated[int, typer.Option(help="Ray Train workers.")] = 2,
    as_json: JsonOpt = False,
    host: HostOpt = None,
    port: PortOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Digits -> shards -> Ray Train (2 workers) -> registry -> Ray Serve -> HTTP, locally."""
    from cluster.demo import run_demo
    from training.config import TrainConfig

    started = time.perf_counter()
    cfg = TrainConfig(model="mlp", workers=workers, epochs=epochs, lr=2e-3, batch_size=32, l2=1.0)
    settings = load_settings(host=host, port=port, home=home, storage=storage)
    if not settings.embedded:
        console.print("[yellow]kiln demo runs on an embedded Ray; ignoring RAY_ADDRESS[/]")
        settings = settings.model_copy(update={"ray_address": None})
    from serving.schemas import AUTH_OFF_WARNING

    console.print(f"[yellow]demo: {AUTH_OFF_WARNING}[/]")
    bar = EpochProgress(cfg.epochs, quiet=False)
    with bar.progress, connected(settings):
        result = run_demo(settings, cfg, on_epoch=bar.epoch, on_step=bar.step)
    result["elapsed_s"] = time.perf_counter() - started
    emit(result, as_json, "kiln demo")


@app.command()
def train(
    data: Annotated[
        str | None,
        typer.Option(
            help="Dataset URI (file/folder, sklearn:NAME, synthetic:KIND?rows=N) or a "
            "dataset name from `kiln data load`."
        ),
    ] = None,
    model: Annotated[str, typer.Option(help="linear|ridge|logistic|mlp|cnn")] = "mlp",
    label: Annotated[str | None, typer.Option(help="Label column.")] = None,
    features: Annotated[str | None, typer.Option(help="Feature columns, comma-separated.")] = None,
    workers: Annotated[int, typer.Option(help="Ray Train workers.")] = 2,
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Most training epochs (minibatch solvers). Default: enough for 600 optimizer "
            "steps, between 30 and 300."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per step per worker.")] = 64,
    solver: Annotated[
        str,
        typer.Option(
            help="auto|exact|lbfgs|sgd|adam|adamw. auto: exact for linear/ridge, lbfgs for "
            "logistic, --optimizer (Ray Train minibatches) for mlp/cnn."
        ),
    ] = "auto",
    optimizer: Annotated[str, typer.Option(help="sgd|adam|adamw (minibatch solvers)")] = "adam",
    lr: Annotated[float, typer.Option(help="Learning rate (minibatch solvers).")] = 1e-3,
    l2: Annotated[
        float | None,
        typer.Option(
            help="λ, the L2 coefficient (biases excluded). Default: 1 for ridge and logistic "
            "(scikit-learn's defaults), else 0."
        ),
    ] = None,
    max_iter: Annotated[int, typer.Option(help="Most L-BFGS iterations.")] = 1000,
    tol: Annotated[float, typer.Option(help="L-BFGS gradient tolerance.")] = 1e-6,
    hidden: Annotated[str, typer.Option(help="MLP hidden widths, comma-separated.")] = "128,64",
    lr_schedule: Annotated[str, typer.Option(help="constant|step|cosine")] = "constant",
    test_fraction: Annotated[float, typer.Option(help="Held-out test share.")] = 0.2,
    val_fraction: Annotated[
        float, typer.Option(help="Validation share of the rest (early stopping); 0: none.")
    ] = 0.1,
    patience: Annotated[
        int | None,
        typer.Option(
            help="Stop after this many epochs without a better val loss; 0: off. Default: a "
            "tenth of the epochs, at least 5."
        ),
    ] = None,
    eval_data: Annotated[
        str | None, typer.Option(help="Evaluate on this dataset URI instead of a test split.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split and the shuffles.")] = 0,
    register: Annotated[
        str | None, typer.Option(help="Registry name (default: <data>-<model>).")
    ] = None,
    resume: Annotated[
        str | None, typer.Option(help="Continue a stopped run by its name (other options ignored).")
    ] = None,
    gpu: Annotated[str, typer.Option(help="auto|on|off")] = "auto",
    cpus_per_worker: Annotated[
        int | None,
        typer.Option(help="CPUs (and torch threads) per worker; default: its share of the free."),
    ] = None,
    grad_accum: Annotated[
        int, typer.Option(help="Micro-batches per optimizer step (one DDP sync per step).")
    ] = 1,
    bucket_cap_mb: Annotated[
        float | None, typer.Option(help="DDP gradient bucket size in MB; default: DDP's 25.")
    ] = None,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Train a model with Ray Train on resident shards, evaluate it and register it."""
    from actors.shards import looks_like_dataset_name
    from actors.sources import SourceSpec, check_source
    from cluster.pipeline import TrainRequest, load_run_request, train_and_register
    from cluster.runtime import registry_for
    from training.config import TrainConfig

    started = time.perf_counter()
    settings = load_settings(address=address, home=home, storage=storage)
    if resume:
        request = load_run_request(settings, resume)
    elif data is None:
        raise KilnError("Give --data URI|NAME (or --resume RUN). See `kiln train --help`.")
    else:
        cfg = TrainConfig(
            model=model,
            workers=workers,
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            l2=l2,
            solver=solver,
            max_iter=max_iter,
            tol=tol,
            hidden=parse_hidden(hidden),
            lr_schedule=lr_schedule,
            seed=seed,
            gpu=gpu,
            patience=patience,
            cpus_per_worker=cpus_per_worker,
            grad_accum=grad_accum,
            bucket_cap_mb=bucket_cap_mb,
        )
        source = SourceSpec(
            uri=data,
            label=label,
            test_fraction=0.0 if eval_data else test_fraction,
            val_fraction=val_fraction,
            seed=seed,
            features=tuple(f.strip() for f in features.split(",")) if features else None,
        )
        request = TrainRequest(
            data=data,
            source=source,
            train=cfg,
            eval_data=eval_data,
            name=register or default_model_name(data, model),
        )
    if not looks_like_dataset_name(request.data):
        check_source(request.source)  # a typo in --data fails here, before Ray starts
    if request.eval_data:
        check_source(SourceSpec(uri=request.eval_data, label=request.source.label))
    minibatch = request.train.resolved_solver == "minibatch"
    bar = EpochProgress(request.train.epochs if minibatch else 0, quiet=False)
    with bar.progress, connected(settings):
        if request.train.gpu == "on":
            require_gpu()
        outcome = train_and_register(settings, request, registry_for(settings), bar.epoch, bar.step)
        bar.step("shutting down")
    if outcome.warning:
        console.print(f"kiln: warning: {outcome.warning}")
    emit(
        {
            "model": outcome.record.name,
            "version": outcome.record.version,
            "metrics": outcome.test_metrics,
            "solver": outcome.solver,
            "converged": outcome.converged,
            "final_rel_loss_change": outcome.final_rel_loss_change,
            "epochs_run": outcome.epochs_run,
            "iterations": outcome.iterations,
            "num_workers": outcome.num_workers,
            "run": outcome.run_name,
            "elapsed_s": time.perf_counter() - started,
            "timings_s": bar.timings(),
        },
        as_json,
        f"kiln train: {outcome.record.ref}",
    )


class SweepTable:
    """A live rich table of the sweep's trials, fed by Tune's per-epoch results."""

    def __init__(self, metric: str, quiet: bool) -> None:
        from rich.live import Live

        self.metric = metric
        self.rows: dict[str, dict[str, Any]] = {}
        self.step_name = "starting"
        self.live = Live(self.render(), console=console, refresh_per_second=2, transient=False)
        self.quiet = quiet

    def __enter__(self) -> SweepTable:
        if not self.quiet:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.quiet:
            self.live.__exit__(None, None, None)

    def step(self, name: str) -> None:
        self.step_name = name
        self.refresh()

    def result(self, trial_id: str, config: dict[str, Any], result: dict[str, Any]) -> None:
        from tuning.tuner import trial_hyperparameters

        self.rows[trial_id] = {
            "config": trial_hyperparameters(config),
            "epoch": result.get("training_iteration", 0),
            "value": result.get(self.metric),
        }
        self.refresh()

    def refresh(self) -> None:
        if not self.quiet:
            self.live.update(self.render())

    def render(self) -> Table:
        table = Table(title=f"kiln tune: {self.step_name}", title_justify="left")
        for column in ("trial", "lr", "λ", "other", "epochs", self.metric):
            table.add_column(column)
        for trial_id, row in sorted(self.rows.items())[-20:]:
            config = dict(row["config"])
            lr, l2 = config.pop("lr"), config.pop("l2")
            other = " ".join(f"{k}={v}" for k, v in config.items())
            value = row["value"]
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            table.add_row(trial_id, f"{lr:.2e}", f"{l2:.2e}", other, str(row["epoch"]), shown)
        return table


@app.command()
def tune(
    data: Annotated[
        str | None,
        typer.Option(help="Dataset URI or a dataset name from `kiln data load`."),
    ] = None,
    model: Annotated[str, typer.Option(help="linear|ridge|logistic|mlp|cnn")] = "mlp",
    label: Annotated[str | None, typer.Option(help="Label column.")] = None,
    features: Annotated[str | None, typer.Option(help="Feature columns, comma-separated.")] = None,
    eval_data: Annotated[
        str | None, typer.Option(help="Evaluate the best model on this dataset URI.")
    ] = None,
    trials: Annotated[int, typer.Option(help="Trials to sample (random, optuna).")] = 16,
    scheduler: Annotated[str, typer.Option(help="asha|hyperband|pbt|none")] = "asha",
    search: Annotated[str, typer.Option(help="random|grid|optuna")] = "random",
    lr: Annotated[
        str, typer.Option(help="Learning-rate range LOW:HIGH (log scale).")
    ] = "1e-4:1e-1",
    l2: Annotated[
        str | None,
        typer.Option(
            help="λ range LOW:HIGH (log scale); 0,LOW:HIGH also tries λ=0. Default: "
            "0,1e-3:1e5 for linear/ridge, 1e-4:1e4 for logistic, else 0,1e-4:10."
        ),
    ] = None,
    solver: Annotated[
        str,
        typer.Option(
            help="auto|exact|lbfgs|sgd|adam|adamw. auto: linear/ridge walk the exact λ path, "
            "logistic an L-BFGS λ path; mlp/cnn run Tune trials."
        ),
    ] = "auto",
    batch_size: Annotated[
        str | None, typer.Option(help="Batch sizes to try, comma-separated.")
    ] = None,
    hidden_width: Annotated[
        str | None, typer.Option(help="MLP hidden widths to try, comma-separated.")
    ] = None,
    depth: Annotated[str | None, typer.Option(help="MLP depths to try, comma-separated.")] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="Optimisers to try, e.g. adam,sgd (default: adam).")
    ] = None,
    space: Annotated[
        str | None, typer.Option(help="YAML search space (overrides the range options).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Most epochs per trial.")] = 20,
    workers_per_trial: Annotated[
        int, typer.Option(help="Ray Train workers per trial (1: in-process, fastest).")
    ] = 1,
    metric: Annotated[
        str, typer.Option(help="Validation metric to rank trials: val_loss, val_accuracy, val_r2.")
    ] = "val_loss",
    grid_points: Annotated[int, typer.Option(help="Grid values per axis (lr, λ).")] = 4,
    base_batch_size: Annotated[
        int, typer.Option("--base-batch-size", help="Batch size when not tuned.")
    ] = 32,
    hidden: Annotated[str, typer.Option(help="MLP hidden widths when not tuned.")] = "128,64",
    test_fraction: Annotated[float, typer.Option(help="Held-out test share.")] = 0.2,
    val_fraction: Annotated[
        float, typer.Option(help="Validation share of the rest (ranks the trials).")
    ] = 0.15,
    seed: Annotated[int, typer.Option(help="Seed of the split, shuffles and the search.")] = 0,
    register: Annotated[
        str | None, typer.Option(help="Registry name for the best model (default: <data>-<model>).")
    ] = None,
    resume: Annotated[
        str | None, typer.Option(help="Finish a sweep whose driver died, by its id.")
    ] = None,
    refit: Annotated[
        bool,
        typer.Option(
            help="Train the best configuration again on train + validation rows and register "
            "that model (--no-refit: register the best trial's own weights)."
        ),
    ] = True,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Sweep hyperparameters with Ray Tune on resident shards; register the best model."""
    from actors.shards import looks_like_dataset_name
    from actors.sources import SourceSpec, check_source
    from cluster.runtime import registry_for
    from cluster.tune_pipeline import SweepRequest, load_sweep_request, tune_and_register
    from training.config import TrainConfig
    from tuning.space import SearchSpace, default_l2_range, load_space_file
    from tuning.tuner import SweepConfig

    started = time.perf_counter()
    settings = load_settings(address=address, home=home, storage=storage)
    if resume:
        request = load_sweep_request(settings, resume)
    elif data is None:
        raise KilnError("Give --data URI|NAME (or --resume SWEEP). See `kiln tune --help`.")
    else:
        base = TrainConfig(
            model=model,
            workers=workers_per_trial,
            epochs=epochs,
            batch_size=base_batch_size,
            hidden=parse_hidden(hidden),
            seed=seed,
            solver=solver,
        )
        raw_space: dict[str, Any] = {"lr": lr, "l2": l2 or default_l2_range(base)}
        for key, value in (
            ("batch_size", batch_size),
            ("hidden_width", hidden_width),
            ("depth", depth),
            ("optimizer", optimizer),
        ):
            if value:
                raw_space[key] = value
        search_space = (
            SearchSpace.from_dict(load_space_file(space), where=space)
            if space
            else SearchSpace.from_dict(raw_space)
        )
        sweep_cfg = SweepConfig(
            space=search_space,
            scheduler=scheduler,
            search=search,
            num_trials=trials,
            max_epochs=epochs,
            workers_per_trial=workers_per_trial,
            metric=metric,
            grid_points=grid_points,
            seed=seed,
        )
        source = SourceSpec(
            uri=data,
            label=label,
            test_fraction=0.0 if eval_data else test_fraction,
            val_fraction=val_fraction,
            seed=seed,
            features=tuple(f.strip() for f in features.split(",")) if features else None,
        )
        if val_fraction <= 0:
            raise KilnError(
                f'Got "{val_fraction}" for --val-fraction. A sweep ranks trials on validation '
                "rows: use a value in (0, 1), e.g. 0.15."
            )
        request = SweepRequest(
            data=data,
            source=source,
            train=base,
            sweep=sweep_cfg,
            eval_data=eval_data,
            name=register or default_model_name(data, model),
            refit=refit,
        )
    if not looks_like_dataset_name(request.data):
        check_source(request.source)
    if request.eval_data:
        check_source(SourceSpec(uri=request.eval_data, label=request.source.label))
    table = SweepTable(request.sweep.metric, quiet=as_json)
    with table, connected(settings):
        outcome = tune_and_register(
            settings,
            request,
            registry_for(settings),
            resume=bool(resume),
            on_result=table.result,
            on_step=table.step,
        )
    console.print(
        f"sweep {outcome.sweep_id}: artifacts in {outcome.artifacts['csv'].rsplit('/', 1)[0]}"
    )
    for note in outcome.extra.get("notes", []):
        console.print(f"kiln: note: {note}")
    emit(
        tune_result(outcome, request.sweep.metric, time.perf_counter() - started),
        as_json,
        f"kiln tune: {outcome.record.ref}",
    )


def tune_result(outcome: Any, metric: str, elapsed_s: float) -> dict[str, Any]:
    """`kiln tune --json`: exactly the keys the sweep's contract names (issue 4)."""
    return {
        "best_config": outcome.best.config,
        "best_metrics": {**outcome.test_metrics, f"best_{metric}": outcome.best.best},
        "num_trials": len(outcome.trials),
        "trial_epochs": outcome.trial_epochs,
        "model": outcome.record.name,
        "version": outcome.record.version,
        "elapsed_s": elapsed_s,
        "artifacts": {k: outcome.artifacts[k] for k in ("csv", "heatmap", "curves")},
        **outcome.extra,
    }


def default_model_name(data: str, model: str) -> str:
    stem = data.rsplit("/", 1)[-1].split("?")[0].split(".")[0].replace(":", "-").replace("_", "-")
    return f"{stem.lower()}-{model}"[:64]


def require_gpu() -> None:
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        raise KilnError("Got --gpu on, but this Ray cluster has no GPU. Use --gpu auto or off.")


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


def validated_serve_args(**values: Any) -> dict[str, Any]:
    """The serve arguments, checked before Ray starts (one line per mistake)."""
    from serving.schemas import ServeArgs

    try:
        parsed = ServeArgs(**values)
        parsed.autoscaling()
    except ValueError as exc:
        raise KilnError(f"invalid serve option: {_first_pydantic_error(exc)}") from exc
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


@data_app.command("load")
def data_load(
    uri: Annotated[
        str, typer.Argument(help="Dataset URI: file/folder, sklearn:NAME, synthetic:...")
    ],
    name: Annotated[str, typer.Option(help="Name to train from later: kiln train --data NAME.")],
    shards: Annotated[int, typer.Option(help="ShardStore actors (spread over the nodes).")] = 2,
    label: Annotated[str | None, typer.Option(help="Label column.")] = None,
    features: Annotated[str | None, typer.Option(help="Feature columns, comma-separated.")] = None,
    test_fraction: Annotated[float, typer.Option(help="Held-out test share.")] = 0.2,
    val_fraction: Annotated[float, typer.Option(help="Validation share of the rest.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
) -> None:
    """Load a dataset into named, detached ShardStore actors on a cluster."""
    from actors.catalog import NAME_PATTERN
    from actors.shards import load_dataset
    from actors.sources import SourceSpec, check_source

    if not NAME_PATTERN.match(name):
        raise KilnError(
            f'Got "{name}" for --name. Use lowercase letters, digits and "-" (at most 64).'
        )
    if shards < 1:
        raise KilnError(f'Got "{shards}" for --shards. --shards must be at least 1.')
    source = SourceSpec(
        uri=uri,
        label=label,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        seed=seed,
        features=tuple(f.strip() for f in features.split(",")) if features else None,
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
        }
    emit(result, as_json, f"kiln data load: {name}")


@data_app.command("ls")
def data_ls(as_json: JsonOpt = False, address: AddressOpt = None) -> None:
    """Datasets resident on the cluster."""
    from actors.shards import list_datasets

    settings = require_cluster(load_settings(address=address), "kiln data ls")
    with connected(settings):
        datasets = list_datasets()
    if as_json:
        print(json.dumps(datasets))
        return
    table = Table("name", "uri", "shards", "rows", "MiB")
    for d in datasets:
        rows = ", ".join(f"{k} {v}" for k, v in d["rows"].items())
        table.add_row(d["name"], str(d["uri"]), str(d["shards"]), rows, f"{d['bytes'] / 2**20:.1f}")
    Console().print(table)


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
    from cluster.client import Kiln

    settings = load_settings(address=address, storage=storage)
    where = settings.ray_address
    with console.status(f"connecting to {where}") if where else nullcontext():
        client = Kiln(home=home, key=key, settings=settings, use_ray=not settings.embedded)
    try:
        yield client
    finally:
        client.close()


def print_json(value: Any) -> None:
    print(json.dumps(value, default=str), flush=True)


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
    if as_json:
        print_json(rows)
        return
    if name is None:
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
    else:
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
    Console().print(table)


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
    if as_json:
        print_json(result)
        return
    Console().print_json(json.dumps({k: v for k, v in result.items() if k != "spec"}))


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
    if as_json:
        print_json(result)
        return
    was = f" (was {result['previous']})" if result["previous"] is not None else ""
    Console().print(f"{name}@{alias} -> {version}{was}")


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
    if as_json:
        print_json(result)
        return
    Console().print(f"removed {name}@{alias} (pointed at {result['version']})")


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
    if as_json:
        print_json(result)
        return
    dropped = f" (aliases removed: {', '.join(result['aliases_removed'])})"
    Console().print(f"deleted {result['ref']}{dropped if result['aliases_removed'] else ''}")


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
    if as_json:
        print_json(result)
        return
    Console().print(f"archived {result['ref']}")


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
    if as_json:
        print_json(result)
        return
    Console().print(f"unarchived {result['ref']}")


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
    if as_json:
        print_json(made)
        return
    console.print("[yellow]Store this secret now: Kiln keeps only a hash and cannot show it again.")
    # Plain lines, never a table: a wrapped secret could not be copied whole.
    print(f"id       {made['id']}")
    print(f"scopes   {', '.join(made['scopes'])}")
    print(f"expires  {made['expires'] or 'never'}")
    print(f"secret   {made['secret']}", flush=True)


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
    if as_json:
        print_json(rows)
        return
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
    Console().print(table)


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
    if as_json:
        print_json(row)
        return
    Console().print(f"revoked {row['id']} at {row['revoked']}")


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
    if as_json:
        print_json(entries)
        return
    table = Table("at (UTC)", "key", "action", "target", "detail")
    for e in entries:
        detail = json.dumps(e["detail"]) if e["detail"] else ""
        table.add_row(short_time(e["at"]), e["key_id"], e["action"], e["target"], detail)
    Console().print(table)


# ----------------------------------------------------------------------------- jobs


@app.command(no_args_is_help=True)
def submit(
    entrypoint: Annotated[
        list[str], typer.Argument(help="The command after --, e.g. -- kiln train --data ...")
    ],
    wait: Annotated[
        bool, typer.Option(help="Follow the job's logs; exit 0 only if it succeeds.")
    ] = False,
    env: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE for the job (repeat), e.g. KILN_HOME=...")
    ] = None,
    job_id: Annotated[str | None, typer.Option(help="Submission id (default: generated).")] = None,
    as_json: JsonOpt = False,
    address: JobsAddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Run a command on the cluster as a Ray Job, with this checkout as its working_dir."""
    from cluster.jobs import JobsClient, parse_env

    quiet_ray_logs()
    client = JobsClient(address, token)
    submitted = client.submit(entrypoint, parse_env(env or []), submission_id=job_id)
    console.print(f"submitted {submitted} to {client.address}")
    if not wait:
        if as_json:
            print_json({"job_id": submitted, "status": "PENDING"})
        else:
            print(submitted, flush=True)
        return
    for chunk in client.follow(submitted):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    info = client.wait(submitted, timeout_s=60)
    if as_json:
        print_json(info.to_dict())
    console.print(f"job {submitted} {info.status}{': ' + info.message if info.message else ''}")
    if info.status != "SUCCEEDED":
        raise typer.Exit(1)


def quiet_ray_logs() -> None:
    """Ray's client logs each file it leaves out of a job's working_dir at INFO."""
    if not DEBUG["on"]:
        logging.getLogger("ray").setLevel(logging.WARNING)


@jobs_app.command("list")
def jobs_list(
    as_json: JsonOpt = False, address: JobsAddressOpt = None, token: TokenOpt = None
) -> None:
    """Every job of the cluster, oldest first."""
    from cluster.client import iso_time
    from cluster.jobs import JobsClient

    jobs = JobsClient(address, token).list()
    if as_json:
        print_json([j.to_dict() for j in jobs])
        return
    table = Table("id", "status", "started (UTC)", "ended", "entrypoint")
    for j in jobs:
        table.add_row(
            j.job_id,
            j.status,
            short_time(iso_time(j.start_time_s)),
            short_time(iso_time(j.end_time_s)),
            j.entrypoint[:60],
        )
    Console().print(table)


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job id (kiln jobs list).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until it ends.")] = False,
    address: JobsAddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """A job's output (driver stdout and stderr)."""
    from cluster.jobs import JobsClient

    client = JobsClient(address, token)
    chunks = client.follow(job_id) if follow else iter([client.logs(job_id)])
    for chunk in chunks:
        sys.stdout.write(chunk)
        sys.stdout.flush()


@jobs_app.command("stop")
def jobs_stop(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job id (kiln jobs list).")],
    address: JobsAddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Stop a running job (SIGTERM to its driver, then SIGKILL)."""
    from cluster.jobs import JobsClient

    client = JobsClient(address, token)
    if not client.stop(job_id):
        status = client.info(job_id).status
        raise KilnError(f'Got "{job_id}": that job already ended ({status}); nothing to stop.')
    console.print(f"stopping {job_id}")


# ----------------------------------------------------------------------------- entry point


def user_error(exc: BaseException) -> KilnError | None:
    """The KilnError in an exception chain, found by type alone (never by module name).

    Ray wraps an error raised in an actor or a worker: the RayTaskError it raises derives from
    the error's own class too, but its text carries the remote traceback, so the search looks
    through any wrapper that keeps the original as `cause` and returns the original.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        inner = getattr(current, "cause", None)
        if isinstance(inner, BaseException):
            current = inner
        elif isinstance(current, KilnError):
            return current
        else:
            current = current.__cause__
    return exc if isinstance(exc, KilnError) else None


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def usage_message(exc: click_errors.UsageError) -> str:
    """Typer's parse error as one line that names the bad value and where to look."""
    command = exc.ctx.command_path if exc.ctx else "kiln"
    message = one_line(exc.format_message()).rstrip(".")
    param = getattr(exc, "param", None)
    errors = getattr(exc.__cause__, "errors", None)
    if param is not None and callable(errors) and errors():
        option = "/".join(param.opts) if getattr(param, "opts", None) else param.name
        message = f'Got "{errors()[0].get("input")}" for {option}: {errors()[0]["msg"]}'
    return f"{message}. See '{command} --help'."


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    DEBUG["on"] = "--debug" in args
    args = [a for a in args if a != "--debug"]
    logging.basicConfig(
        level=logging.INFO if DEBUG["on"] else logging.WARNING,
        handlers=[RichHandler(console=console, show_path=False)],
        format="%(message)s",
    )
    try:
        # Outside standalone mode click returns a command's typer.Exit code instead of exiting.
        code = app(args=args, prog_name="kiln", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except click_errors.UsageError as exc:
        print(f"kiln: {usage_message(exc)}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("kiln: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if DEBUG["on"]:
            raise
        found = user_error(exc)
        if found is not None:
            print(f"kiln: {one_line(str(found))}", file=sys.stderr)
            sys.exit(2)
        print(
            f"kiln: {type(exc).__name__}: {one_line(str(exc))[:300]} "
            "(rerun with --debug for details)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
