"""`kiln demo`, `kiln train` and `kiln tune`: fitting models."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.table import Table

from kiln.cli.common import (
    AddressOpt,
    CategoricalOpt,
    EpochProgress,
    FeaturesOpt,
    HomeOpt,
    HostOpt,
    JsonOpt,
    LabelOpt,
    MinCategoryCountOpt,
    MissingOpt,
    PortOpt,
    StorageOpt,
    TlsSelfSignedOpt,
    app,
    command_request,
    connected,
    console,
    key_values,
    load_settings,
    output,
    preload,
    print_column_notes,
    require_gpu,
    tls_files,
)
from kiln.cli.language import (
    LMBlockSizeOpt,
    LMDimOpt,
    LMEvalEveryOpt,
    LMGradClipOpt,
    LMHeadsOpt,
    LMKvHeadsOpt,
    LMLayersOpt,
    LMMaxMinutesOpt,
    LMMaxStepsOpt,
    LMMaxTokensOpt,
    LMPlotOpt,
    LMPrecisionOpt,
    LMSizeOpt,
    LMStrategyOpt,
    LMTextFieldOpt,
    LMTokenizerOpt,
    LMVocabSizeOpt,
    LMWarmupOpt,
    LMWeightDecayOpt,
    given_lm_options,
    train_language_model,
)


@app.command()
def demo(
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 40,
    workers: Annotated[int, typer.Option(help="Ray Train workers.")] = 2,
    as_json: JsonOpt = False,
    tls_self_signed: TlsSelfSignedOpt = False,
    host: HostOpt = None,
    port: PortOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Digits -> shards -> Ray Train (2 workers) -> registry -> Ray Serve -> HTTP, locally."""
    from kiln.demo import run_demo
    from kiln.training.config import TrainConfig

    started = time.perf_counter()
    cfg = TrainConfig(model="mlp", workers=workers, epochs=epochs, lr=2e-3, batch_size=32, l2=1.0)
    settings = load_settings(host=host, port=port, home=home, storage=storage)
    if not settings.embedded:
        console.print("[yellow]kiln demo runs on an embedded Ray; ignoring RAY_ADDRESS[/]")
        settings = settings.model_copy(update={"ray_address": None})
    from kiln.serving.schemas import AUTH_OFF_WARNING

    console.print(f"[yellow]demo: {AUTH_OFF_WARNING}[/]")
    # TLS only as the self-signed kind: the demo's own queries trust that certificate.
    tls = tls_files(settings, None, None, None, True) if tls_self_signed else None
    bar = EpochProgress(cfg.epochs, quiet=False)
    with bar.progress, connected(settings):
        result = run_demo(settings, cfg, on_epoch=bar.epoch, on_step=bar.step, tls=tls)
    result["elapsed_s"] = time.perf_counter() - started
    output(result, as_json, key_values("kiln demo"))


@app.command()
def train(
    data: Annotated[
        str | None,
        typer.Option(
            help="Dataset URI (file/folder, sklearn:NAME, synthetic:KIND?rows=N) or a "
            "dataset name from `kiln data load`."
        ),
    ] = None,
    model: Annotated[
        str, typer.Option(help="linear|ridge|logistic|mlp|cnn, or lm (a language model on text:)")
    ] = "mlp",
    label: LabelOpt = None,
    features: FeaturesOpt = None,
    categorical: CategoricalOpt = None,
    missing: MissingOpt = "impute",
    min_category_count: MinCategoryCountOpt = 1,
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
        typer.Option(help="CPUs (and torch threads) per worker; default 1, Ray Train's."),
    ] = None,
    grad_accum: Annotated[
        int, typer.Option(help="Micro-batches per optimizer step (one DDP sync per step).")
    ] = 1,
    bucket_cap_mb: Annotated[
        float | None, typer.Option(help="DDP gradient bucket size in MB; default: DDP's 25.")
    ] = None,
    grad_sync: Annotated[
        str,
        typer.Option(
            help="auto|ddp: auto averages gradients in shared memory when all workers share "
            "one node's CPU, else DDP."
        ),
    ] = "auto",
    pca: Annotated[
        float | None,
        typer.Option(
            help="PCA on the standardised features, a fixed layer of the model: a variance "
            "share (0.95) or a number of components (20)."
        ),
    ] = None,
    size: LMSizeOpt = "tiny",
    layers: LMLayersOpt = None,
    dim: LMDimOpt = None,
    heads: LMHeadsOpt = None,
    kv_heads: LMKvHeadsOpt = None,
    block_size: LMBlockSizeOpt = None,
    vocab_size: LMVocabSizeOpt = 8192,
    tokenizer: LMTokenizerOpt = None,
    text_field: LMTextFieldOpt = None,
    max_steps: LMMaxStepsOpt = None,
    max_tokens: LMMaxTokensOpt = None,
    max_minutes: LMMaxMinutesOpt = None,
    eval_every: LMEvalEveryOpt = None,
    warmup_steps: LMWarmupOpt = None,
    weight_decay: LMWeightDecayOpt = 0.1,
    grad_clip: LMGradClipOpt = 1.0,
    strategy: LMStrategyOpt = "ddp",
    precision: LMPrecisionOpt = "auto",
    plot: LMPlotOpt = None,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Train a model with Ray Train on resident shards, evaluate it and register it."""
    from kiln.requests import TrainRequest, load_run_request
    from kiln.runtime import registry_for

    started = time.perf_counter()
    settings = load_settings(address=address, home=home, storage=storage)
    if model == "lm" or given_lm_options(locals()):
        train_language_model(settings, locals(), as_json, started)
        return
    request = command_request(
        "train", settings, locals(), TrainRequest.from_options, load_run_request
    )
    minibatch = request.train.resolved_solver == "minibatch"
    preload("kiln.pipeline", *(["kiln.training.loop"] if minibatch else []))
    bar = EpochProgress(request.train.epochs if minibatch else 0, quiet=False)
    with bar.progress, connected(settings):
        from kiln.resident import resident_data

        if request.train.gpu == "on":
            require_gpu()
        # The registry's start and torch import, and the data load, need none of the torch
        # the main pipeline imports: they start now, beside the rest of that import.
        registry = registry_for(settings)
        registry.prepare_checks.remote()
        bar.step("loading shards")
        resident = resident_data(request)
        from kiln.pipeline import train_and_register  # preloaded while Ray started

        outcome = train_and_register(
            settings, request, registry, bar.epoch, bar.step, data=resident
        )
        bar.step("shutting down")
    if outcome.warning:
        console.print(f"kiln: warning: {outcome.warning}")
    if not as_json:
        print_column_notes(outcome.columns)
    output(
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
            "grad_sync": outcome.grad_sync,
            "run": outcome.run_name,
            "columns": outcome.columns,
            "elapsed_s": time.perf_counter() - started,
            "timings_s": bar.timings(),
        },
        as_json,
        key_values(f"kiln train: {outcome.record.ref}"),
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
        from kiln.tuning.tuner import trial_hyperparameters

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
    model: Annotated[
        str, typer.Option(help="linear|ridge|logistic|mlp|cnn, or lm (a language model on text:)")
    ] = "mlp",
    label: LabelOpt = None,
    features: FeaturesOpt = None,
    categorical: CategoricalOpt = None,
    missing: MissingOpt = "impute",
    min_category_count: MinCategoryCountOpt = 1,
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
            help="Minibatch sweeps: train the best configuration again on train + validation "
            "rows for the epochs its trial needed and register that model, instead of the best "
            "trial's own best weights (the default, --no-refit)."
        ),
    ] = False,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Sweep hyperparameters with Ray Tune on resident shards; register the best model."""
    from kiln.requests import SweepRequest, load_sweep_request
    from kiln.runtime import registry_for

    started = time.perf_counter()
    preload("kiln.tune_pipeline")
    settings = load_settings(address=address, home=home, storage=storage)
    request = command_request(
        "tune", settings, locals(), SweepRequest.from_options, load_sweep_request
    )
    table = SweepTable(request.sweep.metric, quiet=as_json)
    with table, connected(settings):
        from kiln.tune_pipeline import tune_and_register  # preloaded while Ray started

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
    output(
        tune_result(outcome, request.sweep.metric, time.perf_counter() - started),
        as_json,
        key_values(f"kiln tune: {outcome.record.ref}"),
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
